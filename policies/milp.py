"""The constrained multi-objective form as a mixed-integer linear programme (scipy.optimize.milp / HiGHS).

A unit of flow runs source -> first stage -> ... -> last stage -> source through a layered graph:
binary ``s[m,i,e]`` (node m runs [i, e)), ``h[p,m,i]`` (depth-i activations go p -> m), ``a[m]`` (the
source feeds m) and ``r[n]`` (n returns the token). The graph is acyclic in depth, so integral flow is one
pipeline; ``sum_{i,e} s[m,i,e] <= 1`` makes every node serve at most once. A continuous ``z`` bounds every
stage's and hop's busy time (one stage and one outgoing hop per node, so one row per node suffices), which
makes 1/throughput linear. TTFT and TPOT are linear in the arcs, so SLO bounds are rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint
from scipy.optimize import milp as scipy_milp
from scipy.sparse import coo_matrix

from policies.plan import Plan
from policies.problem import Problem
from policies.solvers import diagnose, throughput_cap_s, to_plan
from policies.tables import REL_TOL, Tables, build, latency_costs

Weights = tuple[float, float, float, float]  # ttft, tpot, bottleneck, privacy
_METRICS = ("ttft", "tpot", "bottleneck", "privacy")


@dataclass
class _Model:
    """Columns: stages, hops, starts, returns, then z. Coefficient rows per metric."""

    stage_idx: list[tuple[int, int, int]]
    n_cols: int
    metric: dict[str, np.ndarray]
    rows: list[tuple[dict[int, float], float, float]]


def milp(
    problem: Problem,
    *,
    policy: str = "milp",
    weights: Weights | None = None,
    order: tuple[str, ...] | None = None,
) -> Plan:
    """Optimal plan of the weighted objective (``weights``, default the problem's) or, in lexicographic
    mode, of the metrics in ``order`` one after another, under every constraint of the problem."""
    t = build(problem)
    model = _formulate(problem, t)
    o = problem.objective
    if order is None and weights is None and o.mode == "lexicographic":
        order = o.order
    extra: list[tuple[dict[int, float], float, float]] = []
    if order is None:
        w = weights if weights is not None else (o.ttft, problem.tpot_weight(), o.bottleneck, o.privacy)
        c = sum(wk * model.metric[name] for wk, name in zip(w, _METRICS, strict=True))
        x = _solve(model, c, extra)
    else:
        x = None
        for name in order:
            c = model.metric[name]
            x = _solve(model, c, extra)
            if x is None:
                break
            best = float(c @ x)
            # Hold this metric at its optimum (with solver slack) while optimising the next one.
            extra.append(
                ({k: float(v) for k, v in enumerate(c) if v != 0.0}, -np.inf, best * (1 + 1e-7) + 1e-12)
            )
    if x is None:
        raise diagnose(problem)
    chosen = sorted(
        (model.stage_idx[k] for k in range(len(model.stage_idx)) if x[k] > 0.5), key=lambda s: s[1]
    )
    return to_plan(problem, t, chosen, policy)


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

    rows: list[tuple[dict[int, float], float, float]] = []
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
        busy_stage.setdefault(m, {z: -1.0})[k] = float(t.stage_decode_s[m, i, e])
    for k, (p, m, i) in enumerate(hop_idx):
        busy_hop.setdefault(p, {z: -1.0})[off_h + k] = float(t.hop_busy_s[p, m, i])
    for m in sorted(once):
        rows.append((once[m], -np.inf, 1.0))
    for group in (busy_stage, busy_hop):
        for m in sorted(group):
            rows.append((group[m], -np.inf, 0.0))
    rows.append(
        ({z: -1.0, **{off_a + k: float(t.start_busy_s[m]) for k, m in enumerate(start_idx)}}, -np.inf, 0.0)
    )
    rows.append(
        ({z: -1.0, **{off_r + k: float(t.ret_busy_s[n]) for k, n in enumerate(ret_idx)}}, -np.inf, 0.0)
    )
    c, o = problem.constraints, problem.objective
    if c.max_ttft_s is not None:
        rows.append(({k: float(v) for k, v in enumerate(ttft) if v}, -np.inf, c.max_ttft_s * (1 + REL_TOL)))
    if c.max_tpot_s is not None:
        rows.append(({k: float(v) for k, v in enumerate(tpot) if v}, -np.inf, c.max_tpot_s * (1 + REL_TOL)))
    return _Model(
        stage_idx=[(m, i, e) for m, i, e in stage_idx],
        n_cols=n_cols,
        metric={
            "ttft": ttft,
            "tpot": tpot,
            "bottleneck": bott,
            "privacy": priv,
            # The latency DP's additive objective, used to break ties after the bottleneck.
            "latency": o.ttft * ttft + problem.tpot_weight() * tpot + o.privacy * priv,
        },
        rows=rows,
    )


def _solve(
    model: _Model, c: np.ndarray, extra: list[tuple[dict[int, float], float, float]]
) -> np.ndarray | None:
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
    return np.asarray(res.x)
