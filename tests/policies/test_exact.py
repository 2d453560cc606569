"""Exact solvers equal brute-force enumeration of every plan, on 500 seeded small instances."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from policies.analytic import latency_objective, predict, violations, weighted_objective
from policies.errors import InfeasibleError
from policies.milp import milp
from policies.plan import Stage
from policies.problem import Problem
from policies.solvers import latency_dp, throughput_dp
from tests.policies.bruteforce import Enumerated, enumerate_plans
from tests.policies.instances import small_instance, with_bursts

N_INSTANCES = 500
CHUNK = 50
# The MILP costs ~0.05 s per instance; the default run checks the first 100, the slow run the rest.
MILP_DEFAULT = 100
REL = 1e-7


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= REL * max(1.0, abs(a), abs(b))


def _check_latency(seed: int, p: Problem, en: Enumerated) -> None:
    o = p.objective
    value = o.ttft * en.ttft + p.tpot_weight() * en.tpot + o.privacy * en.privacy
    ok = en.structural_ok & en.slo_ok
    if not ok.any():
        with pytest.raises(InfeasibleError):
            latency_dp(p)
        return
    plan = latency_dp(p)
    assert violations(p, plan.stages) == []
    assert _close(latency_objective(p, plan.predicted), float(value[ok].min())), seed


def _check_throughput(seed: int, p: Problem, en: Enumerated) -> None:
    o = p.objective
    latency = o.ttft * en.ttft + p.tpot_weight() * en.tpot + o.privacy * en.privacy
    ok = en.structural_ok & en.slo_ok
    if not ok.any():
        with pytest.raises(InfeasibleError):
            throughput_dp(p)
        return
    plan = throughput_dp(p)
    assert violations(p, plan.stages) == []
    best_b = float(en.bottleneck[ok].min())
    assert _close(plan.predicted.bottleneck_s, best_b), seed
    # Ties on the bottleneck are broken by the latency objective.
    tied = ok & (en.bottleneck <= best_b * (1 + 1e-9))
    assert _close(latency_objective(p, plan.predicted), float(latency[tied].min())), seed


def _check_milp(seed: int, p: Problem, en: Enumerated) -> None:
    o = p.objective
    value = (
        o.ttft * en.ttft + p.tpot_weight() * en.tpot + o.bottleneck * en.bottleneck + o.privacy * en.privacy
    )
    ok = en.structural_ok & en.slo_ok
    if not ok.any():
        with pytest.raises(InfeasibleError):
            milp(p)
        return
    plan = milp(p)
    assert violations(p, plan.stages) == []
    assert _close(plan.objective_value, float(value[ok].min())), seed


@pytest.mark.parametrize("start", range(0, N_INSTANCES, CHUNK))
def test_exact_solvers_equal_bruteforce(start: int) -> None:
    for seed in range(start, start + CHUNK):
        p = small_instance(seed)
        en = enumerate_plans(p)
        _check_latency(seed, p, en)
        _check_throughput(seed, p, en)
        if seed < MILP_DEFAULT:
            _check_milp(seed, p, en)


@pytest.mark.slow
@pytest.mark.parametrize("start", range(MILP_DEFAULT, N_INSTANCES, CHUNK))
def test_milp_equals_bruteforce_rest(start: int) -> None:
    for seed in range(start, min(start + CHUNK, N_INSTANCES)):
        p = small_instance(seed)
        _check_milp(seed, p, enumerate_plans(p))


@pytest.mark.parametrize("bursts", [False, True])
def test_tables_match_reference_model(bursts: bool) -> None:
    """The compiled arrays the solvers and the enumeration use price plans like ``analytic.predict``
    (also with message frames and link bursts)."""
    rng = np.random.default_rng(7)
    checked = 0
    for seed in range(60):
        p = with_bursts(small_instance(seed), seed) if bursts else small_instance(seed)
        en = enumerate_plans(p)
        for flat in rng.choice(en.ttft.size, size=min(5, en.ttft.size), replace=False).tolist():
            stages = tuple(Stage(node=p.node_names[n], first=i, end=e) for n, i, e in en.layout(flat))
            m = predict(p, stages)
            assert _close(m.ttft_s, float(en.ttft[flat]))
            assert _close(m.tpot_s, float(en.tpot[flat]))
            assert _close(m.bottleneck_s, float(en.bottleneck[flat]))
            assert _close(m.privacy_exposure, float(en.privacy[flat]))
            feasible = not violations(p, stages)
            assert feasible == bool(en.structural_ok[flat] and en.slo_ok[flat])
            checked += 1
    assert checked > 200


def _all_layouts(n_nodes: int, n_layers: int):
    for k in range(1, min(n_nodes, n_layers) + 1):
        for cuts in itertools.combinations(range(1, n_layers), k - 1):
            bounds = (0, *cuts, n_layers)
            for perm in itertools.permutations(range(n_nodes), k):
                yield tuple((perm[j], bounds[j], bounds[j + 1]) for j in range(k))


@pytest.mark.parametrize("bursts", [False, True])
def test_latency_dp_equals_reference_enumeration(bursts: bool) -> None:
    """Independent of the tables: enumerate with the plain-Python reference model and constraint check."""
    compared = 0
    for seed in range(150):
        p = with_bursts(small_instance(seed), seed) if bursts else small_instance(seed)
        if len(p.nodes) > 4 or p.num_layers > 5 or p.constraints.max_ttft_s or p.constraints.max_tpot_s:
            continue
        best = None
        for layout in _all_layouts(len(p.nodes), p.num_layers):
            stages = tuple(Stage(node=p.node_names[n], first=i, end=e) for n, i, e in layout)
            if violations(p, stages):
                continue
            v = latency_objective(p, predict(p, stages))
            best = v if best is None or v < best else best
        if best is None:
            with pytest.raises(InfeasibleError):
                latency_dp(p)
        else:
            assert _close(latency_objective(p, latency_dp(p).predicted), best)
            assert (
                weighted_objective(p, milp(p).predicted)
                <= weighted_objective(p, latency_dp(p).predicted) + 1e-9
            )
        compared += 1
    assert compared >= 15
