"""Reaction timing and warm standbys: the per-step timing, which nodes get a standby, link rates taken
from the event, and a standby claimed by the next deploy (real segment processes, tiny model)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from conftest import TINY_SCENARIO

from flows import pipeline
from flows.measure import stream_completion
from flows.reaction import medians
from flows.runtime import LinkProbe, LocalBackend, RuntimeFailure, standby_range
from flows.state import DeploymentState, Endpoint
from mecsplit.process import pid_alive
from mecsplit.settings import get_settings
from policies import solve
from policies.plan import Metrics, Plan, Stage
from testbed.scenario import load_scenario

SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"


def test_reaction_timing_splits_the_time_between_the_stamps() -> None:
    stamps = {"changed": 100.0, "event": 100.5, "run_started": 102.0, "body": 102.5, "profiled": 102.7,
              "decided": 102.8, "ready": 104.8, "switched": 105.3, "first_token": 105.6}  # fmt: skip
    steps = pipeline.reaction_timing(stamps)
    assert steps["detection_s"] == pytest.approx(0.5)
    assert steps["event_to_run_start_s"] == pytest.approx(1.5)
    assert steps["deploy_s"] == pytest.approx(2.0)
    assert steps["first_token_s"] == pytest.approx(0.3)
    assert steps["end_to_end_s"] == pytest.approx(5.6) and steps["end_to_end_from"] == "changed"
    named = [steps[name] for name in pipeline.REACTION_STEPS]
    assert sum(named) == pytest.approx(steps["end_to_end_s"])  # the steps tile the whole reaction


def test_reaction_timing_without_the_change_counts_from_the_event() -> None:
    steps = pipeline.reaction_timing({"event": 10.0, "run_started": 12.0, "first_token": 15.0})
    assert steps["detection_s"] is None and steps["profile_s"] is None
    assert steps["end_to_end_s"] == pytest.approx(5.0) and steps["end_to_end_from"] == "event"


def test_medians_skip_missing_steps() -> None:
    runs: list[dict[str, Any]] = [{"deploy_s": 1.0, "end_to_end_s": 5.0}, {"deploy_s": 3.0},
                                  {"deploy_s": 2.0, "end_to_end_s": None}]  # fmt: skip
    out = medians(runs)
    assert out["deploy_s"] == 2.0 and out["end_to_end_s"] == 5.0 and out["switch_s"] is None


def test_standby_range_holds_neither_embeddings_nor_head() -> None:
    assert standby_range(30) == (15, 16)
    assert standby_range(4) == (2, 3)
    assert standby_range(2) == (0, 1)


SMOLLM2 = {"num_layers": 30, "layer_weight_bytes": [14_160_384] * 30, "embed_weight_bytes": 113_246_208,
           "head_weight_bytes": 113_248_512}  # fmt: skip


def test_standbys_only_where_memory_holds_them() -> None:
    """Default scenario, SmolLM2's sizes: the edge (1024 MiB) holding 28 layers and the head has no room
    for one; the device (1536 MiB) with two layers and the gateway has; a node with nothing has."""
    scenario = load_scenario(SCENARIOS / "default.yaml")
    alive = ["device", "edge", "cloud"]
    layout = [("device", 0, 2), ("edge", 2, 30)]
    assert pipeline.standby_nodes(scenario, alive, layout, SMOLLM2) == ["device", "cloud"]
    assert pipeline.standby_nodes(scenario, ["device", "edge"], layout, SMOLLM2) == ["device"]
    # After the drop the device runs the gateway and the whole model: with the libraries, one more
    # process (1641 MiB in all) no longer fits its 1536 MiB.
    whole = [("device", 0, 30)]
    assert pipeline.standby_nodes(scenario, alive, whole, SMOLLM2) == ["edge", "cloud"]
    assert not pipeline._fits(scenario, "device", SMOLLM2, [(0, 30), (0, 2)])


def test_node_memory_counts_shared_weights_once() -> None:
    """Servers map their weights from the store: two servers of one node holding overlapping ranges cost
    two processes and the union of their layers. A standby touches none of its weights until it is
    claimed, and then the stage it replaces stops: the device preloads the whole model (the fallback of
    a collapsing link) beside its split stage, though the two serving at once would not fit."""
    scenario = load_scenario(SCENARIOS / "default.yaml")
    both = pipeline.node_bytes(scenario, "device", SMOLLM2, [(0, 2), (0, 30)])
    whole = pipeline.node_bytes(scenario, "device", SMOLLM2, [(0, 30)])
    assert both - whole == pipeline.PROCESS_OVERHEAD_BYTES  # the split stage adds its process only
    assert both > 1536 * 1024 * 1024
    # So after the drop the old split stage is not kept beside the whole model; after the recovery the
    # whole-model server is, idle, as the next drop's fallback.
    alive = ["device", "edge", "cloud"]
    split, whole = _state([("device", 0, 2), ("edge", 2, 30)], []), _state([("device", 0, 30)], [])
    after_drop = pipeline.retained_servers(scenario, alive, [("device", 0, 30)], SMOLLM2, split.segments, {})
    assert after_drop == {"edge": split.segments[1]}
    after_recovery = pipeline.retained_servers(
        scenario, alive, [("device", 0, 2), ("edge", 2, 30)], SMOLLM2, whole.segments, {}
    )
    assert after_recovery == {"device": whole.segments[0]}
    assert pipeline.standby_span(scenario, "device", [("device", 0, 2), ("edge", 2, 30)], SMOLLM2) == (0, 30)
    assert pipeline.standby_span(scenario, "edge", [("device", 0, 2), ("edge", 2, 30)], SMOLLM2) == (15, 16)


def _state(segments: list[tuple[str, int, int]], standbys: list[tuple[str, int, int]]) -> DeploymentState:
    def endpoint(node: str, first: int, end: int, port: int) -> Endpoint:
        return Endpoint(node=node, first=first, end=end, host="10.0.0.1", port=port, handle=f"h{port}")

    return DeploymentState(
        scenario="scenarios/smart-city.yaml", model="smollm2-135m", backend="testbed", revision=1, plan={},
        segments=tuple(endpoint(*s, 9000 + i) for i, s in enumerate(segments)),
        standbys=tuple(endpoint(*s, 9100 + i) for i, s in enumerate(standbys)),
        gateway_url="http://10.0.0.1:8000", gateway_handle="g", secret="s", updated_at_s=0.0,
    )  # fmt: skip


def test_the_profiler_runs_only_where_memory_holds_it_beside_the_deployment() -> None:
    """Smart city, SmolLM2's sizes: the camera (768 MiB) with the gateway and a standby has no room for the
    profiler's process and its embeddings and head (profiling there OOM-killed the gateway), nor with the
    gateway alone; the pole has none beside a stage but has when it serves nothing; the MEC site has."""
    scenario = load_scenario(SCENARIOS / "smart-city.yaml")
    serving = _state([("pole", 0, 14), ("mec", 14, 30)], [("cam", 15, 16), ("cloud", 15, 16)])
    fits = {n: pipeline.profiler_fits(scenario, n, SMOLLM2, serving) for n in ("cam", "pole", "mec", "cloud")}
    assert fits == {"cam": False, "pole": False, "mec": True, "cloud": True}
    bare = _state([("mec", 0, 30)], [])
    assert pipeline.profiler_fits(scenario, "pole", SMOLLM2, bare)
    assert not pipeline.profiler_fits(scenario, "cam", SMOLLM2, bare)


def test_a_move_fits_only_if_old_and_new_servers_fit_together() -> None:
    """Make-before-break on smart city: the camera (768 MiB) cannot start a new stage beside the gateway
    and an old stage (three processes: the OOM of the smart-city run); the pole can start one beside its
    old one; a standby takes its new stage and adds no process."""
    scenario = load_scenario(SCENARIOS / "smart-city.yaml")
    serving = _state([("pole", 0, 26), ("cam", 26, 30)], [("cloud", 15, 16)])
    full = pipeline.transition_overflow(scenario, serving, [("cam", 0, 2), ("mec", 2, 30)])
    assert full == ["cam would run 2 servers and the gateway at once (900 MiB of its own memory, 768 MiB)"]
    for fits in ([("pole", 0, 14), ("mec", 14, 30)], [("pole", 0, 26), ("cloud", 26, 30)]):
        assert pipeline.transition_overflow(scenario, serving, fits) == []


def test_the_chain_of_a_move_is_foreseen_only_where_no_stage_needs_a_load() -> None:
    """Default scenario after a decision: the device's whole-model standby serves the fallback as it is,
    so the gateway can prepare that chain; a stage that needs a range loaded or a new server cannot."""
    serving = _state([("device", 0, 5), ("edge", 5, 30)], [("device", 0, 30), ("cloud", 15, 16)])
    chain = pipeline.foreseen_chain(serving, [("device", 0, 30)])
    assert chain == {
        "model": "smollm2-135m",
        "hops": [{"host": "10.0.0.1", "port": 9100, "first": 0, "end": 30}],
    }
    kept = pipeline.foreseen_chain(serving, [("device", 0, 5), ("edge", 5, 30)])
    assert kept is not None and [h["port"] for h in kept["hops"]] == [9000, 9001]
    assert pipeline.foreseen_chain(serving, [("device", 0, 5), ("cloud", 5, 30)]) is None
    assert pipeline.switch_of({"cost": {"kv_mode": "recompute"}}) == ("replay", 0)
    assert pipeline.switch_of({"cost": {"kv_mode": "move", "recompute_stages": 1}}) == ("push", 1)


class _CountingBackend(LocalBackend):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.probed: list[str] = []

    def probe_link(self, a: str, b: str) -> LinkProbe:
        self.probed.append(f"{a}-{b}")
        return super().probe_link(a, b)


def test_a_link_event_reuses_recent_probes_and_takes_the_events_rate(flows_home: Path) -> None:
    backend = _CountingBackend(load_scenario(TINY_SCENARIO))
    alive = {"device", "edge", "cloud"}
    pipeline.profile_links(backend, backend.scenario, alive, progress=print)
    assert backend.probed == ["device-edge", "edge-cloud"]
    probes = pipeline.profile_links(
        backend, backend.scenario, alive, progress=print, max_age_s=300, known_bw_mbit={"device-edge": 0.1}
    )
    assert backend.probed == ["device-edge", "edge-cloud"]  # nothing probed again
    by_key = {f"{p.a}-{p.b}": p for p in probes}
    assert by_key["device-edge"].bw_mbit == 0.1 and by_key["device-edge"].rtt_ms == 10.0
    assert by_key["edge-cloud"].bw_mbit == 50.0
    pipeline.profile_links(backend, backend.scenario, alive, progress=print, max_age_s=0)
    assert backend.probed.count("edge-cloud") == 2  # max age 0: always probed
    # A node event: that node's links are probed again, the others keep their recent probe.
    backend.probed.clear()
    pipeline.profile_links(
        backend, backend.scenario, alive, progress=print, max_age_s=300, reprobe_nodes=frozenset({"cloud"})
    )
    assert backend.probed == ["edge-cloud"]


def _alive(endpoint: Endpoint) -> bool:
    return pid_alive(int(endpoint.handle.removeprefix("pid:")))


def test_the_next_deploy_loads_its_range_into_a_warm_standby(flows_home: Path) -> None:
    """Real processes: the first deploy leaves a standby on each node with room; the second deploy loads
    its stages into them (same processes, no cold start), keeps generation exact, and tops them up."""
    backend = LocalBackend(load_scenario(TINY_SCENARIO))
    scenario = backend.scenario
    profiles = pipeline.profile_nodes(backend, backend.alive_nodes(), scenario.model, 8, max_age_s=300)
    probes = pipeline.profile_links(backend, scenario, set(profiles))
    problem = pipeline.build_problem(
        scenario, pipeline.model_facts(get_settings(), scenario.model, profiles), profiles, probes
    )
    plan_a = Plan.model_validate(solve(problem, "even").model_dump())
    # Device keeps the trusted first layer (its memory leaves no room for a standby next to the gateway);
    # the rest moves to the edge, which has one.
    plan_b = plan_a.model_copy(update={"stages": (Stage(node="device", first=0, end=1),
                                                  Stage(node="edge", first=1, end=4))})  # fmt: skip
    first = pipeline.deploy(backend, str(TINY_SCENARIO), "llama-tiny", plan_a, None, progress=print)
    state = first.state
    try:
        assert state.standbys, "no standby was started"
        # Every stage started cold, and each node's start is remembered for pricing the next move there.
        assert set(state.starts) == {s.node for s in plan_a.stages}
        assert all(0.0 < s.took_s < 180.0 and s.ended_at_s <= time.time() for s in state.starts.values())
        assert len({e.node for e in state.standbys}) == len(state.standbys)  # at most one per node
        before = stream_completion(state.gateway_url, "Hello edge", 6)
        for standby in state.standbys:
            pipeline.wait_ready(standby, state.secret, 120)
        offered = {e.node: e for e in state.standbys}
        started = time.monotonic()
        second = pipeline.deploy(
            backend, str(TINY_SCENARIO), "llama-tiny", plan_b, state, progress=print,
            probe=lambda url: pipeline.first_token_at(url, "Hi"),
        )  # fmt: skip
        state = second.state
        took_s = time.monotonic() - started
        claimed = [n for n in second.claimed]
        assert claimed and set(claimed) <= set(offered)
        assert {n: state.starts[n] for n in claimed} == {n: first.state.starts[n] for n in claimed}
        for endpoint in second.started:
            if endpoint.node in claimed:  # the very process that stood by now serves the range
                assert endpoint.handle == offered[endpoint.node].handle
        assert second.ready_at_s <= second.switched_at_s <= (second.first_token_at_s or 0)
        after = stream_completion(state.gateway_url, "Hello edge", 6)
        assert after.text == before.text
        assert all(e.handle != offered[e.node].handle for e in state.standbys if e.node in claimed)
        print(f"second deploy with standbys: {took_s:.2f} s, claimed {claimed}")
    finally:
        pipeline.teardown(backend, state)
    for endpoint in (*state.segments, *state.standbys):
        assert not _alive(endpoint)


def test_a_plan_that_breaks_trust_is_refused_before_anything_starts(flows_home: Path) -> None:
    """The tiny scenario keeps layer 0 on trust >= 2 (device 3, edge 2, cloud 0). A plan that gives it to
    the cloud, whoever made it, is refused by deploy with the reason, and no server is started."""
    scenario = load_scenario(TINY_SCENARIO)
    assert pipeline.trust_breaches(scenario, [("device", 0, 1), ("cloud", 1, 4)], 4) == []
    with_head = scenario.model_copy(
        update={
            "constraints": scenario.constraints.model_copy(update={"trusted_head": True, "private_depth": 2})
        }
    )
    breaches = pipeline.trust_breaches(with_head, [("device", 0, 1), ("cloud", 1, 4)], 4)
    assert len(breaches) == 2 and "private_depth is 2" in breaches[0] and "head" in breaches[1]

    class NoStarts(LocalBackend):
        def start_segment(self, request: pipeline.SegmentRequest, secret: str) -> Endpoint:
            raise AssertionError("a server was started for a refused plan")

    backend = NoStarts(scenario)
    metrics = Metrics(ttft_s=0.1, tpot_s=0.1, throughput_tok_s=10, privacy_exposure=1, bottleneck_s=0.1,
                      request_latency_s=1.0)  # fmt: skip
    bad = Plan(
        stages=(Stage(node="cloud", first=0, end=4),), policy="hand", predicted=metrics, objective_value=0
    )
    with pytest.raises(RuntimeFailure, match=r"trust constraints: cloud \(trust 0 < 2\) would run layer 0"):
        pipeline.deploy(backend, str(TINY_SCENARIO), "llama-tiny", bad, None, progress=print)


@pytest.mark.parametrize(
    ("decision", "budget"),
    [({"gain_s": 16.5}, 16.5), ({"gain_s": float("inf")}, None), ({"gain_s": -1.0}, None), ({}, None)],
)
def test_a_moves_switch_may_take_what_the_move_was_adopted_to_gain(
    decision: dict[str, float], budget: float | None
) -> None:
    from flows.reconfigure import switch_budget_s

    assert switch_budget_s(decision) == budget
