"""The reaction benchmark behind ``mecsplit bench reaction``: how long from a bandwidth drop to the new
plan serving, and where the time goes.

testbed up (or the local backend) -> deploy flow -> serve the reconfigure deployment -> chat sessions
through the gateway -> N times: drop the source's link, wait for the link-triggered reconfigure run and
take its per-step timing (``flows.pipeline.reaction_timing``), restore the link and re-plan back ->
medians per step, lost requests, teardown.
"""

from __future__ import annotations

import functools
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from flows import pipeline
from flows.demo import _change_and_follow, _check_serve
from flows.runtime import RuntimeFailure, backend_for, clear_local_links
from flows.state import load_state
from flows.workload import ChatSession, serve_process, start_bench, stop_process, teardown, testbed_up


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


def medians(reactions: list[dict[str, Any]]) -> dict[str, float | None]:
    """The median of each step over the runs that have it (a controller's run and a triggered run name
    their steps differently: ``flows.pipeline.CONTROLLER_STAMPS`` and ``FLOW_STAMPS``)."""
    names = [step for step, _ in (*pipeline.CONTROLLER_STAMPS, *pipeline.FLOW_STAMPS)]
    names = [*dict.fromkeys(names), "end_to_end_s"]
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
    start = start_bench(scenario_path, backend)
    settings, scenario, server, chosen = start.settings, start.scenario, start.server, start.backend
    clear_local_links(settings)
    serve_proc = None
    chats: list[ChatSession] = []
    results: list[dict[str, Any]] = []
    try:
        testbed_up(start, scenario_path, _say)
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
        nominal = next(lk.bw_mbit for lk in scenario.links if scenario.source in (lk.a, lk.b))
        serving = functools.partial(_check_serve, serve_proc, settings.run_dir / "serve-bench.log")
        for i in range(runs):
            _standbys_ready(240)
            time.sleep(2.0)
            change = _change_and_follow(f"drop {i + 1}/{runs}", degraded_bw_mbit, chosen, scenario, server,
                                        reaction_timeout_s, serving)  # fmt: skip
            run = change["run"]
            result = (run or {}).get("result") or {}
            reaction = (result.get("reaction") or {}).get("steps")
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
            back = _change_and_follow(f"restore {i + 1}/{runs}", nominal, chosen, scenario, server,
                                      reaction_timeout_s, serving)  # fmt: skip
            after = ((back["run"] or {}).get("result") or {}).get("after")
            if after is None or after == result.get("after"):
                # The next drop must find a plan over the link again, or it measures nothing.
                _say(f"the link came back but the plan stayed {result.get('after')}: stopping here")
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
