"""The reaction benchmark behind ``mecsplit bench reaction``: how long from a bandwidth drop to the new
plan serving, and where the time goes.

testbed up (or the local backend) -> deploy flow -> serve the reconfigure deployment -> chat sessions
through the gateway -> N times: drop the source's link, wait for the link-triggered reconfigure run and
take its per-step timing (``flows.pipeline.reaction_timing``), restore the link and re-plan back ->
medians per step, lost requests, teardown.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from flows import pipeline
from flows.demo import _degrade, _wait_for_reconfigure
from flows.prefect_server import ensure_server
from flows.runtime import RuntimeFailure, backend_for, clear_local_links, set_local_link
from flows.state import load_state
from flows.workload import ChatSession, choose_backend, prepare_model, serve_process, stop_process, teardown
from mecsplit.settings import get_settings
from testbed.scenario import Scenario, load_scenario


def _say(message: str) -> None:
    print(f"[bench reaction {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def wait_for_deployment(timeout_s: float) -> None:
    """Until the served ``reconfigure`` deployment is registered (the serve process just started)."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            try:
                client.read_deployment_by_name("reconfigure/reconfigure")
                return
            except Exception:
                time.sleep(0.5)
    raise RuntimeFailure("the served reconfigure deployment did not appear (see serve-bench.log)")


def _standbys_ready(timeout_s: float) -> None:
    """Until every standby the deployment state names answers (a drop before that measures a boot)."""
    state = load_state()
    if state is None:
        return
    for standby in state.standbys:
        pipeline.wait_ready(standby, state.secret, timeout_s)


def _restore(backend: str, scenario: Scenario, a: str, b: str, scenario_path: Path) -> list[list[Any]]:
    """The link back at its nominal rate, then a re-plan (through the served deployment, so it queues
    behind anything running) that moves back to the original split."""
    from prefect.deployments import run_deployment

    nominal = next(lk.bw_mbit for lk in scenario.links if {lk.a, lk.b} == {a, b})
    if backend == "testbed":
        from testbed.api import TestbedClient

        with TestbedClient() as client:
            client.set_link(a, b, bw_mbit=nominal)
    else:
        set_local_link(get_settings(), a, b, nominal)
    run = run_deployment(
        "reconfigure/reconfigure",
        parameters={"scenario": str(scenario_path), "reason": "bench.restore", "horizon_s": 3600.0},
        timeout=600,
    )
    if run.state is None or not run.state.is_completed():
        raise RuntimeFailure(f"the restoring reconfigure run ended {run.state}")
    state = load_state()
    assert state is not None
    return [[s["node"], s["first"], s["end"]] for s in state.plan["stages"]]


def medians(reactions: list[dict[str, Any]]) -> dict[str, float | None]:
    """The median of each step over the runs that have it."""
    names = [*pipeline.REACTION_STEPS, "end_to_end_s", "event_to_run_created_s"]
    out: dict[str, float | None] = {}
    for name in names:
        values = [r[name] for r in reactions if isinstance(r.get(name), int | float)]
        out[name] = round(statistics.median(values), 3) if values else None
    return out


def run_reaction_bench(
    scenario_path: Path,
    *,
    runs: int = 3,
    backend: str = "auto",
    degraded_bw_mbit: float = 0.1,
    sessions: int = 1,
    max_tokens: int = 16,
    reaction_timeout_s: float = 240.0,
) -> dict[str, Any]:
    settings = get_settings()
    scenario = load_scenario(scenario_path)
    prepare_model(scenario.model, settings)
    server = ensure_server(settings)
    os.environ.update(server.env())
    chosen = choose_backend(backend)
    if load_state() is not None:
        raise RuntimeFailure("a deployment is already running: `mecsplit down` first")
    clear_local_links(settings)
    serve_proc = None
    chats: list[ChatSession] = []
    results: list[dict[str, Any]] = []
    try:
        if chosen == "testbed":
            from testbed.api import start_daemon

            _say("testbed up")
            start_daemon(scenario_path, env=server.env(), progress=lambda m: _say(f"testbed: {m}"))
        from flows.reconfigure import deploy_flow

        _say("deploy flow")
        first = deploy_flow(scenario=str(scenario_path), backend=chosen, model=scenario.model)
        initial = first["plan"]
        _say(f"plan {initial}")
        serve_proc = serve_process(settings, server, scenario_path, "serve-bench.log")
        wait_for_deployment(120)
        time.sleep(3.0)  # the runner's first polls
        chats = [ChatSession(first["gateway_url"], max_tokens, first_prompt=i) for i in range(sessions)]
        for chat in chats:
            chat.start()
        for i in range(runs):
            _standbys_ready(240)
            time.sleep(2.0)
            t0 = time.time()
            a, b = _degrade(chosen, scenario, server, degraded_bw_mbit)
            _say(f"run {i + 1}/{runs}: {a}-{b} dropped to {degraded_bw_mbit} Mbit/s")
            run = _wait_for_reconfigure(t0 - 1, reaction_timeout_s)
            result = (run or {}).get("result") or {}
            reaction = (result.get("reaction") or {}).get("steps")
            event_s = ((result.get("reaction") or {}).get("stamps") or {}).get("event")
            if reaction and event_s is not None and run and run.get("created_s"):
                # Prefect's share split: automation -> run created, then runner poll + process start.
                reaction["event_to_run_created_s"] = round(run["created_s"] - event_s, 4)
            entry = {
                "run": i + 1,
                "state": None if run is None else run["state"],
                "after": result.get("after"),
                "claimed_standbys": (result.get("deploy") or {}).get("claimed_standbys"),
                "switch_report": (result.get("deploy") or {}).get("switch_report"),
                "reaction": reaction,
            }
            results.append(entry)
            _say(f"run {i + 1}: {reaction}")
            back = _restore(chosen, scenario, a, b, scenario_path)
            if back != initial:
                _say(f"the restore re-planned to {back}, not {initial}: stopping here")
                break
        for chat in chats:
            chat.stop()
        reactions = [r["reaction"] for r in results if r["reaction"]]
        return {
            "scenario": scenario.name,
            "backend": chosen,
            "runs": len(results),
            "reacted": len(reactions),
            "degraded_bw_mbit": degraded_bw_mbit,
            "median": medians(reactions),
            "per_run": results,
            "requests": sum(len(c.samples) for c in chats),
            "lost_requests": sum(len(c.errors) for c in chats),
            "errors": [e for c in chats for e in c.errors][:10],
            "settings": {
                "warm_standby": settings.flows.warm_standby,
                "link_probe_max_age_s": settings.flows.link_probe_max_age_s,
                "link_sample_interval_s": settings.testbed.link_sample_interval_s,
                "event_samples": settings.testbed.event_samples,
                "runner_poll_s": settings.flows.runner_poll_s,
            },
        }
    finally:
        for chat in chats:
            chat.stop()
        stop_process(serve_proc)
        teardown(chosen, scenario)


__all__ = ["backend_for", "medians", "run_reaction_bench"]
