"""A failover rebuild that the gateway refuses leaves nothing behind, so the retry can take the same
revision: found in the v2x experiment, where a rebuild tried seconds after rsu1 died was refused and the
next attempt failed on the refused attempt's container names. Real segment processes (local backend)."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import TINY_SCENARIO

from flows import pipeline
from flows.measure import admin_headers, stream_completion
from flows.runtime import LocalBackend
from flows.state import Endpoint, clear_state, load_state
from mecsplit.process import pid_alive
from mecsplit.settings import get_settings
from policies import Plan, solve
from testbed.scenario import load_scenario

pytestmark = pytest.mark.slow  # profiles and starts real segment processes (about a minute)


class RecordingBackend(LocalBackend):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.started: list[Endpoint] = []

    def start_segment(self, request: pipeline.SegmentRequest, secret: str) -> Endpoint:  # type: ignore[name-defined]
        endpoint = super().start_segment(request, secret)
        self.started.append(endpoint)
        return endpoint


def _gone(endpoint: Endpoint) -> bool:
    return not pid_alive(int(endpoint.handle.removeprefix("pid:")))


def _even_plan(backend: LocalBackend) -> Plan:
    scenario = backend.scenario
    profiles = pipeline.profile_nodes(backend, backend.alive_nodes(), scenario.model, 8, max_age_s=300.0,
                                      progress=lambda _: None)  # fmt: skip
    probes = pipeline.profile_links(backend, scenario, set(profiles), progress=lambda _: None)
    facts = pipeline.model_facts(get_settings(), scenario.model, profiles)
    return solve(pipeline.build_problem(scenario, facts, profiles, probes), "even")


def test_refused_switch_stops_the_new_segments(flows_home: Path) -> None:
    from flows.state import save_state

    backend = RecordingBackend(load_scenario(TINY_SCENARIO))
    scenario = backend.scenario
    plan = _even_plan(backend)
    first = pipeline.deploy(backend, str(TINY_SCENARIO), scenario.model, plan, None, progress=print)
    save_state(first.state)
    try:
        backend.started.clear()
        refusing = first.state.model_copy(update={"gateway_url": "http://127.0.0.1:9"})  # nothing answers
        # The last stage moves to another node (an unchanged stage would keep its server, nothing new).
        last = plan.stages[-1]
        other = next(n for n in backend.alive_nodes() if n != last.node)
        stages = (*plan.stages[:-1], last.model_copy(update={"node": other}))
        moved = plan.model_copy(update={"stages": stages})
        with pytest.raises(httpx.HTTPError):
            pipeline.deploy(backend, str(TINY_SCENARIO), scenario.model, moved, refusing,
                            switch_mode="replay", progress=print)  # fmt: skip
        assert backend.started, "the attempt started new segments"
        assert all(_gone(e) for e in backend.started), "a refused switch left new segments running"
        assert all(not _gone(e) for e in first.state.segments), "the old chain must keep serving"
        state = load_state()
        assert state is not None and state.revision == first.state.revision
    finally:
        pipeline.teardown(backend, first.state)
        for e in first.state.standbys:
            backend.stop_segment(e)
        clear_state()  # the home is shared by the session: the next test must not find this deployment


def test_failover_rebuild_restarts_only_the_dead_stage(flows_home: Path) -> None:
    """A hop dies (SIGKILL); the rebuild of the same plan keeps the servers that still answer, restarts
    the dead stage only, and the gateway's sessions go on with the same tokens (found in the v2x
    experiment: a copy of the car's unchanged stage started beside the old one, and the car's memory,
    shared with the gateway, could not hold both)."""
    backend = RecordingBackend(load_scenario(TINY_SCENARIO))
    scenario = backend.scenario
    plan = _even_plan(backend)
    assert len(plan.stages) >= 2
    first = pipeline.deploy(backend, str(TINY_SCENARIO), scenario.model, plan, None, progress=print)
    state = first.state
    try:
        before = stream_completion(state.gateway_url, "Hello edge", 6)
        dead = state.segments[-1]
        os.kill(int(dead.handle.removeprefix("pid:")), signal.SIGKILL)
        with ThreadPoolExecutor(max_workers=1) as pool:
            # This request's prompt reaches the kept first hop, fails on the dead one and is held by the
            # gateway: the rebuild must not find the prompt's KV left on the kept hop.
            held = pool.submit(stream_completion, state.gateway_url, "Hello edge", 6)
            _wait_until_broken(state.gateway_url)
            second = pipeline.deploy(backend, str(TINY_SCENARIO), scenario.model, plan, state,
                                     switch_mode="replay", old_chain_broken=True, progress=print)  # fmt: skip
            state = second.state
            assert held.result(timeout=120).text == before.text
        # Started cold or loaded into the node's standby: either way the one new server.
        assert [(e.node, e.first, e.end) for e in second.started] == [(dead.node, dead.first, dead.end)]
        assert state.segments[:-1] == first.state.segments[:-1]  # the very same live servers
        assert second.stopped == (dead,)
        after = stream_completion(state.gateway_url, "Hello edge", 6)
        assert after.text == before.text
    finally:
        pipeline.teardown(backend, state)
        for e in state.standbys:
            backend.stop_segment(e)


def _wait_until_broken(gateway_url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        answer = httpx.get(f"{gateway_url}/admin/chain", timeout=5, headers=admin_headers())
        if answer.raise_for_status().json().get("broken"):
            return
        time.sleep(0.1)
    raise AssertionError("the gateway never saw its chain break")
