"""``mecsplit bench throughput``: what one chain serves to many users, its servers batching or not.

testbed up (or the local backend) -> deploy the scenario's plan with every segment server batching up to
``max_batch`` decode steps -> for each number of concurrent sessions: they generate, the first
``SETTLE_S`` are dropped, then ``runs`` windows of ``seconds`` are measured -> the deployment is stopped
and the same plan deployed again with servers that run each step alone (``max_batch`` 1) -> the same
windows -> teardown. Per concurrency and mode: aggregate tokens/s (tokens streamed inside a window over
its length; the median over windows), TTFT p50/p95 of the requests begun in the windows and TPOT p50/p95
(each request's mean gap between tokens), and the ratios of batched to unbatched tokens/s, at the same
concurrency and against the unbatched chain's best.

The clients, the gateway and every segment server share the host (on the testbed, each node's CPU quota
of it): the figures are the chain's as its users see them, the clients' own CPU included.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flows.predictions import clear_run_learning
from flows.workload import ChatSession, RequestRecord, start_bench, stop_deployment, teardown, testbed_up
from mecsplit.settings import get_settings

# Before a concurrency's windows: the sessions' first prompts and the servers' batches settle.
SETTLE_S = 10.0
BATCH_ENV = "MECSPLIT_SEGMENTS__MAX_BATCH"


def _say(message: str) -> None:
    print(f"[bench throughput {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@contextmanager
def batching(max_batch: int | None) -> Iterator[None]:
    """Within it, a deploy starts every segment server batching up to ``max_batch`` decode steps (passed
    to each as ``--max-batch``); None: the setting as it is."""
    saved = os.environ.get(BATCH_ENV)
    if max_batch is not None:
        os.environ[BATCH_ENV] = str(max_batch)
        get_settings.cache_clear()
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(BATCH_ENV, None)
        else:
            os.environ[BATCH_ENV] = saved
        get_settings.cache_clear()


def token_times(record: RequestRecord) -> Iterator[float]:
    """The wall-clock time each token of ``record`` arrived."""
    if record.ttft_s is None:
        return
    t = record.started_at_s + record.ttft_s
    yield t
    for gap in record.token_gaps_s:
        t += gap
        yield t


def window_figures(
    records: Sequence[RequestRecord], windows: Sequence[tuple[float, float]]
) -> dict[str, Any]:
    """Aggregate tokens/s per window (median over them) and the latency percentiles of the requests
    begun inside any window."""
    times = sorted(t for r in records for t in token_times(r))
    rates = [sum(1 for t in times if a <= t < b) / (b - a) for a, b in windows]
    inside = [r for r in records if any(a <= r.started_at_s < b for a, b in windows)]
    ttfts = [r.ttft_s for r in inside if r.ttft_s is not None]
    tpots = [statistics.fmean(r.token_gaps_s) for r in inside if r.token_gaps_s]
    return {
        "tokens_per_s": round(statistics.median(rates), 2) if rates else None,
        "tokens_per_s_runs": [round(x, 2) for x in rates],
        "requests": len(inside),
        "failed_requests": sum(1 for r in inside if r.error is not None),
        **_percentiles("ttft", ttfts),
        **_percentiles("tpot", tpots),
    }


def _percentiles(name: str, values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {f"{name}_p50_ms": None, f"{name}_p95_ms": None}
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {
        f"{name}_p50_ms": round(statistics.median(ordered) * 1e3, 2),
        f"{name}_p95_ms": round(p95 * 1e3, 2),
    }


def _measure(url: str, max_tokens: int, sessions: int, seconds: float, runs: int) -> dict[str, Any]:
    chats = [ChatSession(url, max_tokens, first_prompt=i) for i in range(sessions)]
    for chat in chats:
        chat.start()
    try:
        time.sleep(SETTLE_S)
        t0 = time.time()
        time.sleep(seconds * runs)
    finally:
        for chat in chats:
            chat.stop()
    windows = [(t0 + i * seconds, t0 + (i + 1) * seconds) for i in range(runs)]
    return {"sessions": sessions, **window_figures([r for c in chats for r in c.records], windows)}


def run_throughput_bench(
    scenario_path: Path,
    sessions: Sequence[int],
    *,
    seconds: float = 20.0,
    runs: int = 3,
    max_batch: int = 16,
    backend: str = "auto",
) -> dict[str, Any]:
    """See the module docstring."""
    start = start_bench(scenario_path, backend)
    settings, scenario, chosen = start.settings, start.scenario, start.backend
    clear_run_learning(settings)
    modes: dict[str, list[dict[str, Any]]] = {}
    plans = []
    try:
        testbed_up(start, scenario_path, _say)
        from flows.reconfigure import deploy_flow

        for mode, batch in (("batched", max_batch), ("unbatched", 1)):
            _say(f"{mode}: deploying (servers' max batch {batch})")
            with batching(batch):
                first = deploy_flow(
                    scenario=str(scenario_path), backend=chosen, model=scenario.model, measure_tokens=0,
                    refresh_profiles=not plans,  # the second deploy prices the same profiles: the same plan
                )  # fmt: skip
            plans.append(first["plan"])
            modes[mode] = []
            for k in sessions:
                row = _measure(first["gateway_url"], scenario.workload.max_new_tokens, k, seconds, runs)
                _say(f"  {k} sessions: {row['tokens_per_s']} tokens/s, TPOT p95 {row['tpot_p95_ms']} ms")
                modes[mode].append(row)
            stop_deployment(scenario)
    finally:
        teardown(chosen, scenario)
    return _report(scenario, chosen, plans, modes, seconds, runs, max_batch)


def _report(
    scenario: Any,
    backend: str,
    plans: list[Any],
    modes: dict[str, list[dict[str, Any]]],
    seconds: float,
    runs: int,
    max_batch: int,
) -> dict[str, Any]:
    slo_ms = None if scenario.constraints.slo_tpot_s is None else scenario.constraints.slo_tpot_s * 1e3
    best_unbatched = max((r["tokens_per_s"] or 0.0 for r in modes["unbatched"]), default=0.0)
    rows = []
    for batched, unbatched in zip(modes["batched"], modes["unbatched"], strict=True):
        b, u = batched["tokens_per_s"], unbatched["tokens_per_s"]
        rows.append({
            "sessions": batched["sessions"], "batched": batched, "unbatched": unbatched,
            "ratio_same_sessions": round(b / u, 3) if b and u else None,
            "ratio_to_best_unbatched": round(b / best_unbatched, 3) if b and best_unbatched else None,
            "batched_tpot_p95_within_slo": None if slo_ms is None or batched["tpot_p95_ms"] is None
            else batched["tpot_p95_ms"] <= slo_ms,
        })  # fmt: skip
    return {
        "bench": "throughput", "scenario": scenario.name, "backend": backend, "plan": plans[0],
        "same_plan_both_modes": len(plans) == 2 and plans[0] == plans[1], "max_batch": max_batch,
        "seconds": seconds, "runs": runs, "settle_s": SETTLE_S,
        "max_new_tokens": scenario.workload.max_new_tokens, "slo_tpot_ms": slo_ms, "rows": rows,
    }  # fmt: skip
