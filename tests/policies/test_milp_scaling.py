"""The MILP on badly scaled instances (layers of ~1e-4 s next to 1 exposure units and 1e9 bytes): its plans
meet the analytic check and equal brute force within the shared tolerance; messages name set SLOs only.

Every instance here failed before the MILP was normalised (policies.milp, policies.tolerance)."""

from __future__ import annotations

import numpy as np
import pytest

from policies.analytic import latency_objective, metric_value, violations
from policies.errors import InfeasibleError, PolicyError, SolverError
from policies.milp import milp
from policies.problem import Constraints, Objective, Problem
from policies.solvers import diagnose, latency_dp, throughput_dp
from policies.tolerance import REL_TOL
from tests.policies.bruteforce import Enumerated, enumerate_plans
from tests.policies.instances import small_instance, time_scaled, tiny_instance

_SLO_WORDS = ("SLO", "max_ttft", "max_tpot")


def _at_most(value: float, best: float) -> bool:
    """``value`` is no worse than the optimum ``best``, up to the shared tolerance (twice: both the held
    metric and its optimum carry it)."""
    return value <= best + 2 * REL_TOL * abs(best) + 1e-15


def _weighted(p: Problem, en: Enumerated) -> np.ndarray:
    o = p.objective
    return (
        o.ttft * en.ttft + p.tpot_weight() * en.tpot + o.bottleneck * en.bottleneck + o.privacy * en.privacy
    )


def _check_milp(p: Problem, en: Enumerated) -> None:
    ok = en.structural_ok & en.slo_ok
    plan = milp(p)
    assert violations(p, plan.stages) == []
    if p.objective.mode == "weighted":
        best = float(_weighted(p, en)[ok].min())
        assert abs(plan.objective_value - best) <= REL_TOL * best
        return
    metrics = {"ttft": en.ttft, "tpot": en.tpot, "bottleneck": en.bottleneck, "privacy": en.privacy}
    keep = ok.copy()
    for name in p.objective.order:
        got = metric_value(plan.predicted, name)
        assert _at_most(got, float(metrics[name][keep].min())), name
        keep &= metrics[name] <= got * (1 + REL_TOL) + 1e-15


def _check_throughput(p: Problem, en: Enumerated) -> None:
    ok = en.structural_ok & en.slo_ok
    plan = throughput_dp(p)
    assert violations(p, plan.stages) == []
    best_b = float(en.bottleneck[ok].min())
    assert _at_most(plan.predicted.bottleneck_s, best_b)
    o = p.objective
    latency = o.ttft * en.ttft + p.tpot_weight() * en.tpot + o.privacy * en.privacy
    tied = ok & (en.bottleneck <= best_b * (1 + REL_TOL))
    assert _at_most(latency_objective(p, plan.predicted), float(latency[tied].min()))


def _check(p: Problem) -> None:
    en = enumerate_plans(p)
    if not (en.structural_ok & en.slo_ok).any():
        for solver in (milp, throughput_dp, latency_dp):
            with pytest.raises(InfeasibleError):
                solver(p)
        return
    _check_milp(p, en)
    if p.objective.mode == "weighted":
        _check_throughput(p, en)
        o = p.objective
        latency = o.ttft * en.ttft + p.tpot_weight() * en.tpot + o.privacy * en.privacy
        plan = latency_dp(p)
        best = float(latency[en.structural_ok & en.slo_ok].min())
        assert abs(latency_objective(p, plan.predicted) - best) <= REL_TOL * best


# 199: throughput_dp under max_ttft_s answered "the SLO bounds cannot hold together" (the bottleneck held
# with 1e-7 slack, below HiGHS's 1e-6 tolerance); 367: no SLO, lexicographic, the same message (privacy
# held at 0.95999985 for a true 0.96). The rest: the same family, passing before and after.
@pytest.mark.parametrize("seed", [199, 367, *range(12)])
def test_tiny_instances_equal_bruteforce(seed: int) -> None:
    _check(tiny_instance(seed))


# Layers of 1e-9..1e-5 s: before, the MILP's plan was up to 117 % worse than the optimum (seed 94),
# throughput_dp's bottleneck 325 % worse with its tie-break 56 % better (57), or "infeasible" (9, 93).
@pytest.mark.parametrize(("seed", "factor"), [(57, 1e-4), (94, 1e-4), (48, 1e-3), (9, 1e-3), (93, 1e-4)])
def test_time_scaled_instances_equal_bruteforce(seed: int, factor: float) -> None:
    _check(time_scaled(small_instance(seed), factor))


@pytest.mark.parametrize("seed", [29, 54])
def test_slo_at_a_plans_own_ttft_is_met(seed: int) -> None:
    """A bound equal to a plan's TTFT (as the arrays add it up): the MILP admitted plans just above it
    and the analytic model's strict check then rejected them ("policy 'milp': TTFT 0.006355 s >
    0.006355313422749613")."""
    p = tiny_instance(seed).model_copy(update={"objective": Objective(ttft=0.0, tpot=1.0)})
    p = p.model_copy(update={"constraints": Constraints()})
    en = enumerate_plans(p)
    values = np.unique(en.ttft[en.structural_ok])
    bounded = p.model_copy(update={"constraints": Constraints(max_ttft_s=float(values[len(values) // 5]))})
    _check(bounded)


def test_analytic_check_shares_the_solvers_slack() -> None:
    p = tiny_instance(0).model_copy(update={"constraints": Constraints()})
    stages = milp(p).stages
    ttft = milp(p).predicted.ttft_s
    inside = p.model_copy(update={"constraints": Constraints(max_ttft_s=ttft / (1 + REL_TOL / 2))})
    outside = p.model_copy(update={"constraints": Constraints(max_ttft_s=ttft / (1 + 2 * REL_TOL))})
    assert violations(inside, stages) == []
    assert [v.constraint for v in violations(outside, stages)] == ["max_ttft"]


def _slo_free(p: Problem) -> Problem:
    return p.model_copy(
        update={"constraints": p.constraints.model_copy(update={"max_ttft_s": None, "max_tpot_s": None})}
    )


def test_no_slo_message_never_names_an_slo() -> None:
    """Without an SLO no message mentions one: infeasible instances name what binds, and a feasible one
    that a solver fails on is a SolverError, not an infeasibility."""
    messages = [str(diagnose(_slo_free(tiny_instance(367))))]
    assert isinstance(diagnose(_slo_free(tiny_instance(367))), SolverError)
    for seed in range(40):
        p = _slo_free(small_instance(seed))
        for solver in (milp, throughput_dp, latency_dp):
            try:
                solver(p)
            except PolicyError as err:
                messages.append(str(err))
    assert len(messages) > 5  # some of these instances are infeasible (memory, trust)
    for text in messages:
        assert not any(word in text for word in _SLO_WORDS), text
