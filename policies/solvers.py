"""Exact and heuristic solvers of mecsplit's own objective (the baselines live in ``baselines``)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np

from policies.analytic import node_times, predict, violations, weighted_objective
from policies.errors import InfeasibleError, PolicyError, SearchLimitError, SolverError
from policies.plan import Plan, Stage
from policies.problem import Constraints, Problem
from policies.routes import Routes, all_routes
from policies.search import Found, RawStage, beam, exact, lower_bound, relaxed_to_go
from policies.tables import INF, REL_TOL, Costs, Tables, bottleneck_values, build, latency_costs

# Beam width of the incumbent that prunes the exact search, and of the scalable heuristic.
_INCUMBENT_WIDTH = 4
HEURISTIC_WIDTH = 24
# The exact refinement after the beam may expand about this many (node x boundary) cells in all, so its
# state budget shrinks as instances grow: ~24k states at 5 x 32, ~300 at 200 x 80 (its floor).
HEURISTIC_WORK_CELLS = 4_000_000
HEURISTIC_MIN_BUDGET = 300
# States the throughput search may spend deciding one candidate bottleneck value.
THROUGHPUT_BUDGET = 50_000


def to_plan(problem: Problem, t: Tables, stages: Sequence[RawStage], policy: str) -> Plan:
    named = tuple(Stage(node=t.names[n], first=i, end=e) for n, i, e in stages)
    return plan_from_stages(problem, named, policy, t.routes)


def plan_from_stages(
    problem: Problem, stages: Sequence[Stage], policy: str, routes: Routes | None = None
) -> Plan:
    """Validate ``stages`` against every constraint and price them with the analytic model."""
    routes = routes if routes is not None else all_routes(problem)
    broken = violations(problem, stages, routes)
    if broken:
        first = broken[0]
        raise InfeasibleError(first.constraint, f"policy {policy!r}: {first.detail}")
    metrics = predict(problem, stages, routes)
    return Plan(
        stages=tuple(stages),
        policy=policy,
        predicted=metrics,
        objective_value=weighted_objective(problem, metrics),
    )


def throughput_cap_s(constraints: Constraints) -> float:
    if constraints.min_throughput_tok_s is None:
        return INF
    return (1.0 + REL_TOL) / constraints.min_throughput_tok_s


def objective_costs(
    problem: Problem, t: Tables, *, cap_s: float | None = None, source_hops: bool = True
) -> Costs:
    o = problem.objective
    return latency_costs(
        t,
        w_ttft=o.ttft,
        w_tpot=problem.tpot_weight(),
        w_privacy=o.privacy,
        cap_s=throughput_cap_s(problem.constraints) if cap_s is None else cap_s,
        cap_source_hops=source_hops,
    )


def search_exact(costs: Costs) -> Found | None:
    to_go, enter = relaxed_to_go(costs)
    if not np.isfinite(lower_bound(costs, enter)):
        return None
    incumbent = beam(costs, to_go, width=_INCUMBENT_WIDTH)
    return exact(costs, to_go, incumbent=incumbent)


def needs_milp(problem: Problem) -> bool:
    """SLO bounds on TTFT/TPOT and lexicographic or bottleneck-weighted objectives are the MILP's job."""
    c, o = problem.constraints, problem.objective
    return o.mode == "lexicographic" or c.max_ttft_s is not None or c.max_tpot_s is not None


def latency_dp(problem: Problem, *, policy: str = "latency_dp") -> Plan:
    """Exact minimum of w_ttft*TTFT + w_tpot*TPOT + w_privacy*exposure under memory, trust and throughput
    floor (all per-stage, so exact inside the search). SLO bounds hand over to the exact MILP. A
    calibrated problem is priced by the full model (``calibrated_latency``)."""
    if problem.calibration is not None and problem.objective.mode == "weighted":
        return calibrated_latency(problem, policy=policy)
    if needs_milp(problem):
        from policies.milp import milp

        if problem.objective.mode == "lexicographic":
            return milp(problem, policy=policy)
        return milp(problem, policy=policy, weights=_latency_weights(problem))
    t = build(problem)
    found = search_exact(objective_costs(problem, t))
    if found is None:
        raise diagnose(problem)
    return to_plan(problem, t, found.stages, policy)


