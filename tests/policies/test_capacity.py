"""The admission limit: the most sessions a plan serves at once within its SLO and memory."""

from __future__ import annotations

from pathlib import Path

from policies import Problem, predict, solve
from policies.calibration import Calibration
from policies.capacity import MOST_SESSIONS, at_concurrency, sessions_within_slo, within_slo

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
