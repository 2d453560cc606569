"""The optimiser benchmark behind ``mecsplit bench policies``: solve times, heuristic gap, policy quality.

Pure computation on seeded instances (``policies.generate``); it only reads the clock.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np

from policies.analytic import latency_objective
from policies.errors import InfeasibleError, SearchLimitError
from policies.generate import random_problem
from policies.plan import Plan
from policies.problem import Problem
from policies.registry import POLICIES
from policies.search import exact, relaxed_to_go
from policies.solvers import heuristic, objective_costs, relaxed_lower_bound, search_exact, to_plan
from policies.tables import build

SIZES_NODES = (5, 20, 50, 200)
SIZES_LAYERS = (32, 80)
# States the exact search may expand in the benchmark before it reports "exceeded" for a size.
EXACT_BUDGET = 100_000
# Memory relative to the model: tight enough that most plans need several nodes.
MEM_SCALE = 0.4


def _timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return (time.perf_counter() - t0) * 1000.0, out


def exact_latency(problem: Problem, budget: int) -> Plan:
    t = build(problem)
    costs = objective_costs(problem, t)
    to_go, _enter = relaxed_to_go(costs)
    found = search_exact(costs) if budget <= 0 else exact(costs, to_go, max_expansions=budget)
    if found is None:
        raise InfeasibleError("combination", "benchmark instance has no plan")
    return to_plan(problem, t, found.stages, "latency_dp")


def solve_times(seeds: int, budget: int = EXACT_BUDGET) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for n_nodes in SIZES_NODES:
        for n_layers in SIZES_LAYERS:
            exact_ms: list[float] = []
            heur_ms: list[float] = []
            gaps: list[float] = []
            lb_gaps: list[float] = []
            exceeded = 0
            for p in suite(seeds, n_nodes, n_layers, 1000):
                h_ms, h_plan = _timed(lambda p=p: heuristic(p))
                heur_ms.append(h_ms)
                h_val = latency_objective(p, h_plan.predicted)  # type: ignore[union-attr]
                lb = relaxed_lower_bound(p)
                lb_gaps.append(h_val / lb - 1.0)
                try:
                    e_ms, e_plan = _timed(lambda p=p: exact_latency(p, budget))
                except SearchLimitError:
                    exceeded += 1
                    continue
                exact_ms.append(e_ms)
                gaps.append(h_val / latency_objective(p, e_plan.predicted) - 1.0)  # type: ignore[union-attr]
            rows.append(
                {
                    "nodes": n_nodes,
                    "layers": n_layers,
                    "instances": seeds,
                    "exact_latency_median_ms": _median(exact_ms),
                    "exact_latency_max_ms": round(max(exact_ms), 6) if exact_ms else None,
                    "exact_exceeded_budget": exceeded,
                    "heuristic_median_ms": _median(heur_ms),
                    "heuristic_max_ms": round(max(heur_ms), 6),
                    "heuristic_gap_to_exact_max": max(gaps) if gaps else None,
                    "heuristic_gap_to_exact_median": _median(gaps),
                    "heuristic_gap_to_lower_bound_max": max(lb_gaps),
                }
            )
    return rows


def suite(count: int, n_nodes: int, n_layers: int, base_seed: int) -> list[Problem]:
    """``count`` feasible seeded heterogeneous instances (seeds with no plan at all are skipped)."""
    out: list[Problem] = []
    seed = base_seed
    while len(out) < count:
        p = random_problem(seed, n_nodes, n_layers, mem_scale=MEM_SCALE)
        seed += 1
        try:
            heuristic(p)
        except InfeasibleError:
            continue
        out.append(p)
    return out


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 6) if values else None


def policy_quality(instances: int, n_nodes: int = 10, n_layers: int = 32) -> dict[str, dict[str, object]]:
    """Per policy: predicted request latency and throughput relative to the best exact plan."""
    lat_ratio: dict[str, list[float]] = {name: [] for name in POLICIES}
    thr_ratio: dict[str, list[float]] = {name: [] for name in POLICIES}
    failed: dict[str, int] = {name: 0 for name in POLICIES}
    for p in suite(instances, n_nodes, n_layers, 5000):
        best_lat = POLICIES["latency_dp"](p).predicted.request_latency_s
        best_thr = POLICIES["throughput_dp"](p).predicted.throughput_tok_s
        for name, fn in POLICIES.items():
            try:
                m = fn(p).predicted
            except InfeasibleError:
                failed[name] += 1
                continue
            lat_ratio[name].append(m.request_latency_s / best_lat)
            thr_ratio[name].append(m.throughput_tok_s / best_thr)
    return {
        name: {
            "latency_vs_best_median": _median(lat_ratio[name]),
            "throughput_vs_best_median": _median(thr_ratio[name]),
            "infeasible": failed[name],
        }
        for name in POLICIES
    }


def run(*, seeds: int = 3, quality_instances: int = 8, budget: int = EXACT_BUDGET) -> dict[str, object]:
    times = solve_times(seeds, budget)
    at = {(r["nodes"], r["layers"]): r for r in times}
    big = at[(200, 80)]
    # The gap to the exact optimum where the exact search finished on every instance, else the (looser)
    # gap to the relaxation's lower bound, which bounds it from above.
    exact_done = big["exact_exceeded_budget"] == 0
    gap_200 = big["heuristic_gap_to_exact_max"] if exact_done else big["heuristic_gap_to_lower_bound_max"]
    return {
        "solve_times": times,
        "policies": policy_quality(quality_instances),
        "goals": {
            "exact_latency_20x32_ms": at[(20, 32)]["exact_latency_median_ms"],
            "exact_latency_20x32_ok": _le(at[(20, 32)]["exact_latency_median_ms"], 50.0),
            "heuristic_200x80_ms": at[(200, 80)]["heuristic_median_ms"],
            "heuristic_200x80_ok": _le(at[(200, 80)]["heuristic_median_ms"], 2000.0),
            "heuristic_200x80_gap_bound": gap_200,
            "heuristic_200x80_gap_ok": _le(gap_200, 0.02),
        },
        "suite": {
            "generator": "policies.generate.random_problem",
            "mem_scale": MEM_SCALE,
            "seeds_per_size": seeds,
        },
        "notes": "latency objective = TTFT + (gen-1) x TPOT; gap_to_lower_bound bounds the true gap",
        "numpy": np.__version__,
    }


def _le(value: object, limit: float) -> bool | None:
    return None if value is None else float(value) <= limit  # type: ignore[arg-type]