# Bottleneck caps tried by ``calibrated_latency`` (plans that spread the work for concurrent sessions).
CONTENTION_CAPS = 8


def calibrated_latency(problem: Problem, *, policy: str = "latency_dp") -> Plan:
    """The least weighted objective under the full (calibrated) model.

    Queueing between concurrent sessions and CPU quotas make TPOT a max of sums (policies.contention), which
    no additive search optimises directly. Candidates come from the exact search over the additive part
    (the plan alone on an idle network), the same with each CPU-quota node priced at its quota (what a
    node that does most of the work runs at), and with every stage and hop capped at a few bottleneck
    values (plans that spread the work when sessions queue); the MILP's plan too where SLO bounds apply.
    Every candidate is priced and checked by the full model and the best feasible one returned: exact
    when nothing queues or saturates (then the first candidate is the optimum), otherwise the best of
    these (measured against brute force in tests/policies/test_calibrated.py)."""
    t = build(problem)
    base = objective_costs(problem, t)
    candidates: list[tuple[RawStage, ...]] = []
    for costs in _candidate_costs(problem, t, base):
        found = search_exact(costs)
        if found is not None and found.stages not in candidates:
            candidates.append(found.stages)
    plans = []
    for stages in candidates:
        with contextlib.suppress(InfeasibleError):
            plans.append(to_plan(problem, t, stages, policy))
    if not plans and needs_milp(problem):
        # Only SLO bounds can reject every candidate: the MILP searches under them (on the additive model).
        from policies.milp import milp

        with contextlib.suppress(InfeasibleError, SearchLimitError):
            plans.append(milp(problem, policy=policy, weights=_latency_weights(problem)))
    if not plans:
        raise diagnose(problem)
    return min(plans, key=lambda plan: (plan.objective_value, plan.layout()))


def _candidate_costs(problem: Problem, t: Tables, base: Costs) -> list[Costs]:
    out = [base]
    w_tpot = problem.tpot_weight()
    times = node_times(problem)
    for n, name in enumerate(t.names):
        capacity = times[name].capacity
        if capacity is None or capacity >= 1.0:
            continue
        # This node's stages at the pace its quota allows over time (its CPU work / its share).
        cpu = np.concatenate([[0.0], np.cumsum(times[name].decode_cpu_s)])
        span = cpu[None, :] - cpu[:, None]
        span[:, -1] += times[name].head_cpu_s
        slowed = base.stage.copy()
        extra = np.maximum(0.0, span / capacity - t.stage_decode_s[n])
        slowed[n] = np.where(np.isfinite(base.stage[n]), base.stage[n] + w_tpot * extra, INF)
        out.append(Costs(slowed, base.hop, base.start, base.ret))
    if problem.workload.concurrent_sessions > 1:
        values = bottleneck_values(t, base)
        picks = (
            np.unique(np.linspace(0, values.size - 1, CONTENTION_CAPS).round().astype(int))
            if values.size
            else []
        )
        out += [objective_costs(problem, t, cap_s=min(float(values[i]), _floor(problem))) for i in picks]
    return out


def _latency_weights(problem: Problem) -> tuple[float, float, float, float]:
    o = problem.objective
    return (o.ttft, problem.tpot_weight(), 0.0, o.privacy)


