"""The pipeline steps on the local backend with the tiny model: real profiling processes, real segment
servers and gateway, real plan changes (no Prefect server needed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import TINY_SCENARIO

from flows import pipeline
from flows.measure import stream_completion
from flows.runtime import LocalBackend, set_local_link
from mecsplit.settings import get_settings
from policies import solve
from policies.plan import Plan
from testbed.scenario import load_scenario


@pytest.fixture()
def backend(flows_home: Path) -> LocalBackend:
    return LocalBackend(load_scenario(TINY_SCENARIO))


def _problem(backend: LocalBackend, *, max_age_s: float = 300.0):
    scenario = backend.scenario
    profiles = pipeline.profile_nodes(
        backend, backend.alive_nodes(), scenario.model, 8, max_age_s=max_age_s, progress=lambda _: None
    )
    probes = pipeline.profile_links(backend, scenario, set(profiles), progress=lambda _: None)
    return pipeline.build_problem(
        scenario, pipeline.model_facts(get_settings(), scenario.model, profiles), profiles, probes
    )


def test_profiles_are_measured_then_cached_until_stale(backend: LocalBackend) -> None:
    first = pipeline.profile_nodes(
        backend, ["device", "edge"], "llama-tiny", 8, max_age_s=300, progress=print
    )
    assert first["edge"]["layer_decode_s"] > 0
    # device has half a CPU: the local backend scales the host's measurement by its share
    assert first["device"]["layer_decode_s"] == pytest.approx(2 * first["edge"]["layer_decode_s"])
    again = pipeline.profile_nodes(
        backend, ["device", "edge"], "llama-tiny", 8, max_age_s=300, progress=print
    )
    assert again["edge"]["measured_at_s"] == first["edge"]["measured_at_s"]
    fresh = pipeline.profile_nodes(
        LocalBackend(backend.scenario), ["device", "edge"], "llama-tiny", 8, max_age_s=300, refresh=["edge"],
        progress=print,
    )  # fmt: skip
    assert fresh["edge"]["measured_at_s"] > first["edge"]["measured_at_s"]
    assert fresh["device"]["measured_at_s"] == first["device"]["measured_at_s"]
    # A node whose memory cannot hold the profiler keeps its profile, however old or asked to refresh.
    kept = pipeline.profile_nodes(
        LocalBackend(backend.scenario), ["device", "edge"], "llama-tiny", 8, max_age_s=0, refresh=["edge"],
        keep=["edge"], progress=print,
    )  # fmt: skip
    assert kept["edge"]["measured_at_s"] == fresh["edge"]["measured_at_s"]
    assert kept["device"]["measured_at_s"] > fresh["device"]["measured_at_s"]


def test_problem_respects_trust_and_link_changes(backend: LocalBackend) -> None:
    problem = _problem(backend)
    assert problem.num_layers == 4
    plan = solve(problem, "latency_dp")
    assert plan.stages[0].node in ("device", "edge")  # trusted_layers: 1; trust >= 2 on device and edge
    assert plan.stages[0].first == 0 and plan.stages[-1].end == 4
    set_local_link(get_settings(), "device", "edge", 0.05)
    slow = _problem(backend)
    assert {lk.bw_mbit for lk in slow.links if {lk.a, lk.b} == {"device", "edge"}} == {0.05}
    set_local_link(get_settings(), "device", "edge", 20)


def test_deploy_switch_and_teardown_keep_generation_exact(backend: LocalBackend) -> None:
    problem = _problem(backend)
    plan_a = solve(problem, "even")
    plan_b = solve(problem, "latency_dp")
    if plan_a.layout() == plan_b.layout():
        plan_b = solve(problem, "all_device")
    assert plan_a.layout() != plan_b.layout()
    first = pipeline.deploy(backend, str(TINY_SCENARIO), "llama-tiny", plan_a, None, progress=print)
    try:
        before = stream_completion(first.state.gateway_url, "Hello edge", 6)
        second = pipeline.deploy(
            backend, str(TINY_SCENARIO), "llama-tiny", plan_b, first.state, progress=print,
            switch_mode="push", recompute_hops=1,
        )  # fmt: skip
        assert Plan.model_validate(second.state.plan).layout() == plan_b.layout()
        # The gateway's measured switch comes back with the deployment (no live session at this point).
        report = second.switch_report
        assert report is not None and (report["mode"], report["recompute_hops"]) == ("push", 1)
        assert report["hops"] == len(plan_b.stages) and report["sessions"] == 0
        assert report["connect_s"] > 0 and report["tokens_prefilled"] == report["tokens_recomputed"] == 0
        assert second.state.revision == 1 and second.state.gateway_url == first.state.gateway_url
        # A stage both plans share keeps its server; every other old process is gone.
        kept = set(first.state.segments) & set(second.state.segments)
        assert {(e.node, e.first, e.end) for e in kept} == set(plan_a.layout()) & set(plan_b.layout())
        # The others stop, but for those kept as their node's warm standby.
        retained = set(second.state.standbys) & set(first.state.segments)
        assert set(second.stopped) == set(first.state.segments) - kept - retained
        for endpoint in second.stopped:
            with pytest.raises(ProcessLookupError):
                os.kill(int(endpoint.handle.removeprefix("pid:")), 0)
        after = stream_completion(second.state.gateway_url, "Hello edge", 6)
        assert after.text == before.text  # greedy: the same tokens on the new split
        state = second.state
    except BaseException:
        pipeline.teardown(backend, first.state)
        raise
    pipeline.teardown(backend, state)
    for endpoint in state.segments:
        with pytest.raises(ProcessLookupError):
            os.kill(int(endpoint.handle.removeprefix("pid:")), 0)


def test_a_segment_server_gets_the_batching_setting_as_a_flag() -> None:
    """A testbed container's environment is only what it is given: batching travels on the command line."""
    from flows.runtime import SegmentRequest, _server_command
    from mecsplit.settings import SegmentSettings, Settings

    settings = Settings(segments=SegmentSettings(max_batch=8))
    command = _server_command(settings, SegmentRequest("edge", "llama-tiny", 0, 2, 1), "0.0.0.0", 1, "/tls")
    assert command[command.index("--max-batch") + 1] == "8"
