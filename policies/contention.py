"""Per-token latency of ``k`` concurrent sessions on one chain: mean value analysis with CPU quotas (pure).

Every session decodes in a ring (gateway -> stages -> gateway), one token at a time, so ``k`` sessions are
``k`` customers of a closed queueing network: each stage's compute and each link's serialisation is a
single-server station (one compute thread per segment, one queue per link direction), while propagation
delay and per-hop software cost are pure delays. Exact mean value analysis (MVA, Reiser and Lavenberg
1980) gives the cycle time, which is the per-token latency every session sees: for ``k = 1`` the plain
sum of the demands, for large ``k`` ``k`` times the largest one.

Two departures from textbook MVA, both measured on the testbed:
- A session's requests mix one prefill (a long step) with many decode steps, and a decode step queued
  behind another session's prefill waits for all of it: the customers already queued are counted with
  their mean demand per step (prefill share included), the arriving decode step with its own demand.
- A node's CPU quota (a container's ``--cpus``) lets it run at full speed in bursts but caps its CPU
  time over every quota period: over the long run its work cannot exceed its share ``s``, so a
  session's gap between two tokens is at least its own step's work plus the other sessions' (``k - 1``
  mean steps, prefills included), over ``s``. Measured: SmolLM2 whole on a 0.5-CPU node, 72 ms CPU
  per token, gaps of 158 ms (bound: 144 ms plus the gateway's work on the same node); the same node
  running 2 of 30 layers runs at full speed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Station:
    """``decode_s``: what one decode step spends here; ``mean_s``: the mean over a request's steps (its
    prefill included), which is what a queued customer holds the station for. ``queue``: False for a
    pure delay (no waiting for others)."""

    name: str
    decode_s: float
    mean_s: float
    queue: bool = True


@dataclass(frozen=True)
class Quota:
    """A node's CPU budget: ``decode_cpu_s`` of CPU per decode step and ``mean_cpu_s`` per step over a
    request (its prefill included) against ``share`` cores."""

    node: str
    decode_cpu_s: float
    mean_cpu_s: float
    share: float
    stretch: float = 1.0  # learned: how much slower than the share alone allows (calibration)

    def bound_s(self, sessions: int) -> float:
        """The least time between two decode steps of one session: the quota must cover its own decode
        step and what the other sessions' steps take meanwhile (their prefills included; its own prefill
        falls before its first token, outside the gaps)."""
        if self.share <= 0:
            return 0.0
        return (self.decode_cpu_s + (sessions - 1) * self.mean_cpu_s) * self.stretch / self.share


def cycle_time_s(stations: Sequence[Station], sessions: float, quotas: Sequence[Quota] = ()) -> float:
    """Per-token latency of each of ``sessions`` closed-loop sessions; a measured, fractional number of
    sessions interpolates between its two neighbours."""
    if sessions < 1:
        raise ValueError("sessions must be >= 1")
    low = math.floor(sessions)
    if sessions > low:
        share = sessions - low
        return (1 - share) * cycle_time_s(stations, low, quotas) + share * cycle_time_s(
            stations, low + 1, quotas
        )
    sessions = int(sessions)
    seen, busy = _state(stations, sessions - 1)
    cycle = sum(_response(s, s.decode_s, q, u) for s, q, u in zip(stations, seen, busy, strict=True))
    bound = max((q.bound_s(sessions) for q in quotas), default=0.0)
    return max(cycle, bound)


def _response(station: Station, own_s: float, queued: float, busy: float) -> float:
    """What a step spends at a station finding ``queued`` customers there, one of them in service with
    probability ``busy``: a step's service is near constant (a fixed layer range, a fixed frame size), so
    the one in service has half its service left on average, not all of it (the exponential service
    textbook MVA assumes over-states the wait: SmolLM2 with 2 sessions, 0.80-0.94 of the prediction)."""
    if not station.queue:
        return own_s
    return own_s + station.mean_s * max(0.0, queued - busy / 2)


def _state(stations: Sequence[Station], customers: int) -> tuple[list[float], list[float]]:
    """(mean customers, utilisation) of each station with ``customers`` in the network."""
    queue_len = [0.0] * len(stations)
    busy = [0.0] * len(stations)
    for n in range(1, customers + 1):
        resp = [_response(s, s.mean_s, q, u) for s, q, u in zip(stations, queue_len, busy, strict=True)]
        total = sum(resp)
        if total <= 0:
            return [0.0] * len(stations), [0.0] * len(stations)
        throughput = n / total
        queue_len = [throughput * r if s.queue else 0.0 for s, r in zip(stations, resp, strict=True)]
        busy = [min(1.0, throughput * s.mean_s) if s.queue else 0.0 for s in stations]
    return queue_len, busy


def queue_lengths(stations: Sequence[Station], customers: float) -> list[float]:
    """Mean customers at each station with ``customers`` in the network (MVA on the mean demands): what
    an arriving step finds there (the arrival theorem); fractional: interpolated."""
    low = math.floor(customers)
    if customers > low:
        share = customers - low
        a, b = queue_lengths(stations, low), queue_lengths(stations, low + 1)
        return [(1 - share) * x + share * y for x, y in zip(a, b, strict=True)]
    return _state(stations, int(customers))[0]


def bottleneck_s(stations: Sequence[Station], quotas: Sequence[Quota] = ()) -> float:
    """The busiest resource's time per token (1 / saturated throughput)."""
    busy = [s.mean_s for s in stations if s.queue]
    busy += [q.mean_cpu_s * q.stretch / q.share for q in quotas if q.share > 0]
    return max(busy, default=0.0)
