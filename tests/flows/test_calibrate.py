"""Online calibration: traced steps mapped onto the plan's nodes teach the cost model what they cost."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import TINY_SCENARIO

from flows import pipeline
from flows.calibrate import LinkHistory, Snapshot, learn
from flows.runtime import LinkProbe
from policies.analytic import predict
from policies.calibration import STEP_CPU_S, Calibration
from policies.plan import Stage
from testbed.scenario import load_scenario

LAYERS = 8
LAYER_S = 0.004  # the profile's full-speed time per layer on every node
PROFILE = {
    "layer_decode_s": LAYER_S, "layer_decode_burst_s": LAYER_S, "layer_prefill_s_per_token": 0.001,
    "embed_decode_s": 0.0, "embed_decode_burst_s": 0.0, "head_decode_s": 0.0, "head_decode_burst_s": 0.0,
    "kv_bytes_per_token_per_layer": 512,
}  # fmt: skip


def _problem(testbed: bool = False, loads: dict[str, float] | None = None) -> Any:
    """The tiny scenario's problem; on the testbed its nodes have CPU quotas (``cpu_share``)."""
    scenario = load_scenario(TINY_SCENARIO)
    facts = pipeline.ModelFacts(
        name="synthetic", num_layers=LAYERS, hidden_size=64, layer_weight_bytes=(1000,) * LAYERS,
        embed_weight_bytes=0, head_weight_bytes=0, kv_bytes_per_token_per_layer=512,
    )  # fmt: skip
    profiles = {n.name: dict(PROFILE) for n in scenario.nodes}
    probes = [LinkProbe(lk.a, lk.b, lk.bw_mbit, 2 * lk.delay_ms, True) for lk in scenario.links]
    return pipeline.build_problem(
        scenario, facts, profiles, probes, testbed=testbed, loads=loads, calibration=Calibration()
    )


def _record(at_s: float, *, positions: int = 1, edge_cpu: float, edge_wait: float, overhead: float) -> dict:
    """A step on device[0, 2) -> edge[2, 8): the edge computes its 6 layers at ``edge_cpu`` x the profile,
    waits ``edge_wait`` more, and every transfer between the nodes pays ``overhead`` beyond propagation
    (5 ms) and serialisation (the bytes at 20 Mbit/s)."""
    dev = positions * 2 * LAYER_S + STEP_CPU_S
    edge = positions * 6 * LAYER_S * edge_cpu + STEP_CPU_S
    act = 2000 * positions

    def wire(nbytes: int, local: bool = False) -> float:
        return 0.001 if local else 0.005 + nbytes * 8 / 20e6 + overhead

    wires = [[50, wire(50, local=True)], [act, wire(act)], [60, wire(60)]]
    total = dev + edge + edge_wait + sum(w for _, w in wires)
    stages = [["dev:1", 0, 2, 0.0, dev, dev], ["edge:1", 2, 8, 0.0, edge + edge_wait, edge]]
    return {"positions": positions, "at_s": at_s, "idle_s": 0.002, "total_s": total, "stages": stages,
            "wires": wires}  # fmt: skip


def test_learn_recovers_compute_wait_and_hop_costs() -> None:
    problem = _problem()
    hop_nodes = {"dev:1": "device", "edge:1": "edge"}
    cal = Calibration()
    t = 1000.0
    for batch in range(40):
        records = []
        for i in range(12):
            t += 0.1
            records.append(
                _record(t, positions=30 if i == 0 else 1, edge_cpu=1.5, edge_wait=0.003, overhead=0.002)
            )
        snap = Snapshot(
            seq=batch, at_s=t, process_cpu_s=batch * 0.03, tokens=batch * 12, records=tuple(records)
        )
        cal = learn(cal, problem, hop_nodes, [snap])
    edge = cal.node("edge")
    assert edge.cpu_scale == pytest.approx(1.5, rel=0.02)
    assert edge.wait_s == pytest.approx(0.003, abs=3e-4)
    assert cal.hop_overhead("device", "edge") == pytest.approx(0.002, abs=3e-4)
    assert cal.hop_overhead("edge", "device") == pytest.approx(0.002, abs=3e-4)
    assert cal.hop_slope("device", "edge") == pytest.approx(1.0, rel=0.05)
    assert cal.source_idle_s == pytest.approx(0.002, rel=0.01)
    # The calibrated model now prices the plan as the steps went (one session: the plain sum).
    calibrated = problem.model_copy(update={"calibration": cal.model_copy(update={"concurrency": 1.0})})
    plan = [Stage(node="device", first=0, end=2), Stage(node="edge", first=2, end=8)]
    measured = _record(0, edge_cpu=1.5, edge_wait=0.003, overhead=0.002)
    assert predict(calibrated, plan).tpot_s == pytest.approx(measured["total_s"] + 0.002, rel=0.05)


