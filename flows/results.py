"""``results/<run>/``: what a run saw, kept for later analysis.

scenario.yaml (copy), meta.json (versions, commit, machine), timeline.json (plans and events),
samples.parquet (one row per generated token: wall time, gap, request), summary.json, latency.png.
"""

from __future__ import annotations

import json
import platform
import shutil
import statistics
import subprocess
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from flows.measure import StreamSample
from mecsplit.files import write_json
from testbed.scenario import Scenario


def token_rows(samples: Sequence[StreamSample]) -> list[dict[str, Any]]:
    """One row per token after the first of each request: its arrival time and the gap before it."""
    rows = []
    for request, sample in enumerate(samples):
        t = sample.started_at_s + sample.ttft_s
        rows.append({"request": request, "t_s": t, "kind": "first", "latency_s": sample.ttft_s})
        for gap in sample.token_gaps_s:
            t += gap
            rows.append({"request": request, "t_s": t, "kind": "token", "latency_s": gap})
    return rows


def _phase_stats(rows: list[dict[str, Any]], lo_s: float, hi_s: float) -> dict[str, float | int | None]:
    gaps = sorted(r["latency_s"] for r in rows if r["kind"] == "token" and lo_s <= r["t_s"] < hi_s)
    if not gaps:
        return {"tokens": 0, "median_ms": None, "mean_ms": None, "p95_ms": None}
    p95 = gaps[min(len(gaps) - 1, int(0.95 * len(gaps)))]
    return {
        "tokens": len(gaps),
        "median_ms": round(statistics.median(gaps) * 1e3, 2),
        "mean_ms": round(statistics.fmean(gaps) * 1e3, 2),
        "p95_ms": round(p95 * 1e3, 2),
    }


def _layout(plan: dict[str, Any] | None) -> list[list[Any]] | None:
    if plan is None:
        return None
    return [[s["node"], s["first"], s["end"]] for s in plan["stages"]]


