"""``mecsplit bench controller``: what the serve controller costs while nothing in the network changes.

testbed up (or the local backend) -> deploy -> serve (the controller learning from traffic and
evaluating every few seconds) -> the scenario's sessions generate, links and loads stay as they are ->
for ``seconds``: the controller's own CPU time (its ticking thread's, ``flows.controller.TickStats``)
and the whole serve process's (the Prefect runner polling included) as shares of one core, its ticks
and evaluations, and the reconfigure runs it started (none is the goal) -> teardown.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from flows.predictions import clear_run_learning
from flows.state import load_state
from flows.workload import ChatSession, serve_process, start_bench, stop_process, teardown, testbed_up

# Before measuring: the deployment settles and the controller has learned what it learns first.
WARMUP_S = 30.0


def _say(message: str) -> None:
    print(f"[bench controller {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _controller_stats(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / "controller.json").read_text())
    except (OSError, ValueError):
        return {}


def run_controller_bench(
    scenario_path: Path, *, seconds: float = 60.0, backend: str = "auto"
) -> dict[str, Any]:
    start = start_bench(scenario_path, backend)
    settings, scenario, server, chosen = start.settings, start.scenario, start.server, start.backend
    clear_run_learning(settings)
    serve = None
    chats: list[ChatSession] = []
    try:
        testbed_up(start, scenario_path, _say)
        from flows.reconfigure import deploy_flow

        first = deploy_flow(
            scenario=str(scenario_path), backend=chosen, model=scenario.model, measure_tokens=0
        )
        serve = serve_process(settings, server, scenario_path, "serve-bench-controller.log")
        w = scenario.workload
        chats = [
            ChatSession(first["gateway_url"], w.max_new_tokens, first_prompt=i) for i in range(w.sessions)
        ]
        for chat in chats:
            chat.start()
        _say(f"plan {first['plan']}; {len(chats)} sessions; warming up {WARMUP_S:.0f} s")
        time.sleep(WARMUP_S)
        stats0, cpu0, t0 = _controller_stats(settings.run_dir), _process_cpu_s(serve.pid), time.time()
        _say(f"measuring {seconds:.0f} s with the network unchanged")
        time.sleep(seconds)
        # The controller writes its figures every 10 s: wait for a fresh row.
        time.sleep(11.0)
        stats1, cpu1, t1 = _controller_stats(settings.run_dir), _process_cpu_s(serve.pid), time.time()
        state = load_state()
        window_s = (stats1.get("at_s", t1) - stats0.get("at_s", t0)) or (t1 - t0)
        ticks = stats1.get("ticks", 0) - stats0.get("ticks", 0)
        return {
            "scenario": scenario.name,
            "backend": chosen,
            "seconds": round(window_s, 1),
            "sessions": len(chats),
            "evaluate_every_s": settings.flows.evaluate_every_s,
            "ticks": ticks,
            "controller_cpu_share": round((stats1.get("cpu_s", 0) - stats0.get("cpu_s", 0)) / window_s, 5),
            "controller_cpu_ms_per_tick": round(
                (stats1.get("cpu_s", 0) - stats0.get("cpu_s", 0)) / max(1, ticks) * 1e3, 2
            ),
            "serve_process_cpu_share": round((cpu1 - cpu0) / (t1 - t0), 5),
            "evaluations": stats1.get("evaluations", 0) - stats0.get("evaluations", 0),
            "runs_started": stats1.get("runs_started", 0) - stats0.get("runs_started", 0),
            "plan_changed": state is not None and state.revision != 0,
            "goal": "controller_cpu_share < 0.01 and runs_started == 0",
        }
    finally:
        for chat in chats:
            chat.stop()
        stop_process(serve)
        teardown(chosen, scenario)