def throughput_dp(
    problem: Problem, *, policy: str = "throughput_dp", source_hops: bool = True, strict: bool = True
) -> Plan:
    """Exact minimum bottleneck (max over stages and hops of busy time per token = 1/throughput), ties
    broken by the least latency objective. Binary search over the candidate bottleneck values; each value
    is decided by the relaxation (no plan if it has none), a beam witness (a plan exists), or else the
    exact search within ``THROUGHPUT_BUDGET`` states (``SearchLimitError`` if that cannot decide). The
    tie-break is exact when the final search fits the same budget, else the witness stands. With
    ``strict=False`` an undecided value counts as infeasible: the plan is feasible but its bottleneck may
    exceed the optimum (what the PipeEdge baseline does at sizes where the exact search cannot decide)."""
    if needs_milp(problem) and source_hops:
        from policies.milp import milp

        return milp(problem, policy=policy, order=("bottleneck", "latency"))
    t = build(problem)
    base = objective_costs(problem, t, source_hops=source_hops)
    values = bottleneck_values(t, base, include_source_hops=source_hops)

    def costs_at(cap: float) -> Costs:
        return objective_costs(problem, t, cap_s=min(cap, _floor(problem)), source_hops=source_hops)

    def relaxed_ok(cap: float) -> bool:
        costs = costs_at(cap)
        _to_go, enter = relaxed_to_go(costs)
        return bool(np.isfinite(lower_bound(costs, enter)))

    def witness(cap: float) -> Found | None:
        costs = costs_at(cap)
        to_go, enter = relaxed_to_go(costs)
        if not np.isfinite(lower_bound(costs, enter)):
            return None
        found = beam(costs, to_go, width=HEURISTIC_WIDTH)
        if found is not None:
            return found
        try:
            return exact(costs, to_go, max_expansions=THROUGHPUT_BUDGET)
        except SearchLimitError:
            if strict:
                raise
            return None

    if values.size == 0 or (found_hi := witness(float(values[-1]))) is None:
        raise diagnose(problem)
    # The relaxation is monotone and cheap: its threshold is a lower bound on the true one.
    lo = _first_true(values, relaxed_ok, 0)
    hi = values.size - 1
    while lo < hi:
        mid = (lo + hi) // 2
        found = witness(float(values[mid]))
        if found is not None:
            hi, found_hi = mid, found
        else:
            lo = mid + 1
    costs = costs_at(float(values[hi]))
    to_go, _enter = relaxed_to_go(costs)
    with contextlib.suppress(SearchLimitError):
        found_hi = exact(costs, to_go, incumbent=found_hi, max_expansions=THROUGHPUT_BUDGET) or found_hi
    return to_plan(problem, t, found_hi.stages, policy)


def _floor(problem: Problem) -> float:
    return throughput_cap_s(problem.constraints)


def _first_true(values: np.ndarray, test: object, lo: int) -> int:
    hi = values.size - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if test(float(values[mid])):  # type: ignore[operator]
            hi = mid
        else:
            lo = mid + 1
    return lo


