"""How many sessions a plan serves at once within its SLO: the gateway's admission limit (pure).

Past that many sessions generating together, one more slows every session beyond the TTFT or TPOT bound
(the stages and links are shared: a closed queueing network, ``policies.contention``), or its KV cache
does not fit a node's memory. The gateway then refuses new requests with 429 rather than letting every
admitted session miss its SLO (``segments.gateway``, ``Gateway.admit``).
"""

from __future__ import annotations

from collections.abc import Sequence

from policies.analytic import violations
from policies.calibration import Calibration
from policies.plan import Stage
from policies.problem import Problem

# The bound a search for the limit stops at (the segment servers' default ``max_sessions``).
MOST_SESSIONS = 256
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