def test_steps_beside_a_start_teach_the_node_nothing() -> None:
    """The edge's cgroup counts 0.9 of its core while the chain's steps use half of it and no background
    load runs: a process starts beside the stage. Its steps run slow (twice the profile) and are not
    learned; once the node's CPU is the steps' own, they are."""
    problem = _problem(testbed=True)
    hop_nodes = {"dev:1": "device", "edge:1": "edge"}

    def batch(seq: int, t: float) -> Snapshot:
        records = tuple(_record(t + 0.1 * i, edge_cpu=2.0, edge_wait=0.0, overhead=0.0) for i in range(12))
        return Snapshot(seq=seq, at_s=t + 1.2, process_cpu_s=0.0, tokens=12 * seq, records=records)

    steps_share = 6 * LAYER_S * 2.0 / 0.1  # the edge's CPU per step over the steps' spacing
    crowded = learn(
        Calibration(), problem, hop_nodes, [batch(1, 1000.0)], node_busy={"edge": steps_share + 0.4}
    )
    assert "edge" not in crowded.nodes and "device" in crowded.nodes
    alone = learn(
        Calibration(), problem, hop_nodes, [batch(1, 1000.0)], node_busy={"edge": steps_share + 0.05}
    )
    assert alone.node("edge").cpu_scale == pytest.approx(2.0, rel=0.05)


def test_a_loaded_node_teaches_its_pace_under_the_load_and_nothing_it_keeps_after() -> None:
    """Under a background load the edge's steps run slow and its transfers wait on it; learned into the
    unloaded coefficients, that would price the edge so after the load ended. Only the stretch of its
    pace at its quota (which only a load's pricing uses) is learned; the device is learned as always."""
    hop_nodes = {"dev:1": "device", "edge:1": "edge"}
    records = [_record(1000.0 + 0.1 * i, edge_cpu=2.0, edge_wait=0.05, overhead=0.02) for i in range(12)]
    snap = Snapshot(seq=1, at_s=1001.2, process_cpu_s=0.0, tokens=12, records=tuple(records))
    unloaded = learn(Calibration(), _problem(testbed=True), hop_nodes, [snap])
    loaded = learn(Calibration(), _problem(testbed=True, loads={"edge": 0.6}), hop_nodes, [snap])
    assert unloaded.node("edge").cpu_scale == pytest.approx(2.0, rel=0.05)
    assert "device>edge" in unloaded.hops
    edge = loaded.nodes["edge"]
    assert (edge.cpu_scale, edge.wait_s, edge.prefill_scale) == (1.0, 0.0, 1.0)
    assert edge.quota_stretch != 1.0  # the edge's steps use its whole share: the pace under the load
    assert not {"device>edge", "edge>device"} & set(loaded.hops)
    assert loaded.nodes["device"] == unloaded.nodes["device"]


def test_steps_of_servers_not_in_the_plan_are_not_learned() -> None:
    problem = _problem()
    records = [_record(1000.0 + i, edge_cpu=3.0, edge_wait=0.0, overhead=0.0) for i in range(10)]
    snap = Snapshot(seq=1, at_s=1010.0, process_cpu_s=0.0, tokens=10, records=tuple(records))
    cal = learn(Calibration(), problem, {"dev:1": "device"}, [snap])  # edge:1 belongs to an old chain
    assert "edge" not in cal.nodes and not cal.hops


def test_link_history_gives_the_rate_at_a_time() -> None:
    history = LinkHistory()
    for t, bw in ((10.0, 20.0), (11.0, 0.1), (12.0, 20.0)):
        history.add("a-b", t, bw)
    history.add("a-b", 11.5, 5.0)  # out of order: ignored
    assert history.rate_at("a-b", 10.5) == 20.0
    assert history.rate_at("a-b", 11.7) == 0.1
    assert history.rate_at("a-b", 9.0) == 20.0  # before the first sample: the first
    assert history.rate_at("c-d", 10.0) is None
    assert history.series("a-b", 11.0) == ([11.0, 12.0], [0.1, 20.0])


def test_a_transfer_across_a_rate_change_teaches_nothing() -> None:
    """Every prefill crosses a change of the link from 2 to 20 Mbit/s: its wire time went at 2 Mbit/s
    for the most part, and read against the 20 Mbit/s of its end it would teach a slope of about 10. The
    steps whose link held one rate teach the slope (1) as before."""
    problem = _problem()
    hop_nodes = {"dev:1": "device", "edge:1": "edge"}
    slow_at: set[float] = set()  # when a prefill began, at 2 Mbit/s

    def rate_at(a: str, b: str, t_s: float) -> float:
        return 2.0 if any(abs(t_s - slow) < 0.01 for slow in slow_at) else 20.0

    cal, t = Calibration(), 1000.0
    for batch in range(40):
        records = []
        for i in range(12):
            t += 0.1
            record = _record(t, positions=30 if i == 0 else 1, edge_cpu=1.0, edge_wait=0.0, overhead=0.002)
            if i == 0 and batch % 2:  # this prefill's link went from 2 to 20 Mbit/s during the step
                nbytes, wire_s = record["wires"][1]
                record["wires"][1] = [nbytes, wire_s + 9 * nbytes * 8 / 20e6]
                record["total_s"] += 9 * nbytes * 8 / 20e6
                slow_at.add(t - record["total_s"])
            records.append(record)
        snap = Snapshot(
            seq=batch, at_s=t, process_cpu_s=batch * 0.03, tokens=batch * 12, records=tuple(records)
        )
        cal = learn(cal, problem, hop_nodes, [snap], rate_at=rate_at)
    assert cal.hop_slope("device", "edge") == pytest.approx(1.0, rel=0.05)
