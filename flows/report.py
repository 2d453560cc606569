"""Prefect artifacts of a reconfiguration: placement table, predicted vs measured, reason, latency plot."""

from __future__ import annotations

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
