"""The constrained multi-objective form as a mixed-integer linear programme (scipy.optimize.milp / HiGHS).

A unit of flow runs source -> first stage -> ... -> last stage -> source through a layered graph:
binary ``s[m,i,e]`` (node m runs [i, e)), ``h[p,m,i]`` (depth-i activations go p -> m), ``a[m]`` (the
source feeds m) and ``r[n]`` (n returns the token). The graph is acyclic in depth, so integral flow is one
pipeline; ``sum_{i,e} s[m,i,e] <= 1`` makes every node serve at most once. A continuous ``z`` bounds every
stage's and hop's busy time (one stage and one outgoing hop per node, so one row per node suffices), which
makes 1/throughput linear. TTFT and TPOT are linear in the arcs, so SLO bounds are rows.

Scaling: HiGHS's tolerances are absolute (1e-6 on rows and integrality, 1e-6 on the objective's gap), so
seconds go in units of the instance's typical stage time (``time_unit_s``), SLO rows are divided by their
bound, and each held metric is measured in its own unit: every row and objective is of magnitude ~1 whether
layers take 0.1 ms or 1 s. The rounded plan is priced again exactly (and, uncalibrated, by the analytic
model) before it is returned.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint
from scipy.optimize import milp as scipy_milp
from scipy.sparse import coo_matrix

from policies.analytic import metric_value
from policies.errors import InfeasibleError, SolverError
from policies.plan import Plan
from policies.problem import Problem
from policies.solvers import diagnose, throughput_cap_s, to_plan
from policies.tables import REL_TOL, Tables, build, latency_costs

Weights = tuple[float, float, float, float]  # ttft, tpot, bottleneck, privacy
_METRICS = ("ttft", "tpot", "bottleneck", "privacy")
# HiGHS may break a row, and leave a binary off its integer, by up to 1e-6 (its mip_feasibility_tolerance,
# which scipy does not expose). SLO rows (scaled to 1) get half the shared slack, so that a plan HiGHS
# admits, rounded, still passes the analytic check (1e-6 + 1e-6 < REL_TOL / 2); a held metric gets the
# whole slack above its exact value, so that the optimum just found stays feasible by well over 1e-6.
_SOLVER_TOL = 1e-6
_SLO_ROW_TOL = REL_TOL / 2
Row = tuple[dict[int, float], float, float]


@dataclass
class _Model:
    """Columns: stages, hops, starts, returns, then z (the bottleneck in units of ``time_unit_s``).

    ``metric`` holds each metric's coefficients in its solver unit: seconds / ``time_unit_s`` for the
    times (and the additive ``latency``), exposure for privacy. ``busy`` holds the rows z must bound."""

    stage_idx: list[tuple[int, int, int]]
    n_cols: int
    time_unit_s: float
    metric: dict[str, np.ndarray]
    busy: list[dict[int, float]]
    rows: list[Row]

    def unit(self, name: str) -> float:
        """Seconds (or exposure) per solver unit of metric ``name``."""
        return 1.0 if name == "privacy" else self.time_unit_s

    def rounded(self, x: np.ndarray) -> np.ndarray:
        """``x`` with its binaries rounded and z the exact bottleneck of that integer point."""
        out = np.round(x)
        out[-1] = 0.0
        out[-1] = max([0.0, *(sum(v * out[k] for k, v in row.items()) for row in self.busy)])
        return out


def milp(
    problem: Problem,
    *,
    policy: str = "milp",
    weights: Weights | None = None,
    order: tuple[str, ...] | None = None,
) -> Plan:
    """Optimal plan of the weighted objective (``weights``, default the problem's) or, in lexicographic
    mode, of the metrics in ``order`` one after another, under every constraint of the problem.

    Metrics within ``REL_TOL`` of each other count as tied. Raises ``InfeasibleError`` naming the binding
    constraint, or ``SolverError`` when HiGHS's answer contradicts the exact model."""
    t = build(problem)
    model = _formulate(problem, t)
    o = problem.objective
    if order is None and weights is None and o.mode == "lexicographic":
        order = o.order
    extra: list[Row] = []
    x: np.ndarray | None = None
    if order is None:
        w = weights if weights is not None else (o.ttft, problem.tpot_weight(), o.bottleneck, o.privacy)
        # The objective in seconds divided by time_unit_s: privacy's term is divided by it too.
        c = sum(
            wk * model.metric[name] * (model.unit(name) / model.time_unit_s)
            for wk, name in zip(w, _METRICS, strict=True)
        )
        x = _solve(model, np.asarray(c, dtype=float), extra)
    else:
        for name in order:
            c = model.metric[name]
            x = _solve(model, c, extra)
            if x is None:
                break
            best = float(c @ x)
            # Hold this metric at its optimum while optimising the next: the slack (above HiGHS's
            # tolerance) keeps the plan just found feasible; plans within it count as tied.
            held = {k: float(v) for k, v in enumerate(c) if v != 0.0}
            extra.append((held, -np.inf, best + REL_TOL * max(1.0, abs(best))))
    if x is None:
        raise diagnose(problem)
    chosen = sorted(
        (model.stage_idx[k] for k in range(len(model.stage_idx)) if x[k] > 0.5), key=lambda s: s[1]
    )
    return _checked_plan(problem, t, model, x, chosen, policy)


def _checked_plan(
    problem: Problem,
    t: Tables,
    model: _Model,
    x: np.ndarray,
    chosen: list[tuple[int, int, int]],
    policy: str,
) -> Plan:
    """The rounded plan, validated and priced by the analytic model. Uncalibrated, that model is the one
    the MILP optimised, so a violation or a metric that disagrees is the solver's error, not the
    problem's; calibrated, queueing the MILP does not see may reject the plan (``InfeasibleError``)."""
    try:
        plan = to_plan(problem, t, chosen, policy)
    except InfeasibleError as err:
        if problem.calibration is not None:
            raise
        raise SolverError(
            f"policy {policy!r}: HiGHS's plan {chosen} fails the analytic check ({err.detail}); "
            "report the problem JSON, or use a search policy (latency_dp, throughput_dp)"
        ) from err
    if problem.calibration is None:
        for name in _METRICS:
            solver = float(model.metric[name] @ x) * model.unit(name)
            exact = metric_value(plan.predicted, name)
            if abs(solver - exact) > REL_TOL * max(abs(exact), model.unit(name)):
                raise SolverError(
                    f"policy {policy!r}: the MILP prices {name} of {chosen} at {solver:.9g}, the analytic "
                    f"model at {exact:.9g}; report the problem JSON, or use a search policy"
                )
    return plan


def _formulate(problem: Problem, t: Tables) -> _Model:
    allowed = latency_costs(
        t, w_ttft=1.0, w_tpot=1.0, w_privacy=1.0, cap_s=throughput_cap_s(problem.constraints)
    )
    L = t.num_layers
    stage_idx = [tuple(int(v) for v in k) for k in np.argwhere(np.isfinite(allowed.stage))]
    hop_idx = [tuple(int(v) for v in k) for k in np.argwhere(np.isfinite(allowed.hop)) if 0 < k[2] < L]
    start_idx = [int(m) for m in np.nonzero(np.isfinite(allowed.start))[0]]
    ret_idx = [int(n) for n in np.nonzero(np.isfinite(allowed.ret))[0]]
    n_s, n_h, n_a, n_r = len(stage_idx), len(hop_idx), len(start_idx), len(ret_idx)
    off_h, off_a, off_r, z = n_s, n_s + n_h, n_s + n_h + n_a, n_s + n_h + n_a + n_r
    n_cols = z + 1
    ttft, tpot, bott, priv = (np.zeros(n_cols) for _ in range(4))
    bott[z] = 1.0
    for k, (m, i, e) in enumerate(stage_idx):
        ttft[k], tpot[k], priv[k] = (
            t.stage_prefill_s[m, i, e],
            t.stage_decode_s[m, i, e],
            t.stage_privacy[m, i, e],
        )
    for k, (p, m, i) in enumerate(hop_idx):
        ttft[off_h + k], tpot[off_h + k] = t.hop_prefill_s[p, m, i], t.hop_decode_s[p, m, i]
    for k, m in enumerate(start_idx):
        ttft[off_a + k], tpot[off_a + k] = t.start_prefill_s[m], t.start_decode_s[m]
    for k, n in enumerate(ret_idx):
        ttft[off_r + k] = tpot[off_r + k] = t.ret_s[n]

    unit_s = _time_unit_s(t, stage_idx)
    for vec in (ttft, tpot):
        vec[:z] /= unit_s
    rows: list[Row] = []
    # Flow conservation at "stage on m begins at i" and "stage on n ended at e".
    begin: dict[tuple[int, int], dict[int, float]] = {}
    ended: dict[tuple[int, int], dict[int, float]] = {}
    for k, (m, i, e) in enumerate(stage_idx):
        begin.setdefault((m, i), {})[k] = -1.0
        ended.setdefault((m, e), {})[k] = 1.0
    for k, (p, m, i) in enumerate(hop_idx):
        begin.setdefault((m, i), {})[off_h + k] = 1.0
        ended.setdefault((p, i), {})[off_h + k] = -1.0
    for k, m in enumerate(start_idx):
        begin.setdefault((m, 0), {})[off_a + k] = 1.0
    for k, n in enumerate(ret_idx):
        ended.setdefault((n, L), {})[off_r + k] = -1.0
    for key in sorted(begin):
        rows.append((begin[key], 0.0, 0.0))
    for key in sorted(ended):
        rows.append((ended[key], 0.0, 0.0))
    rows.append(({off_a + k: 1.0 for k in range(n_a)}, 1.0, 1.0))
    once: dict[int, dict[int, float]] = {}
    busy_stage: dict[int, dict[int, float]] = {}
    busy_hop: dict[int, dict[int, float]] = {}
    for k, (m, i, e) in enumerate(stage_idx):
        once.setdefault(m, {})[k] = 1.0
        busy_stage.setdefault(m, {})[k] = float(t.stage_decode_s[m, i, e]) / unit_s
    for k, (p, m, i) in enumerate(hop_idx):
        busy_hop.setdefault(p, {})[off_h + k] = float(t.hop_busy_s[p, m, i]) / unit_s
    for m in sorted(once):
        rows.append((once[m], -np.inf, 1.0))
    busy = [group[m] for group in (busy_stage, busy_hop) for m in sorted(group)]
    busy.append({off_a + k: float(t.start_busy_s[m]) / unit_s for k, m in enumerate(start_idx)})
    busy.append({off_r + k: float(t.ret_busy_s[n]) / unit_s for k, n in enumerate(ret_idx)})
    rows += [({z: -1.0, **coefs}, -np.inf, 0.0) for coefs in busy]
    c, o = problem.constraints, problem.objective
    for bound_s, vec in ((c.max_ttft_s, ttft), (c.max_tpot_s, tpot)):
        if bound_s is not None:
            # Scaled to 1 at the bound: HiGHS's absolute row tolerance is then relative to the SLO.
            scale = unit_s / bound_s
            rows.append(({k: float(v) * scale for k, v in enumerate(vec) if v}, -np.inf, 1.0 + _SLO_ROW_TOL))
    return _Model(
        stage_idx=[(m, i, e) for m, i, e in stage_idx],
        n_cols=n_cols,
        time_unit_s=unit_s,
        metric={
            "ttft": ttft,
            "tpot": tpot,
            "bottleneck": bott,
            "privacy": priv,
            # The latency DP's additive objective, used to break ties after the bottleneck.
            "latency": o.ttft * ttft + problem.tpot_weight() * tpot + o.privacy / unit_s * priv,
        },
        busy=busy,
        rows=rows,
    )


def _time_unit_s(t: Tables, stage_idx: list[tuple[int, ...]]) -> float:
    """The instance's typical stage decode time: the unit in which the MILP measures seconds."""
    times = [float(t.stage_decode_s[m, i, e]) for m, i, e in stage_idx]
    positive = [v for v in times if v > 0.0]
    return float(np.median(positive)) if positive else 1.0


def _solve(model: _Model, c: np.ndarray, extra: list[Row]) -> np.ndarray | None:
    """The optimum of ``c`` (in solver units) under the model's rows and ``extra``, rounded to an integer
    point with its exact bottleneck; None when HiGHS finds no feasible point."""
    rows = model.rows + extra
    r_idx, c_idx, vals = [], [], []
    lb = np.empty(len(rows))
    ub = np.empty(len(rows))
    for r, (coefs, lo, hi) in enumerate(rows):
        for col in sorted(coefs):
            r_idx.append(r)
            c_idx.append(col)
            vals.append(coefs[col])
        lb[r], ub[r] = lo, hi
    a = coo_matrix((vals, (r_idx, c_idx)), shape=(len(rows), model.n_cols)).tocsr()
    integrality = np.ones(model.n_cols)
    integrality[-1] = 0.0  # z is continuous
    upper = np.ones(model.n_cols)
    upper[-1] = np.inf
    res = scipy_milp(
        c,
        integrality=integrality,
        bounds=Bounds(np.zeros(model.n_cols), upper),
        constraints=LinearConstraint(a, lb, ub),
        options={"mip_rel_gap": 1e-9, "disp": False},
    )
    if res.status != 0 or res.x is None:
        return None
    x = model.rounded(np.asarray(res.x))
    exact, reported = float(c @ x), float(res.fun)
    # HiGHS's z may sit below the busy time it bounds by its tolerance, binaries off by theirs: beyond
    # that, its optimum is not the objective of the plan it returns.
    if abs(exact - reported) > REL_TOL * max(1.0, abs(exact)) + _SOLVER_TOL * float(np.abs(c).sum()):
        raise SolverError(
            f"HiGHS reports objective {reported:.9g} but its rounded plan scores {exact:.9g} "
            f"(in units of {model.time_unit_s:.3g} s); report the problem JSON, or use a search policy"
        )
    return x
