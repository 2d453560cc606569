"""Routes over a partial topology, profile-based construction, the reference model's hops."""

from __future__ import annotations

import pytest

from policies import Link, Node, Problem, Stage, predict
from policies.calibration import Calibration
from policies.routes import all_routes, message_serialisation_s, serialisation_s


def _chain() -> Problem:
    nodes = [
        Node(name="dev", tier="device", speed_flops=1e9, mem_bytes=10**9),
        Node(name="mec", tier="mec", speed_flops=1e10, mem_bytes=10**9, trust=0.5),
        Node(name="cloud", tier="cloud", speed_flops=1e11, mem_bytes=10**10, trust=0.0),
    ]
    links = [Link(a="dev", b="mec", bw_mbit=100, rtt_ms=10), Link(a="mec", b="cloud", bw_mbit=50, rtt_ms=40)]
    return Problem.from_profiles(
        model_name="toy-measured",
        layer_weight_bytes=[1000, 1000, 1000, 1000],
        kv_bytes_per_token=8,
        hidden_bytes_per_token=100,
        nodes=nodes,
        links=links,
        source="dev",
        prefill_s={"dev": [0.01] * 4, "mec": [0.002] * 4},
        decode_s={"dev": [0.02] * 4, "mec": [0.004] * 4},
        layer_flops_per_token=[1e8] * 4,
    )


def test_multi_hop_route_sums_delay_and_takes_the_narrowest_link() -> None:
    r = all_routes(_chain()).get("dev", "cloud")
    assert r.nodes == ("dev", "mec", "cloud")
    assert r.delay_s == pytest.approx((10 + 40) / 2000)
    assert r.bw_mbit == 50


def _bursty(p: Problem, frame_bytes: int = 0) -> Problem:
    """The chain's links shaped like the testbed's: one 1514-byte frame or 2 ms at the rate."""
    links = tuple(lk.model_copy(update={"burst_bytes": 1514, "burst_s": 0.002}) for lk in p.links)
    model = p.model.model_copy(update={"frame_bytes": frame_bytes})
    return p.model_copy(update={"links": links, "model": model})


def test_a_message_is_slowed_only_by_its_bytes_beyond_the_narrowest_links_burst() -> None:
    p = _bursty(_chain().model_copy(update={"links": (
        Link(a="dev", b="mec", bw_mbit=0.4, rtt_ms=10), Link(a="mec", b="cloud", bw_mbit=50, rtt_ms=40),
    )}))  # fmt: skip
    r = all_routes(p).get("dev", "cloud")
    assert r.bw_mbit == 0.4 and r.free_bytes() == 1514  # the narrowest link's: 2 ms at 0.4 Mbit/s is 100 B
    assert message_serialisation_s(r, 1000) == 0.0
    assert message_serialisation_s(r, 3000) == pytest.approx(8 * (3000 - 1514) / 0.4e6)
    assert serialisation_s(r, 3000) == pytest.approx(8 * 3000 / 0.4e6)  # over time the rate holds
    # At 50 Mbit/s the burst is 2 ms of the rate.
    assert all_routes(p).get("mec", "cloud").free_bytes() == pytest.approx(0.002 * 50e6 / 8)


def test_a_links_rate_bounds_sessions_whose_messages_each_fit_its_burst() -> None:
    """One session's decode messages fit the burst and cross at line rate; four sessions' messages
    together exceed what the link carries in a cycle, and the cycle stretches to carry them."""
    base = _chain().model_copy(update={"links": (
        Link(a="dev", b="mec", bw_mbit=0.1, rtt_ms=10), Link(a="mec", b="cloud", bw_mbit=50, rtt_ms=40),
    )})  # fmt: skip
    p = _bursty(base, frame_bytes=400).model_copy(update={"calibration": Calibration()})
    stages = (Stage(node="dev", first=0, end=2), Stage(node="mec", first=2, end=4))
    plain = predict(p.model_copy(update={"links": base.links}), stages).tpot_s
    one = predict(p, stages).tpot_s
    up_s, down_s = 8 * (100 + 400) / 0.1e6, 8 * (4 + 400) / 0.1e6  # hidden state / token id, and frame
    assert one == pytest.approx(plain - up_s - down_s)
    assert one > up_s  # the link is not the bottleneck of one session
    many = p.model_copy(update={"calibration": Calibration(concurrency=4.0)})
    assert predict(many, stages).tpot_s >= 4 * up_s


def test_predict_includes_source_hops_and_uses_measured_or_flops_costs() -> None:
    p = _chain()
    m = predict(p, (Stage(node="mec", first=0, end=2), Stage(node="cloud", first=2, end=4)))
    prompt = p.workload.prompt_tokens
    to_mec = 0.005 + 8 * 4 / 100e6  # one token id dev -> mec
    mec_cloud = 0.020 + 8 * 100 / 50e6  # one hidden state mec -> cloud
    back = 0.025 + 8 * 4 / 50e6  # sampled token cloud -> dev (two hops)
    cloud_layer = 1e8 / 1e11  # no profile: flops / speed
    assert m.tpot_s == pytest.approx(to_mec + 2 * 0.004 + mec_cloud + 2 * cloud_layer + back)
    expected_ttft = (
        0.005
        + 8 * 4 * prompt / 100e6
        + prompt * 2 * 0.002
        + 0.020
        + 8 * 100 * prompt / 50e6
        + prompt * 2 * cloud_layer
        + back
    )
    assert m.ttft_s == pytest.approx(expected_ttft)
    assert m.bottleneck_s == pytest.approx(max(2 * 0.004, 2 * cloud_layer, 8 * 100 / 50e6, 8 * 4 / 100e6))
    # Exposure: mec (trust 0.5) sees raw input, cloud (trust 0) sees depth 2 of 4.
    assert m.privacy_exposure == pytest.approx(0.5 * 1.0 + 1.0 * 0.5)


def test_unreachable_node_is_never_used() -> None:
    p = _chain()
    lonely = Node(name="island", tier="edge", speed_flops=1e15, mem_bytes=10**12)
    p = Problem.model_validate({**p.model_dump(), "nodes": [*p.model_dump()["nodes"], lonely.model_dump()]})
    from policies import solve

    assert "island" not in solve(p, "latency_dp").nodes
