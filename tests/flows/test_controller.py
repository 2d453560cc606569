"""The serve controller with real traffic: it learns the cost model from the gateway's telemetry, records
predicted against measured, evaluates only when something changed and starts a run only for a plan it
adopts.

Real processes on loopback (local backend, tiny model): the deploy flow's segment servers and gateway, a
chat session streaming through them; the controller is driven tick by tick in this process, with a
recording ``start_run`` in place of the serve process's flow run.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TINY_SCENARIO

from flows import pipeline
from flows.controller import Controller, ControllerConfig
from flows.predictions import clear_decision_record, clear_run_learning, load_moves, load_predictions
from flows.runtime import LocalBackend, clear_local_links, set_local_link, stop_local_processes
from flows.state import clear_state, load_state
from flows.workload import ChatSession
from mecsplit.settings import get_settings
from testbed.scenario import load_scenario

pytestmark = [pytest.mark.prefect, pytest.mark.slow]


@pytest.fixture(scope="module")
def deployed(flows_home: Path, prefect_api: str) -> Iterator[dict[str, Any]]:
    from flows.reconfigure import deploy_flow

    clear_run_learning(get_settings())
    clear_decision_record(get_settings())
    result = deploy_flow(scenario=str(TINY_SCENARIO), backend="local", measure_tokens=0)
    yield result
    state = load_state()
    if state is not None:
        pipeline.teardown(LocalBackend(load_scenario(TINY_SCENARIO)), state)
        clear_state()
    clear_local_links(get_settings())
    clear_run_learning(get_settings())
    clear_decision_record(get_settings())
    stop_local_processes(get_settings())


def _ticks(controller: Controller, seconds: float) -> list[Any]:
    out = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        out.append(controller.tick())
        time.sleep(0.5)
    return out


def test_controller_learns_records_and_decides_only_on_change(deployed: dict[str, Any]) -> None:
    settings = get_settings()
    started: list[dict[str, Any]] = []
    config = ControllerConfig.from_settings(settings, "latency_dp")
    controller = Controller(
        TINY_SCENARIO,
        config,
        lambda params: started.append(params) or "run",
        lambda: False,
        settings=settings,
    )
    chat = ChatSession(deployed["gateway_url"], 8)
    chat.start()
    try:
        # The first tick sees a deployment it has not evaluated: it decides. While the model learns its
        # first steps, the plan's prediction may move beyond the accuracy bound once more: decided again.
        first = _ticks(controller, 8.0)
        assert first[0] is not None and first[0].reason == "new deployment"
        evaluated = len(controller.evaluations)
        time.sleep(2.0)  # a tick's span as serving has it (concurrency is learned over a second or more)
        quiet = _ticks(controller, 8.0)  # learned: nothing in the network moves now
        # The tiny model's tokens take ~5 ms, where the host's wake-ups are milliseconds: its learned
        # prediction can still swing past the 10 % bar (5.4 -> 7.5 ms seen in CI; three times in 16 ticks
        # on a host busy with other work). Such a re-decision must move nothing and stay the exception;
        # any other reason to decide here, or deciding on most ticks, is a defect.
        again = [e for e in quiet if e is not None]
        assert len(again) <= len(quiet) // 4, [e.reason for e in again]
        assert all(e.reason.startswith("model:") and not e.adopt for e in again), [e.reason for e in again]
        assert len(controller.evaluations) == evaluated + len(again)
        cal = controller.calibration
        # It learned from the traced steps: compute per node, the hops, the gateway's own time.
        assert cal.tokens > 0 and cal.nodes and cal.hops
        assert cal.source_idle_s > 0
        assert cal.concurrency is not None and 0.5 < cal.concurrency < 2.0
        state = load_state()
        assert state is not None
        assert {e.node for e in state.segments} <= set(cal.nodes)
        # A link change is a reason to decide again, at the next tick.
        set_local_link(settings, "device", "edge", 0.05)
        evaluation = controller.tick()
        assert evaluation is not None and "device-edge" in evaluation.reason
        assert evaluation.decision["forecast"]["links"]["device-edge"]["now_mbit"] == 0.05
        # The bar it decided with: the configured least gain, no move of this deployment measured yet.
        assert evaluation.decision["min_gain_ratio"] == settings.policies.replan_min_gain_ratio
        assert evaluation.decision["moves_recorded"] == 0
        moves = load_moves(settings)
        if evaluation.adopt:  # a move is a run with the decided plan; a kept plan starts none
            assert started and started[-1]["plan"]["stages"]
            assert started[-1]["decided_on_revision"] == state.revision
            assert [m["to"] for m in moves] == [evaluation.candidate]  # with what it promised
        else:
            assert not started and not moves
    finally:
        chat.stop()
        controller.close()
    assert not chat.errors
    # The first plan's prediction, calibrated after 100 of its steps, against what it then served.
    rows = load_predictions(settings)
    assert rows and rows[0]["kind"] == "calibrated" and rows[0]["predicted_tpot_ms"] > 0
    assert controller.stats.ticks >= 10 and controller.stats.cpu_s > 0
