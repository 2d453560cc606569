"""The event detector: thresholds, hysteresis, consecutive samples (pure, no testbed needed)."""

from __future__ import annotations

import pytest

from testbed.events import (
    LINK_DEGRADED,
    LINK_RECOVERED,
    NODE_FAILED,
    NODE_OVERLOADED,
    NODE_RECOVERED,
    Detector,
    LinkSample,
    NodeSample,
    Thresholds,
)


def _feed_link(det: Detector, rates: list[float], nominal: float = 20.0) -> list[tuple[int, str]]:
    out = []
    for i, bw in enumerate(rates):
        out += [(i, e.event) for e in det.link(LinkSample("a-b", float(i), bw, nominal))]
    return out


def test_link_degrades_after_consecutive_samples_and_recovers() -> None:
    det = Detector(Thresholds(samples=3))
    events = _feed_link(det, [20, 10, 10, 10, 10, 19, 19, 19])
    assert events == [(3, LINK_DEGRADED), (7, LINK_RECOVERED)]


def test_noise_around_a_threshold_fires_nothing() -> None:
    det = Detector(Thresholds(samples=2))
    # Dips below 0.7 x 20 = 14 never last two samples; values between 14 and 18 are inside the band.
    assert _feed_link(det, [13, 15, 13, 16, 13, 17, 20, 13, 15]) == []


def test_hysteresis_band_keeps_a_degraded_link_degraded() -> None:
    det = Detector(Thresholds(samples=1))
    assert _feed_link(det, [10, 15, 16, 17]) == [(0, LINK_DEGRADED)]  # 17 < 0.9 x 20 = 18


def test_degraded_payload_names_rates_and_resource() -> None:
    det = Detector(Thresholds(samples=2))
    det.link(LinkSample("a-b", 0, 20, 20))
    det.link(LinkSample("a-b", 1, 5, 20))
    (event,) = det.link(LinkSample("a-b", 2, 4, 20, observed_mbit=3.9))
    assert event.resource_id == "mec.link.a-b"
    assert event.payload["bw_mbit"] == 4
    assert event.payload["previous_bw_mbit"] == 20
    assert event.payload["nominal_bw_mbit"] == 20


def test_node_failed_recovered_overloaded() -> None:
    det = Detector(Thresholds(samples=2, node_overloaded_pct=80, node_recovered_pct=50))
    seq = [
        (True, 10),
        (False, 0),
        (False, 0),
        (True, 10),
        (True, 90),
        (True, 95),
        (True, 70),
        (True, 40),
        (True, 30),
    ]
    events = []
    for i, (alive, cpu) in enumerate(seq):
        events += [(i, e.event) for e in det.node(NodeSample("n", float(i), alive, cpu))]
    assert events == [(1, NODE_FAILED), (3, NODE_RECOVERED), (5, NODE_OVERLOADED), (8, NODE_RECOVERED)]


def test_thresholds_must_leave_a_band() -> None:
    with pytest.raises(ValueError, match="hysteresis"):
        Thresholds(link_degraded_ratio=0.9, link_recovered_ratio=0.8)


def test_a_link_event_says_when_the_link_changed() -> None:
    from testbed.events import Detector, LinkSample

    d = Detector()
    events = [e for t in range(3) for e in d.link(LinkSample("a-b", t, 1.0, 20.0, 0.0, changed_at_s=1234.5))]
    assert [e.event for e in events] == ["mec.link.degraded"]
    assert events[0].payload["changed_at_s"] == 1234.5
    quiet = Detector()
    plain = [e for t in range(3) for e in quiet.link(LinkSample("a-b", t, 1.0, 20.0))]
    assert "changed_at_s" not in plain[0].payload
