"""The admission limit: the most sessions a plan serves at once within its SLO and memory."""

from __future__ import annotations

from pathlib import Path

from policies import Problem, predict, solve
from policies.calibration import Calibration
from policies.capacity import (
    MIN_SERVED,
    MOST_SESSIONS,
    Served,
    at_concurrency,
    measured_limit,
    sessions_within_slo,
    within_slo,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "policies" / "examples" / "smollm2_mec.json"


def _problem(**constraints: float | None) -> Problem:
    p = Problem.from_json(EXAMPLE.read_text())
    return p.model_copy(update={"constraints": p.constraints.model_copy(update=constraints)})


def test_the_limit_is_the_most_sessions_whose_predicted_tpot_meets_the_slo() -> None:
    """Each session more slows every session's tokens (the stages queue); the limit is the last count
    within the TPOT bound, one more breaks it, and it does not depend on the concurrency the calibration
    measured."""
    free = _problem(max_tpot_s=None, max_ttft_s=None)
    plan = solve(free, "latency_dp")
    tpot = [predict(at_concurrency(free, k), plan.stages).tpot_s for k in (1, 4, 16)]
    assert tpot[0] < tpot[1] < tpot[2]
    slo = 2 * tpot[0]
    bound = _problem(max_tpot_s=slo, max_ttft_s=None)
    limit = sessions_within_slo(bound, plan.stages)
    assert 1 < limit < MOST_SESSIONS
    assert predict(at_concurrency(bound, limit), plan.stages).tpot_s <= slo * 1.001
    assert not within_slo(bound, plan.stages, limit + 1)
    measured = bound.model_copy(update={"calibration": Calibration(concurrency=1.0)})
    assert sessions_within_slo(measured, plan.stages) == limit


def test_memory_bounds_the_sessions_without_an_slo_and_one_is_always_served() -> None:
    """Without a latency bound the KV cache is the limit; a bound not even one session meets leaves 1."""
    free = _problem(max_tpot_s=None, max_ttft_s=None)
    plan = solve(free, "latency_dp")
    limit = sessions_within_slo(free, plan.stages, most=100_000)
    assert 1 < limit < 100_000 and not within_slo(free, plan.stages, limit + 1)
    tight = _problem(max_tpot_s=1e-6, max_ttft_s=None)
    assert sessions_within_slo(tight, plan.stages) == 1


def _served(n: int, live: float, ttft_s: float, tpot_s: float | None) -> list[Served]:
    return [Served(ended_at_s=float(i), ttft_s=ttft_s, tpot_s=tpot_s, live=live) for i in range(n)]


def test_the_measured_limit_scales_the_sessions_met_to_the_bound_their_p95_reached() -> None:
    """At capacity a session's gap grows with the sessions sharing the chain: 10 sessions whose p95 gap
    was 0.6 s against a 0.5 s bound keep it at 8; the tighter of the TTFT and TPOT bounds decides."""
    slow = _served(MIN_SERVED - 1, live=10.0, ttft_s=1.0, tpot_s=0.4) + _served(2, 10.0, 1.0, 0.6)
    assert measured_limit(slow, slo_ttft_s=4.0, slo_tpot_s=0.5) == 8  # p95: the largest but one, 0.6
    assert measured_limit(slow, slo_ttft_s=0.5, slo_tpot_s=0.5) == 5  # the TTFT bound, twice exceeded
    fast = _served(MIN_SERVED, live=2.0, ttft_s=0.5, tpot_s=0.1)
    assert measured_limit(fast, slo_ttft_s=4.0, slo_tpot_s=0.5) == 10  # more than met, re-measured there
    assert measured_limit(fast[:-1], slo_ttft_s=4.0, slo_tpot_s=0.5) is None  # too few to tell
    assert measured_limit(fast, slo_ttft_s=None, slo_tpot_s=None) is None
    assert measured_limit(_served(MIN_SERVED, 1.0, 9.0, 9.0), 4.0, 0.5) == 1  # never below one
