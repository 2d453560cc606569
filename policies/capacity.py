"""How many sessions a plan serves at once within its SLO: the gateway's admission limit (pure).

Past that many sessions generating together, one more slows every session beyond the TTFT or TPOT bound
(the stages and links are shared: a closed queueing network, ``policies.contention``), or its KV cache
does not fit a node's memory. The gateway then refuses new requests with 429 rather than letting every
admitted session miss its SLO (``segments.gateway``, ``Gateway.admit``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from policies.analytic import violations
from policies.calibration import Calibration
from policies.plan import Stage
from policies.problem import Problem

# The bound a search for the limit stops at (the segment servers' default ``max_sessions``).
MOST_SESSIONS = 256
# Requests a measured limit rests on: its p95 is then the largest but one of them.
MIN_SERVED = 20
# The constraints that grow with the sessions served at once.
_LOAD_BOUND = frozenset({"memory", "max_ttft", "max_tpot"})


def at_concurrency(problem: Problem, sessions: int) -> Problem:
    """``problem`` with ``sessions`` generating at once: their KV in memory, their steps in the queues.
    The queues are the calibrated model's (an uncalibrated problem gets the default calibration, whose
    plain sums would price every count alike), and a measured concurrency gives way to the one asked."""
    workload = problem.workload.model_copy(update={"concurrent_sessions": sessions})
    calibration = (problem.calibration or Calibration()).model_copy(update={"concurrency": None})
    return problem.model_copy(update={"workload": workload, "calibration": calibration})


def within_slo(problem: Problem, stages: Sequence[Stage], sessions: int) -> bool:
    """Whether ``sessions`` at once keep the plan within memory and the TTFT and TPOT bounds."""
    broken = violations(at_concurrency(problem, sessions), stages)
    return not any(v.constraint in _LOAD_BOUND for v in broken)


def sessions_within_slo(problem: Problem, stages: Sequence[Stage], most: int = MOST_SESSIONS) -> int:
    """The most sessions at once for which ``stages`` stay within memory and ``problem``'s TTFT and TPOT
    bounds (``Constraints.max_ttft_s``, ``max_tpot_s``), found by bisection (the predictions grow with
    the sessions). ``most`` when nothing binds below it; 1 when even one session breaks a bound: serving
    one at a time, as slowly as the plan must, beats refusing everyone."""
    if within_slo(problem, stages, most):
        return most
    low, high = 1, most  # low: within (or the floor), high: beyond
    while high - low > 1:
        mid = (low + high) // 2
        if within_slo(problem, stages, mid):
            low = mid
        else:
            high = mid
    return low


@dataclass(frozen=True)
class Served:
    """One request as the gateway served it (``segments.gateway``, ``GET /admin/telemetry``)."""

    ended_at_s: float  # wall clock
    ttft_s: float  # from when it began to generate to its first token
    tpot_s: float | None  # its mean token gap (None: one token)
    live: float  # the sessions generating at once, on average over its tokens

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Served:
        tpot = data.get("tpot_s")
        return cls(
            ended_at_s=float(data["ended_at_s"]),  # type: ignore[arg-type]
            ttft_s=float(data["ttft_s"]),  # type: ignore[arg-type]
            tpot_s=None if tpot is None else float(tpot),  # type: ignore[arg-type]
            live=float(data["live"]),  # type: ignore[arg-type]
        )


def _p95(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def measured_limit(
    served: Sequence[Served], slo_ttft_s: float | None, slo_tpot_s: float | None, least: int = MIN_SERVED
) -> int | None:
    """The sessions at once that keep the p95 of what users measured inside the TTFT and TPOT bounds, from
    ``served`` (None: fewer than ``least`` requests, or no bound set).

    The model's limit (``sessions_within_slo``) bounds the mean, and a user's p95 lies above it; nor does
    the model price everything that shares the hosts. So the limit is also measured: a chain serving
    at its capacity has a fixed rate of steps, and each session's gap and wait grow in proportion to the
    sessions that share it; the sessions met times bound over p95 is what keeps the p95 at the bound.
    Below capacity the gaps grow less than that, and the estimate is low but never below the sessions
    met while their p95 was within the bounds: measured again at the new limit, it climbs towards the
    bound (the caller re-measures after each ``least`` requests, under the model's limit as a ceiling)."""
    if len(served) < least:
        return None
    live = sum(s.live for s in served) / len(served)
    ratios = []
    if slo_ttft_s is not None:
        ratios.append(slo_ttft_s / max(_p95([s.ttft_s for s in served]), 1e-6))
    gaps = [s.tpot_s for s in served if s.tpot_s is not None]
    if slo_tpot_s is not None and len(gaps) >= least:
        ratios.append(slo_tpot_s / max(_p95(gaps), 1e-6))
    if not ratios:
        return None
    return max(1, math.floor(live * min(ratios)))
