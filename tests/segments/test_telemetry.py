"""Step telemetry: what the hops append, what the client derives, what a server refuses."""

from __future__ import annotations

import pytest

from segments.telemetry import HopStamp, StepTrace, Telemetry, TraceError, check_trace


def test_check_trace_accepts_what_hops_append_and_refuses_the_rest() -> None:
    assert check_trace({}) is None  # an untraced frame
    stamp = HopStamp(first=2, arrived_s=10.002, queue_s=0.001, compute_s=0.03, cpu_s=0.025, left_s=10.034,
                     bytes_in=2700)  # fmt: skip
    t0, entries = check_trace({"t0": 10.0, "trace": [stamp.entry(10.0)]}) or (None, [])
    assert t0 == 10.0 and entries == [[2, 2.0, 1.0, 30.0, 25.0, 34.0, 2700]]
    for bad in (
        {"t0": "now"},
        {"t0": float("inf")},
        {"t0": True},
        {"t0": 1.0, "trace": "x"},
        {"t0": 1.0, "trace": [[1, 2, 3]]},
        {"t0": 1.0, "trace": [[1, 2, 3, 4, 5, 6, "7"]]},
        {"t0": 1.0, "trace": [[0] * 7] * 300},
    ):
        with pytest.raises(TraceError):
            check_trace(bad)


def test_step_trace_splits_a_step_into_stages_and_wires() -> None:
    """Client sends at t0 = 100; hop [0, 2) gets it at +1 ms, computes 5 ms after 0.5 ms in queue, sends at
    +6.5; hop [2, 30) gets it at +12.5 (6 ms on the wire), computes 60 ms, answers at +73; the client has
    it at +80 (7 ms back)."""
    entries = [[0, 1.0, 0.5, 5.0, 4.5, 6.5, 400], [2, 12.5, 0.0, 60.0, 58.0, 73.0, 2700]]
    hops = [("h0:1", 0, 2), ("h1:2", 2, 30)]
    trace = StepTrace.from_wire(positions=1, t0=100.0, received_s=100.080, sent_bytes=390, result_bytes=220,
                                entries=entries, hops=hops)  # fmt: skip
    assert trace is not None
    assert [(s.first, s.end) for s in trace.stages] == [(0, 2), (2, 30)]
    assert [round(s.compute_s, 6) for s in trace.stages] == [0.005, 0.06]
    assert [round(s.cpu_s, 6) for s in trace.stages] == [0.0045, 0.058]
    assert [round(w.wire_s, 6) for w in trace.wires] == [0.001, 0.006, 0.007]
    assert [w.bytes for w in trace.wires] == [390, 2700, 220]
    assert trace.total_s == pytest.approx(0.080)
    # A trace that does not match the chain (a step moved mid-way) is not a measurement.
    assert StepTrace.from_wire(positions=1, t0=100.0, received_s=100.08, sent_bytes=1, result_bytes=1,
                               entries=entries[:1], hops=hops) is None  # fmt: skip
    assert StepTrace.from_wire(positions=1, t0=100.0, received_s=100.08, sent_bytes=1, result_bytes=1,
                               entries=entries, hops=[("h0:1", 0, 3), ("h1:2", 3, 30)]) is None  # fmt: skip


def test_clock_skew_never_gives_a_negative_wire() -> None:
    entries = [[0, -3.0, 0.0, 1.0, 1.0, -2.0, 100]]  # a hop whose clock runs 3 ms behind the client's
    trace = StepTrace.from_wire(positions=1, t0=5.0, received_s=5.01, sent_bytes=1, result_bytes=1,
                                entries=entries, hops=[("h:1", 0, 2)])  # fmt: skip
    assert trace is not None and all(w.wire_s >= 0 for w in trace.wires)


def test_the_gateways_window_gives_the_steps_after_a_cursor() -> None:
    tel = Telemetry(capacity=3)
    trace = StepTrace(1, (), (), 0.01)
    for _ in range(5):
        tel.record("s", 0, 0.001, trace)
    tel.record("s", 0, 0.001, None)  # an untraced step counts as a token, not as a record
    snap = tel.snapshot(0)
    assert snap["seq"] == 5 and snap["tokens"] == 6
    assert [r["seq"] for r in snap["records"]] == [3, 4, 5]  # bounded: the oldest went
    assert [r["seq"] for r in tel.snapshot(4)["records"]] == [5]
