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
    drop_s: float,
    reconfigured: dict[str, Any] | None,
    first: dict[str, Any],
    final_plan: dict[str, Any] | None,
) -> dict[str, Any]:
    rows = token_rows(samples)
    switch_s = reconfigured["end_s"] if reconfigured and reconfigured.get("end_s") else drop_s
    before = _phase_stats(rows, 0.0, drop_s)
    measured_before = before["median_ms"]
    predicted_ms = first["predicted_tpot_s"] * 1e3
    headline = {
        "scenario": scenario.name,
        "backend": backend,
        "plan_before": first["plan"],
        "plan_after": _layout(final_plan),
        "plan_changed": _layout(final_plan) != first["plan"],
        "reconfigure_run": None if reconfigured is None else reconfigured["state"],
        "reaction_s": None if reconfigured is None else round(reconfigured["end_s"] - drop_s, 2),
        "per_token_ms": {
            "before": before,
            "during": _phase_stats(rows, drop_s, switch_s),
            "after": _phase_stats(rows, switch_s, float("inf")),
        },
        "prediction_check": {
            "predicted_tpot_ms": round(predicted_ms, 2),
            "measured_tpot_ms": measured_before,
            "measured_over_predicted": None
            if not measured_before
            else round(float(measured_before) / predicted_ms, 3),
        },
        "requests": len(samples),
        "errors": len(errors),
    }
    return {"headline": headline, "errors": list(errors), "timeline": timeline}


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
    (run_dir / "meta.json").write_text(json.dumps(meta(), indent=2))
    (run_dir / "timeline.json").write_text(json.dumps(timeline, indent=2, default=str))
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    write_samples(run_dir / "samples.parquet", samples)
    _plot(token_rows(samples), timeline, run_dir / "latency.png")
    return run_dir


def write_samples(path: Path, samples: Sequence[StreamSample]) -> None:
    import pandas as pd

    columns = ["request", "t_s", "kind", "latency_s"]
    pd.DataFrame(token_rows(samples), columns=columns).to_parquet(path)


def plot_policies(run_dir: Path) -> None:
    """latency.png of an experiment: per-token latency over time, one series per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    fig, ax = plt.subplots(figsize=(9, 3.5), dpi=100)
    for path in sorted(run_dir.glob("*/samples.parquet")):
        frame = pd.read_parquet(path)
        tokens = frame[frame["kind"] == "token"]
        if len(tokens):
            t0 = frame["t_s"].min()
            ax.plot(tokens["t_s"] - t0, tokens["latency_s"] * 1e3, ".", markersize=2, label=path.parent.name)
    ax.set_xlabel("time since the workload started (s)")
    ax.set_ylabel("per-token latency (ms)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(run_dir / "latency.png")
    plt.close(fig)


def _plot(rows: list[dict[str, Any]], timeline: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = [r for r in rows if r["kind"] == "token"]
    t0 = min((r["t_s"] for r in rows), default=0.0)
    fig, ax = plt.subplots(figsize=(9, 3.5), dpi=100)
    ax.plot([r["t_s"] - t0 for r in tokens], [r["latency_s"] * 1e3 for r in tokens], ".", markersize=3)
    for item in timeline:
        if item["event"] in ("link.degraded", "reconfigured") and item.get("t_s"):
            ax.axvline(
                item["t_s"] - t0, color="red" if item["event"] == "link.degraded" else "green", alpha=0.6
            )
            ax.annotate(item["event"], (item["t_s"] - t0, ax.get_ylim()[1] * 0.9), fontsize=8)
    ax.set_xlabel("time since first token (s)")
    ax.set_ylabel("per-token latency (ms)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