def heuristic(
    problem: Problem,
    *,
    policy: str = "heuristic",
    width: int = HEURISTIC_WIDTH,
    budget: int | None = None,
) -> Plan:
    """Beam search under the relaxed DP's cost-to-go (polynomial: rounds x width x N x L), then the exact
    search within ``budget`` states. Its gap is measured by ``mecsplit bench policies``."""
    if needs_milp(problem):
        return latency_dp(problem, policy=policy)
    t = build(problem)
    costs = objective_costs(problem, t)
    to_go, enter = relaxed_to_go(costs)
    if not np.isfinite(lower_bound(costs, enter)):
        raise diagnose(problem)
    found = beam(costs, to_go, width=width)
    if budget is None:
        budget = max(HEURISTIC_MIN_BUDGET, HEURISTIC_WORK_CELLS // (len(t.names) * (t.num_layers + 1)))
    # Anytime refinement: the exact search pruned by the beam's plan, within a state budget; when it
    # finishes the result is optimal, otherwise the beam's plan stands.
    with contextlib.suppress(SearchLimitError):
        found = exact(costs, to_go, incumbent=found, max_expansions=budget)
    if found is None:
        # The beam missed every feasible plan (tight memory) and the budget ran out: finish exactly.
        found = exact(costs, to_go)
    if found is None:
        raise diagnose(problem)
    return to_plan(problem, t, found.stages, policy)


def relaxed_lower_bound(problem: Problem) -> float:
    """A lower bound on the optimal latency objective (the relaxation that lets nodes repeat)."""
    t = build(problem)
    costs = objective_costs(problem, t)
    _to_go, enter = relaxed_to_go(costs)
    return lower_bound(costs, enter)


def diagnose(problem: Problem) -> PolicyError:
    """Name the constraint that binds: the first whose removal alone makes a plan exist. An SLO is named
    only when it is set; where the exact search shows a plan exists, the caller's failure is a
    ``SolverError``."""
    c = problem.constraints
    # Policy constraints are named before memory: when both bind, the trust rule is the one a user chose.
    relax: list[tuple[str, dict[str, object]]] = []
    if c.trusted_prefix_layers:
        relax.append(("trust", {"trusted_prefix_layers": 0}))
    if c.private_depth:
        relax.append(("private_depth", {"private_depth": 0}))
    if c.trusted_head:
        relax.append(("trusted_head", {"trusted_head": False}))
    if c.min_throughput_tok_s is not None:
        relax.append(("min_throughput", {"min_throughput_tok_s": None}))
    if c.check_memory:
        relax.append(("memory", {"check_memory": False}))
    if not _structurally_feasible(problem):
        for name, change in relax:
            if _structurally_feasible(
                problem.model_copy(update={"constraints": c.model_copy(update=change)})
            ):
                return InfeasibleError(name, _advice(name))
        if relax:
            names = ", ".join(n for n, _ in relax)
            return InfeasibleError("combination", f"no single constraint binds alone; relax one of: {names}")
        return InfeasibleError("connectivity", "no node reachable from the source can run the model")
    for name, limit, metric in (("max_ttft", c.max_ttft_s, "ttft"), ("max_tpot", c.max_tpot_s, "tpot")):
        if limit is None:
            continue
        best = _best_single_metric(problem, metric)
        if best > limit * (1.0 + REL_TOL):
            return InfeasibleError(name, f"the best achievable {metric} is {best:.4g} s > {limit} s")
    return _unexplained(problem)


def _unexplained(problem: Problem) -> PolicyError:
    """What to say when a plan exists under every structural constraint and each set SLO alone."""
    c = problem.constraints
    slos = [name for name, limit in (("max_ttft_s", c.max_ttft_s), ("max_tpot_s", c.max_tpot_s)) if limit]
    if problem.calibration is not None:
        # The candidates are priced by the full model, whose queueing the searches do not see.
        relax = ", ".join([*slos, "min_throughput_tok_s", "concurrent_sessions"])
        return InfeasibleError(
            "combination", f"no candidate plan holds under the calibrated model (queueing); relax {relax}"
        )
    if len(slos) == 2:
        return InfeasibleError(
            "combination", "the SLO bounds cannot hold together; relax max_ttft_s or max_tpot_s"
        )
    # With at most one SLO, the exact search above found a plan that meets it: no solver should miss it.
    held = f" under {slos[0]}" if slos else ""
    return SolverError(
        f"a plan exists{held} (the exact search finds one) but the solver returned none; "
        "report the problem JSON, or use the latency_dp or throughput_dp policy"
    )


def _structurally_feasible(problem: Problem) -> bool:
    t = build(problem)
    return search_exact(objective_costs(problem, t)) is not None


def _best_single_metric(problem: Problem, metric: str) -> float:
    t = build(problem)
    w_ttft, w_tpot = (1.0, 0.0) if metric == "ttft" else (0.0, 1.0)
    costs = latency_costs(t, w_ttft=w_ttft, w_tpot=w_tpot, w_privacy=0.0, cap_s=_floor(problem))
    found = search_exact(costs)
    return INF if found is None else found.value


_ADVICE = {
    "memory": "no node set holds the layers with their KV cache; add memory or nodes, or fewer sessions",
    "trust": "trusted nodes cannot hold the trusted prefix; add trusted memory or lower the prefix",
    "private_depth": "private activations cannot stay in the trusted domain; add trusted routes or lower it",
    "trusted_head": "no trusted node can run the head; add a trusted node with memory or drop trusted_head",
    "min_throughput": "no plan reaches the throughput floor; lower min_throughput_tok_s or add faster nodes",
}


def _advice(name: str) -> str:
    return _ADVICE[name]
