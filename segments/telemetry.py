"""Step telemetry: where each forward step's time went, measured in place on every hop.

A traced FORWARD frame carries ``t0`` (the client's wall clock when it sent the step) and ``trace``: each
hop appends one entry ``[first, arrived_ms, queue_ms, compute_ms, cpu_ms, left_ms, bytes_in]`` (times in
milliseconds after ``t0``): when the frame had fully arrived, how long it waited for the compute thread,
how long its compute took on the wall clock and in CPU time of the compute thread (the two differ when the
node's CPU quota throttles it or other work preempts it), when the hop sent its output on, and the wire
size of the frame it received. The last hop copies the trace into its RESULT.

From one traced step the client derives (:class:`StepTrace`) each stage's queue, compute and CPU time and
each hop's wire time (arrival at the next hop minus departure from this one, software on both ends
included). Wire times compare wall clocks of two processes, exact where they share a clock (one host:
the testbed, the local backend); on separate hosts they are as good as the hosts' clock sync, and a
negative value (skew) is reported as 0.

Kept compact on purpose: about 45 bytes of JSON per hop per step, which a 1 Mbit/s link sends in 0.4 ms.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Entries a FORWARD may carry: a chain is never longer than its model's layers, and this bounds what a
# hostile peer can make a server copy.
MAX_TRACE_ENTRIES = 256
TRACE_FIELDS = 7


class TraceError(ValueError):
    """A ``trace`` or ``t0`` header that is not what a hop appends."""


def check_trace(header: dict[str, Any]) -> tuple[float, list[list[float]]] | None:
    """``(t0, entries)`` of a traced frame, ``None`` for an untraced one; :class:`TraceError` if malformed."""
    t0 = header.get("t0")
    if t0 is None:
        return None
    if not isinstance(t0, int | float) or isinstance(t0, bool) or not math.isfinite(t0):
        raise TraceError("t0 must be a finite number (the client's send time)")
    raw = header.get("trace", [])
    if not isinstance(raw, list) or len(raw) >= MAX_TRACE_ENTRIES:
        raise TraceError(f"trace must be a list of fewer than {MAX_TRACE_ENTRIES} entries")
    for entry in raw:
        if (
            not isinstance(entry, list)
            or len(entry) != TRACE_FIELDS
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in entry)
        ):
            raise TraceError(f"each trace entry is a list of {TRACE_FIELDS} numbers")
    return float(t0), raw


@dataclass(frozen=True)
class HopStamp:
    """What one hop measured of one step (wall times as ``time.time()``, durations in seconds)."""

    first: int
    arrived_s: float
    queue_s: float
    compute_s: float
    cpu_s: float
    left_s: float
    bytes_in: int

    def entry(self, t0: float) -> list[float]:
        ms = 1e3
        return [
            self.first,
            round((self.arrived_s - t0) * ms, 3),
            round(self.queue_s * ms, 3),
            round(self.compute_s * ms, 3),
            round(self.cpu_s * ms, 3),
            round((self.left_s - t0) * ms, 3),
            self.bytes_in,
        ]


@dataclass(frozen=True)
class StageTime:
    hop: str  # host:port of the segment server
    first: int
    end: int
    queue_s: float
    compute_s: float
    cpu_s: float


@dataclass(frozen=True)
class WireTime:
    """One transfer of the step: client -> hop 0, hop k -> hop k+1, last hop -> client."""

    bytes: int
    wire_s: float


@dataclass(frozen=True)
class StepTrace:
    positions: int  # tokens in the step: 1 for a decode step, the prompt for a prefill
    stages: tuple[StageTime, ...]
    wires: tuple[WireTime, ...]  # len(stages) + 1
    total_s: float  # client send -> result received

    @classmethod
    def from_wire(
        cls,
        *,
        positions: int,
        t0: float,
        received_s: float,
        sent_bytes: int,
        result_bytes: int,
        entries: Sequence[Sequence[float]],
        hops: Sequence[tuple[str, int, int]],
    ) -> StepTrace | None:
        """The step's breakdown from the RESULT's trace; ``None`` where the trace does not match the hops
        (a step that a switch moved mid-way, or an untraced server)."""
        if len(entries) != len(hops) or not entries:
            return None
        stages = []
        wires = []
        previous_left_s = 0.0
        for k, (entry, (hop, first, end)) in enumerate(zip(entries, hops, strict=True)):
            e_first, arrived, queue, compute, cpu, left, bytes_in = entry
            if int(e_first) != first:
                return None
            wire_s = max(0.0, (arrived - previous_left_s) / 1e3)
            wires.append(WireTime(sent_bytes if k == 0 else int(bytes_in), wire_s))
            stages.append(StageTime(hop, first, end, queue / 1e3, compute / 1e3, cpu / 1e3))
            previous_left_s = left
        total_s = received_s - t0
        wires.append(WireTime(result_bytes, max(0.0, total_s - previous_left_s / 1e3)))
        return cls(positions, tuple(stages), tuple(wires), total_s)

    def to_dict(self) -> dict[str, Any]:
        return {
            "positions": self.positions,
            "total_s": round(self.total_s, 6),
            "stages": [
                [s.hop, s.first, s.end, round(s.queue_s, 6), round(s.compute_s, 6), round(s.cpu_s, 6)]
                for s in self.stages
            ],
            "wires": [[w.bytes, round(w.wire_s, 6)] for w in self.wires],
        }


@dataclass(frozen=True)
class StepRecord:
    """One traced step as the gateway keeps it: which session, on which chain, and what it cost."""

    seq: int
    at_s: float  # wall clock when the result arrived
    generation: int  # the client's chain generation (changes at every switch)
    session: str
    idle_s: float  # time the session spent outside the chain since its previous step's result
    trace: StepTrace

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "at_s": round(self.at_s, 6),
            "generation": self.generation,
            "session": self.session,
            "idle_s": round(self.idle_s, 6),
            **self.trace.to_dict(),
        }


class Telemetry:
    """The gateway's window of recent traced steps and its own CPU use (read by ``/admin/telemetry``).

    Bounded (``capacity`` steps); a reader asks for the steps after the last ``seq`` it saw. The
    gateway's process CPU time and token count let the reader price the source node's own per-token work.
    """

    def __init__(self, capacity: int = 4096) -> None:
        self._records: deque[StepRecord] = deque(maxlen=capacity)
        self._seq = 0
        self.tokens = 0
        self._last_result_s: dict[str, float] = {}

    def step_started(self, session: str) -> float:
        """Seconds ``session`` spent outside the chain since its previous result (0 for its first step)."""
        previous = self._last_result_s.get(session)
        return 0.0 if previous is None else max(0.0, time.time() - previous)

    def record(self, session: str, generation: int, idle_s: float, trace: StepTrace | None) -> None:
        now = time.time()
        self._last_result_s[session] = now
        self.tokens += 1
        if trace is None:
            return
        self._seq += 1
        self._records.append(StepRecord(self._seq, now, generation, session, idle_s, trace))

    def forget(self, session: str) -> None:
        self._last_result_s.pop(session, None)

    def since(self, seq: int, limit: int = 2048) -> list[StepRecord]:
        return [r for r in self._records if r.seq > seq][:limit]

    def snapshot(self, seq: int) -> dict[str, Any]:
        records = self.since(seq)
        return {
            "seq": self._seq,
            "at_s": time.time(),
            "process_cpu_s": time.process_time(),
            "tokens": self.tokens,
            "records": [r.to_dict() for r in records],
        }
