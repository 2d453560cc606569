"""Prefect artifacts of a reconfiguration: placement table, predicted vs measured, reason, latency plot."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any

from policies.plan import Plan


def placement_rows(plan: Plan, tiers: dict[str, str]) -> list[dict[str, Any]]:
    return [
        {
            "stage": i,
            "node": s.node,
            "tier": tiers.get(s.node, "?"),
            "layers": f"[{s.first}, {s.end})",
            "num_layers": s.end - s.first,
        }
        for i, s in enumerate(plan.stages)
    ]


def metrics_markdown(
    *,
    reason: str,
    resource: str | None,
    decision: dict[str, Any],
    before: Plan | None,
    after: Plan,
    measured: dict[str, float] | None,
    switch: dict[str, Any] | None = None,
) -> str:
    def layout(plan: Plan | None) -> str:
        if plan is None:
            return "(none)"
        return " → ".join(f"{s.node}[{s.first},{s.end})" for s in plan.stages)

    lines = [
        f"# Reconfiguration: {reason}",
        "",
        f"- trigger: `{reason}`" + (f" on `{resource}`" if resource else ""),
        f"- decision: **{'adopt' if decision.get('adopt') else 'keep'}**: {decision.get('reason', '')}",
        f"- plan before: `{layout(before)}`",
        f"- plan after: `{layout(after)}` (policy `{after.policy}`)",
        "",
        "| metric | predicted | measured |",
        "|---|---|---|",
    ]
    m = measured or {}
    for label, key, scale, unit in (
        ("time to first token", "ttft_s", 1e3, "ms"),
        ("per-token latency", "tpot_s", 1e3, "ms"),
        ("throughput", "throughput_tok_s", 1.0, "tok/s"),
    ):
        predicted = getattr(after.predicted, key)
        got = m.get(key)
        shown = "-" if got is None else f"{got * scale:.1f} {unit}"
        lines.append(f"| {label} | {predicted * scale:.1f} {unit} | {shown} |")
    if m.get("tpot_s") and after.predicted.tpot_s:
        lines += ["", f"measured/predicted per-token latency: **{m['tpot_s'] / after.predicted.tpot_s:.2f}**"]
    if switch is not None:
        lines += ["", session_move_line(decision.get("cost"), switch)]
    return "\n".join(lines)


def session_move_line(cost: dict[str, Any] | None, switch: dict[str, Any]) -> str:
    """How the live sessions moved: the decision's predicted choice and cost, and the gateway's measure."""
    measured = (
        f"measured: `{switch['mode']}` with {switch['recompute_hops']} of {switch['hops']} hops recomputing, "
        f"{switch['sessions']} sessions, {switch['kv_bytes_moved']} KV bytes moved, "
        f"{switch['tokens_recomputed']} tokens recomputed, stall {switch['stall_s'] * 1e3:.0f} ms"
    )
    if not cost:
        return f"- sessions moved: {measured}"
    predicted = (
        f"predicted: `{cost['kv_mode']}` with {cost.get('recompute_stages', 0)} stages recomputing, "
        f"KV {cost.get('kv_s', 0.0) * 1e3:.0f} ms (move all {cost['kv_move_s'] * 1e3:.0f} ms, recompute all "
        f"{cost['kv_recompute_s'] * 1e3:.0f} ms)"
    )
    return f"- sessions moved: {predicted}; {measured}"


def latency_plot_markdown(samples_ms: Sequence[tuple[float, float]], title: str) -> str:
    """A PNG plot of (t_s, latency_ms) embedded as a data URI, so the UI shows it with no file server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3), dpi=90)
    if samples_ms:
        xs, ys = zip(*samples_ms, strict=True)
        ax.plot(xs, ys, marker=".", linewidth=1)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("per-token latency (ms)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    encoded = base64.b64encode(buffer.getvalue()).decode()
    return f"# {title}\n\n![latency](data:image/png;base64,{encoded})\n"
