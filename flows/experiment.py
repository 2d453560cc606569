"""Experiments: one scenario, its workload and timeline, under each chosen policy, side by side.

For every policy, from the same start: a fresh testbed, the deploy flow with that policy, the scenario's
concurrent chat sessions streaming through the gateway, the scenario's timeline replayed by the testbed
daemon (bandwidth traces, CPU load, failures), and, for ``adaptive`` only, the served reconfigure
deployment reacting to the daemon's events. ``static`` is the best plan for the start, kept throughout;
a baseline name (``neurosurgeon``, ``exo``, ``petals``, ``edgeshard``, ...) deploys that policy's plan and
keeps it.

``results/<run>/``: scenario.yaml, meta.json, ``<policy>/samples.parquet`` (one row per token),
summary.json (per policy: mean and p95 per-token latency, mean TTFT, throughput, reconfigurations, lost
requests) and latency.png (per-token latency over time, one series per policy).
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows import results
from flows.prefect_server import ensure_server
from flows.state import load_state
from flows.workload import ChatSession, choose_backend, prepare_model, serve_process, stop_process, teardown
from mecsplit.settings import get_settings
from testbed.scenario import load_scenario

ADAPTIVE = "adaptive"
STATIC = "static"
BASE_POLICY = "latency_dp"  # what adaptive and static start from, and what adaptive re-plans with


def _deploy_policy(policy: str) -> str:
    return BASE_POLICY if policy in (ADAPTIVE, STATIC) else policy


def policy_stats(samples: list[Any], errors: list[str], window_s: float) -> dict[str, Any]:
    rows = results.token_rows(samples)
    gaps = sorted(r["latency_s"] for r in rows if r["kind"] == "token")
    ttfts = [r["latency_s"] for r in rows if r["kind"] == "first"]
    tokens = len(rows)
    return {
        "requests": len(samples),
        "tokens": tokens,
        "mean_tpot_ms": round(statistics.fmean(gaps) * 1e3, 2) if gaps else None,
        "p95_tpot_ms": round(gaps[min(len(gaps) - 1, int(0.95 * len(gaps)))] * 1e3, 2) if gaps else None,
        "mean_ttft_ms": round(statistics.fmean(ttfts) * 1e3, 2) if ttfts else None,
        "throughput_tok_s": round(tokens / window_s, 3),
        "lost_requests": len(errors),
    }


def run_policy(
    scenario_path: Path, policy: str, backend: str, duration_s: float, out_dir: Path
) -> dict[str, Any]:
    log = get_run_logger()
    settings = get_settings()
    scenario = load_scenario(scenario_path)
    server = ensure_server(settings)
    serve = None
    sessions: list[ChatSession] = []
    try:
        if backend == "testbed":
            from testbed.api import TestbedClient, start_daemon

            start_daemon(scenario_path, env=server.env(), progress=lambda m: log.info(f"testbed: {m}"))
        from flows.reconfigure import deploy_flow

        first = deploy_flow(scenario=str(scenario_path), backend=backend, policy=_deploy_policy(policy))
        log.info(f"{policy}: initial plan {first['plan']}")
        if policy == ADAPTIVE:
            serve = serve_process(settings, server, scenario_path, log_name=f"serve-{policy}.log")
            time.sleep(5.0)  # the served deployment registers and starts polling
        if backend == "testbed":
            with TestbedClient() as client:
                client.replay_start()
        w = scenario.workload
        sessions = [
            ChatSession(first["gateway_url"], w.max_new_tokens, first_prompt=i) for i in range(w.sessions)
        ]
        started = time.monotonic()
        for s in sessions:
            s.start()
        time.sleep(duration_s)
        for s in sessions:
            s.stop()
        window_s = time.monotonic() - started
        state = load_state()
        samples = [x for s in sessions for x in s.samples]
        errors = [e for s in sessions for e in s.errors]
        stats = policy_stats(samples, errors, window_s)
        stats.update(
            policy=policy,
            initial_plan=first["plan"],
            final_plan=None
            if state is None
            else [[st["node"], st["first"], st["end"]] for st in state.plan["stages"]],
            reconfigurations=0 if state is None else state.revision,
            predicted_tpot_ms=round(first["predicted_tpot_s"] * 1e3, 2),
        )
        policy_dir = out_dir / policy
        policy_dir.mkdir(parents=True, exist_ok=True)
        results.write_samples(policy_dir / "samples.parquet", samples)
        (policy_dir / "errors.json").write_text(json.dumps(errors, indent=2))
        log.info(f"{policy}: {json.dumps(stats)}")
        return stats
    finally:
        for s in sessions:
            s.stop()
        stop_process(serve)
        teardown(backend, scenario)  # type: ignore[arg-type]


@flow(name="experiment", log_prints=True)
def experiment(
    scenario: str,
    policies: list[str],
    backend: str = "auto",
    duration_s: float | None = None,
    results_root: str = "results",
) -> dict[str, Any]:
    """Run the scenario under each policy in turn and compare them in ``results/<run>/``."""
    scenario_path = Path(scenario)
    sc = load_scenario(scenario_path)
    prepare_model(sc.model, get_settings())
    chosen = choose_backend(backend)
    if chosen != "testbed":
        get_run_logger().warning(
            "local backend: no emulated network, so the scenario's timeline (traces, load, failures) is not "
            "replayed; the comparison then shows placement effects only"
        )
    duration = duration_s if duration_s is not None else sc.duration_s
    out_dir = Path(results_root) / f"{time.strftime('%Y%m%d-%H%M%S')}-experiment-{sc.name}"
    out_dir.mkdir(parents=True)
    shutil.copy(scenario_path, out_dir / "scenario.yaml")
    (out_dir / "meta.json").write_text(json.dumps(results.meta(), indent=2))
    per_policy = {p: run_policy(scenario_path, p, chosen, duration, out_dir) for p in policies}
    static_like = [s for p, s in per_policy.items() if p != ADAPTIVE and s["mean_tpot_ms"] is not None]
    summary: dict[str, Any] = {
        "scenario": sc.name,
        "backend": chosen,
        "duration_s": duration,
        "policies": per_policy,
    }
    if ADAPTIVE in per_policy and static_like and per_policy[ADAPTIVE]["mean_tpot_ms"]:
        best = min(static_like, key=lambda s: s["mean_tpot_ms"])
        summary["adaptive_vs_best_static"] = {
            "best_static": best["policy"],
            "speedup_mean_tpot": round(best["mean_tpot_ms"] / per_policy[ADAPTIVE]["mean_tpot_ms"], 3),
        }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    results.plot_policies(out_dir)
    print(json.dumps(summary, indent=2))
    return summary