def summarise(
    *,
    scenario: Scenario,
    backend: str,
    samples: Sequence[StreamSample],
    errors: Sequence[str],
    timeline: list[dict[str, Any]],
    changes: Sequence[dict[str, Any]],
    first: dict[str, Any],
    final_plan: dict[str, Any] | None,
    predictions: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """The demo's summary: per-token latency in each phase (before the first change, between a change and
    the plan that answers it, and after that plan serves), the plans, predicted against measured per plan
    (``flows.controller.PredictionLog``), the reactions and, after a recovery, whether the latency came
    back within ``RECOVERY_TOLERANCE`` of before the drop."""
    rows = token_rows(samples)
    per_phase: dict[str, Any] = {}
    plans: dict[str, Any] = {"before": first["plan"]}
    reactions: dict[str, Any] = {}
    lo = 0.0
    name = "before"
    for change in changes:
        run = change.get("run")
        per_phase[name] = _phase_stats(rows, lo, change["changed_s"])
        served_s = run["end_s"] if run and run.get("end_s") else change["changed_s"]
        per_phase[f"{change['name']} (until re-planned)"] = _phase_stats(rows, change["changed_s"], served_s)
        name, lo = f"after the {change['name']}", served_s
        result = (run or {}).get("result") or {}
        plans[name] = result.get("after")
        reactions[change["name"]] = (result.get("reaction") or {}).get("steps")
    per_phase[name] = _phase_stats(rows, lo, float("inf"))
    before = per_phase["before"].get("mean_ms")
    last = per_phase[name].get("mean_ms")
    headline = {
        "scenario": scenario.name,
        "backend": backend,
        "plans": plans,
        "final_plan": _layout(final_plan),
        "reconfigurations": sum(1 for c in changes if c.get("run")),
        "per_token_ms": per_phase,
        "recovery_check": None
        if not before or not last or len(changes) < 2
        else {
            "before_mean_ms": before,
            "after_recovery_mean_ms": last,
            "after_over_before": round(last / before, 3),
            "within_tolerance": abs(last / before - 1.0) <= RECOVERY_TOLERANCE,
            "returned_to_first_plan": _layout(final_plan) == first["plan"],
        },
        "prediction_check": [{k: row.get(k) for k in PREDICTION_FIELDS} for row in predictions],
        "uncalibrated_prediction_ms": round(first["predicted_tpot_s"] * 1e3, 2),
        "reactions": reactions,
        "requests": len(samples),
        "errors": len(errors),
    }
    return {"headline": headline, "errors": list(errors), "timeline": timeline}


# After the link comes back, per-token latency must be within this share of before the drop.
RECOVERY_TOLERANCE = 0.10
PREDICTION_FIELDS = (
    "plan", "kind", "predicted_tpot_ms", "measured_tpot_ms", "measured_steps", "measured_over_predicted",
    "measured_tpot_ms_held", "measured_steps_held", "measured_tpot_ms_whole", "measured_steps_whole",
    "network_changed_at_s", "move_started_at_s",
)  # fmt: skip


def meta() -> dict[str, Any]:
    versions = {}
    for dist in ("mecsplit", "torch", "transformers", "prefect", "docker", "pandas", "scipy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "versions": versions,
        "commit": commit,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_run(
    root: Path,
    scenario_path: Path,
    summary: dict[str, Any],
    samples: Sequence[StreamSample],
    timeline: list[dict[str, Any]],
) -> Path:
    run_dir = root / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=False)
    shutil.copy(scenario_path, run_dir / "scenario.yaml")
    write_json(run_dir / "meta.json", meta(), indent=2)
    write_json(run_dir / "timeline.json", timeline, indent=2, default=str)
    write_json(run_dir / "summary.json", summary, indent=2, default=str)
    write_samples(run_dir / "samples.parquet", samples)
    _plot(token_rows(samples), timeline, run_dir / "latency.png")
    return run_dir


def write_samples(path: Path, samples: Sequence[StreamSample]) -> None:
    import pandas as pd

    columns = ["request", "t_s", "kind", "latency_s"]
    pd.DataFrame(token_rows(samples), columns=columns).to_parquet(path)


TIMELINE_COLOURS = {"fail": "red", "restore": "green", "join": "green", "cpu_load": "orange",
                    "set_link": "purple", "trace": "grey"}  # fmt: skip


NO_TOKEN_S = 5.0
ONE_RUN = "one run: no interval"  # what a figure or the comparison says in place of an interval with n = 1
# One colour per repeat when a policy's panel overlays several (green and red mean reconfigurations and
# silences on these plots, so they are left out).
REPEAT_COLOURS = ("tab:blue", "tab:orange", "tab:purple", "tab:brown", "tab:olive", "tab:cyan", "tab:pink",
                  "tab:gray")  # fmt: skip


def find_windows(run_dir: Path) -> dict[str, dict[int, Path]]:
    """Every (policy, repeat) window folder of an experiment run that kept its figures (policy.json):
    ``<policy>/`` (one repeat, and every run made before repeats existed) is repeat 1, ``<policy>/r<k>/``
    repeat k."""
    found: dict[str, dict[int, Path]] = {}
    for path in sorted(run_dir.glob("*/policy.json")):
        found.setdefault(path.parent.name, {})[1] = path.parent
    for path in sorted(run_dir.glob("*/r*/policy.json")):
        repeat = path.parent.name[1:]
        if repeat.isdigit():
            found.setdefault(path.parent.parent.name, {})[int(repeat)] = path.parent
    return {p: dict(sorted(windows.items())) for p, windows in sorted(found.items())}


def window_samples(window: Path) -> Any | None:
    """A window's ``samples.parquet`` with ``rel_s``, each row's time from its workload's start
    (``policy.json``'s ``t0_wall_s``); None where the window kept no samples."""
    import pandas as pd

    path = window / "samples.parquet"
    if not path.exists():
        return None
    frame = pd.read_parquet(path)
    frame["rel_s"] = frame["t_s"] - json.loads((window / "policy.json").read_text())["t0_wall_s"]
    return frame


def _draw_window(ax: Any, window: Path, colour: str | None, label: str | None) -> None:
    """One window's per-token latency on a policy's panel: dots, a rolling median, shaded silences and
    its adopted reconfigurations (the time axis starts where its workload started)."""
    import pandas as pd

    frame = pd.read_parquet(window / "samples.parquet")
    meta_path = window / "policy.json"
    info = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    t0 = info.get("t0_wall_s", frame["t_s"].min() if len(frame) else 0.0)
    tokens = frame[frame["kind"] == "token"].sort_values("t_s")
    if len(tokens):
        x = (tokens["t_s"] - t0).to_numpy()
        y = tokens["latency_s"].to_numpy() * 1e3
        ax.plot(x, y, ".", markersize=2, alpha=0.5 if colour is None else 0.3, color=colour)
        line = pd.Series(y).rolling(15, min_periods=1).median().to_numpy(copy=True)
        # No token for a while (a chain being rebuilt): shaded, and the line is not drawn across it.
        for i in range(1, len(x)):
            if x[i] - x[i - 1] > NO_TOKEN_S:
                ax.axvspan(x[i - 1], x[i], color="red", alpha=0.12, linewidth=0)
                line[i - 1] = float("nan")
        ax.plot(x, line, "-", linewidth=1, color=colour, label=label)
        window_s = info.get("stats", {}).get("window_s")
        if window_s is not None and window_s - x[-1] > NO_TOKEN_S:  # silent to the end of the window
            ax.axvspan(x[-1], window_s, color="red", alpha=0.12, linewidth=0)
    for change in info.get("plan_changes", []):
        ax.axvline(change["t_s"], color="green", alpha=0.8, linewidth=1.2)


def plot_policies(run_dir: Path, timeline: Sequence[dict[str, Any]] = ()) -> None:
    """latency.png of an experiment: per-token latency over time, one panel per policy (dots: tokens;
    line: rolling median of 15; with several repeats, every repeat overlaid in its own colour), the
    scenario's timeline events as dashed lines and each window's adopted reconfigurations as solid green
    lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    windows = {
        p: {k: w for k, w in ws.items() if (w / "samples.parquet").exists()}
        for p, ws in find_windows(run_dir).items()
    }
    names = sorted((p for p, ws in windows.items() if ws), key=lambda p: _policy_order(run_dir, p))
    if not names:
        return
    fig, axes = plt.subplots(len(names), 1, figsize=(10, 1.9 * len(names) + 0.6), dpi=100, sharex=True,
                             sharey=True, squeeze=False)  # fmt: skip
    for ax, policy in zip(axes[:, 0], names, strict=True):
        several = len(windows[policy]) > 1
        for i, (k, window) in enumerate(windows[policy].items()):
            colour = REPEAT_COLOURS[i % len(REPEAT_COLOURS)] if several else None
            _draw_window(ax, window, colour, f"r{k}" if several else None)
        for item in timeline:
            ax.axvline(item["at_s"], color=TIMELINE_COLOURS.get(item["kind"], "grey"), linestyle="--",
                       alpha=0.5, linewidth=0.8)  # fmt: skip
        if several:
            ax.legend(fontsize=6, loc="upper right", ncol=min(4, len(windows[policy])), framealpha=0.6)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.set_ylabel(f"{policy}\n(ms)", fontsize=8)
    for item in timeline:
        if item["kind"] != "trace":
            axes[0, 0].annotate(f"{item['kind']} {item['what']}", (item["at_s"], 1.02), fontsize=7,
                                xycoords=("data", "axes fraction"), rotation=20)  # fmt: skip
    axes[-1, 0].set_xlabel("time since the workload and the timeline started (s)")
    fig.suptitle("per-token latency (dashed: timeline events; solid green: adopted reconfigurations; "
                 f"shaded: no token for > {NO_TOKEN_S:g} s)",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(run_dir / "latency.png")
    plt.close(fig)


BAR_FIGURES = (
    ("mean_tpot_ms", "mean per-token (ms)"),
    ("p95_tpot_ms", "p95 per-token (ms)"),
    ("mean_ttft_ms", "mean TTFT (ms)"),
    ("p95_ttft_ms", "p95 TTFT (ms)"),
    ("throughput_tok_s", "throughput (tok/s)"),
    ("total_stall_s", "total stall (s)"),
    ("reconfigurations", "reconfigurations"),
    ("tokens_lost_total", "tokens lost (all repeats)"),
)


def _figure(entry: dict[str, Any], key: str) -> tuple[float | None, float | None]:
    """A policy's figure (its mean over repeats) and the half-width of its 95 % interval (None with one
    run). Entries from before repeats have the figure flat and no interval; their lost tokens are
    ``tokens_lost``."""
    if key == "tokens_lost_total" and key not in entry:
        key = "tokens_lost"
    interval = entry.get("over_repeats", {}).get(key) or {}
    return entry.get(key), interval.get("half_width")


def plot_policy_bars(run_dir: Path, per_policy: dict[str, dict[str, Any]]) -> None:
    """bars.png of an experiment: each per-policy figure as a bar chart, policies in run order; with
    several repeats the bar is the mean over them and the error bar its 95 % interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(per_policy)
    fig, axes = plt.subplots(2, 4, figsize=(13, 5.5), dpi=100)
    for ax, (key, label) in zip(axes.flat, BAR_FIGURES, strict=True):
        figures = [_figure(per_policy[p], key) for p in names]
        values = [value or 0 for value, _ in figures]
        errors = [half or 0 for _, half in figures]
        bars = ax.bar(range(len(names)), values, yerr=errors if any(errors) else None, capsize=3,
                      color=["tab:green" if p == "adaptive" else "tab:blue" for p in names])  # fmt: skip
        # Inside the bar when error bars stand on its top, so that the label does not cover them.
        ax.bar_label(bars, fmt="%.4g", fontsize=7, label_type="center" if any(errors) else "edge")
        labels = [f"{p} (failed)" if "error" in per_policy[p] else p for p in names]
        ax.set_xticks(range(len(names)), labels, rotation=35, ha="right", fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    repeats = max((int(e.get("repeats", 1)) for e in per_policy.values()), default=1)
    if repeats > 1:
        fig.suptitle(f"mean over up to {repeats} repeats per policy; error bars: 95 % interval of the mean",
                     fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(run_dir / "bars.png")
    plt.close(fig)


def _policy_order(run_dir: Path, policy: str) -> int:
    summary = run_dir / "summary.json"
    if summary.exists():
        names = list(json.loads(summary.read_text()).get("policies", {}))
        if policy in names:
            return names.index(policy)
    return 1_000


TABLE_COLUMNS = (
    ("mean_tpot_ms", "tpot mean"),
    ("p95_tpot_ms", "tpot p95"),
    ("mean_ttft_ms", "ttft mean"),
    ("p95_ttft_ms", "ttft p95"),
    ("throughput_tok_s", "tok/s"),
    ("reconfigurations", "reconf"),
    ("total_stall_s", "stall s"),
    ("tokens_lost_total", "lost"),
)


def _cell(entry: dict[str, Any], key: str) -> str:
    value, half = _figure(entry, key)
    if value is None:
        return "-"
    return f"{value:g}" if half is None else f"{value:g} ± {half:.3g}"


def _verdict_line(cmp: dict[str, Any]) -> str:
    """The comparison in one line; summaries from before repeats have no interval and no verdict."""
    ci = cmp.get("speedup_ci95")
    if ci is None:
        spread, outcome = ONE_RUN, ""
    else:
        spread = f"{cmp['repeats']} paired repeats, 95 % interval {ci[0]:.3f}-{ci[1]:.3f}x"
        outcome = f": **{cmp['verdict']}**"
    return (
        f"\nadaptive vs best static-like ({cmp['best_static']}): {cmp['speedup_mean_tpot']:.2f}x on mean "
        f"per-token latency ({cmp['best_static_mean_tpot_ms']:g} -> {cmp['adaptive_mean_tpot_ms']:g} ms; "
        f"{spread}){outcome}; goal {cmp['goal']:g}x {'met' if cmp['goal_met'] else 'not met'}"
    )


def policy_table(summary: dict[str, Any]) -> str:
    """The experiment's summary as a Markdown table (per-token and TTFT in ms; with several repeats the
    mean over them ± the half-width of its 95 % interval, lost tokens summed), with the comparison."""
    head = "| policy | " + " | ".join(label for _, label in TABLE_COLUMNS) + " | runs |"
    lines = [head, "|" + "---|" * (len(TABLE_COLUMNS) + 2)]
    for name, stats in summary["policies"].items():
        if "error" in stats:
            lines.append(f"| {name} | could not run: {stats['error'][:200]} |")
            continue
        runs = str(stats.get("repeats", 1))
        if stats.get("failed_repeats"):
            runs += f" ({stats['failed_repeats']} failed)"
        cells = [_cell(stats, k) for k, _ in TABLE_COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {runs} |")
    cmp = summary.get("adaptive_vs_best_static")
    if cmp:
        lines.append(_verdict_line(cmp))
    lines.append(f"results: {summary.get('results_dir', '')}")
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], timeline: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = [r for r in rows if r["kind"] == "token"]
    t0 = min((r["t_s"] for r in rows), default=0.0)
    fig, ax = plt.subplots(figsize=(9, 3.5), dpi=100)
    ax.plot([r["t_s"] - t0 for r in tokens], [r["latency_s"] * 1e3 for r in tokens], ".", markersize=3)
    for item in timeline:
        if item["event"].startswith("link.") or item["event"] == "reconfigured":
            color = "green" if item["event"] == "reconfigured" else "red"
            ax.axvline(item["t_s"] - t0, color=color, alpha=0.6)
            ax.annotate(item["event"], (item["t_s"] - t0, ax.get_ylim()[1] * 0.9), fontsize=8)
    ax.set_xlabel("time since first token (s)")
    ax.set_ylabel("per-token latency (ms)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
