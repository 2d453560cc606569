"""Search over the layered graph of (boundary, last node) states, with each node used at most once.

``relaxed_to_go`` is the exact dynamic programme of the problem *without* the one-stage-per-node rule
(EdgeShard's recurrence): O(L^2 N + L N^2) with numpy. Its cost-to-go is an admissible, consistent bound,
so ``exact`` (A* over (boundary, last node, used set) with that bound and an incumbent to prune by) returns
the true optimum; when the relaxed optimum already uses distinct nodes A* pops it first. ``beam`` keeps the
``width`` best partial plans per round under the same bound: the scalable heuristic.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from policies.errors import SearchLimitError
from policies.tables import INF, Costs

# (node index, first, end)
RawStage = tuple[int, int, int]


@dataclass(frozen=True)
class Found:
    value: float
    stages: tuple[RawStage, ...]
    expansions: int


def relaxed_to_go(costs: Costs) -> tuple[np.ndarray, np.ndarray]:
    """``to_go[m, e]``: least cost from boundary ``e`` with the last stage on ``m`` to the end (``ret`` at
    e = L), and ``enter[m, i]``: least cost of a stage on ``m`` starting at ``i`` plus its cost-to-go."""
    n_nodes, n_bound = costs.start.shape[0], costs.stage.shape[1]
    L = n_bound - 1
    to_go = np.full((n_nodes, n_bound), INF)
    enter = np.full((n_nodes, n_bound), INF)
    to_go[:, L] = costs.ret
    for i in range(L - 1, -1, -1):
        enter[:, i] = np.min(costs.stage[:, i, i + 1 :] + to_go[:, i + 1 :], axis=1)
        if i > 0:
            to_go[:, i] = np.min(costs.hop[:, :, i] + enter[None, :, i], axis=1)
    return to_go, enter


def lower_bound(costs: Costs, enter: np.ndarray) -> float:
    return float(np.min(costs.start + enter[:, 0]))


def capacity(costs: Costs) -> np.ndarray:
    """Most layers each node can run in one stage (0 if none): a node serves once, so the nodes still
    unused must together be able to cover the layers still left."""
    n_bound = costs.stage.shape[1]
    span = np.arange(n_bound)[None, :] - np.arange(n_bound)[:, None]
    return np.max(np.where(np.isfinite(costs.stage), span[None], 0), axis=(1, 2))


def _children(
    costs: Costs, to_go: np.ndarray, cap: np.ndarray, i: int, n: int, used: np.ndarray, g: float
) -> tuple[np.ndarray, np.ndarray]:
    """Cost so far and bound of every (next node, end) move; ``inf`` where not allowed or where the
    nodes left could not cover the remaining layers."""
    hop = costs.start if n < 0 else costs.hop[n, :, i]
    g_next = g + hop[:, None] + costs.stage[:, i, :]
    g_next[used] = INF
    L = to_go.shape[1] - 1
    left = cap[~used].sum() - cap  # capacity of the other unused nodes after taking m
    short = left[:, None] < (L - np.arange(L + 1))[None, :]
    g_next[short] = INF
    return g_next, g_next + to_go


def exact(
    costs: Costs,
    to_go: np.ndarray,
    *,
    incumbent: Found | None = None,
    max_expansions: int = 200_000,
) -> Found | None:
    """Optimal plan (or ``None`` if there is none). ``incumbent`` only prunes; it is returned if nothing
    strictly better exists."""
    n_nodes, n_bound = to_go.shape
    L = n_bound - 1
    bound = incumbent.value if incumbent is not None else INF
    cap = capacity(costs)
    tie = 0
    heap: list[tuple[float, int, int, int, int, float, tuple[RawStage, ...]]] = [(0.0, 0, 0, -1, 0, 0.0, ())]
    closed: set[tuple[int, int, int]] = set()
    expansions = 0
    while heap:
        f, _t, i, n, mask, g, stages = heapq.heappop(heap)
        if f >= bound:
            break
        if i == L:
            return Found(f, stages, expansions)  # f = g + return hop at the end
        key = (i, n, mask)
        if key in closed:
            continue
        closed.add(key)
        expansions += 1
        if expansions > max_expansions:
            raise SearchLimitError(
                f"exact search passed {max_expansions} states; use policy 'heuristic' at this size"
            )
        used = np.array([(mask >> k) & 1 == 1 for k in range(n_nodes)])
        g_next, f_next = _children(costs, to_go, cap, i, n, used, g)
        ms, es = np.nonzero(f_next < bound)
        for m, e in zip(ms.tolist(), es.tolist(), strict=True):
            tie += 1
            heapq.heappush(
                heap,
                (float(f_next[m, e]), tie, e, m, mask | (1 << m), float(g_next[m, e]), (*stages, (m, i, e))),
            )
    return incumbent


def beam(costs: Costs, to_go: np.ndarray, *, width: int) -> Found | None:
    """Best plan found keeping the ``width`` most promising partial plans per round."""
    n_nodes, n_bound = to_go.shape
    L = n_bound - 1
    frontier: list[tuple[float, int, int, int, tuple[RawStage, ...]]] = [(0.0, 0, -1, 0, ())]
    best: Found | None = None
    cap = capacity(costs)
    expansions = 0
    while frontier:
        cand_f: list[np.ndarray] = []
        cand_g: list[np.ndarray] = []
        owner: list[int] = []
        for k, (g, i, n, mask, _stages) in enumerate(frontier):
            expansions += 1
            used = np.array([(mask >> j) & 1 == 1 for j in range(n_nodes)])
            g_next, f_next = _children(costs, to_go, cap, i, n, used, g)
            cand_f.append(f_next.ravel())
            cand_g.append(g_next.ravel())
            owner.append(k)
        flat_f = np.concatenate(cand_f)
        flat_g = np.concatenate(cand_g)
        per = n_nodes * n_bound
        terminal = (np.arange(flat_f.size) % n_bound) == L
        done = np.where(terminal, flat_f, INF)  # bound at the end = cost incl. the return hop
        pos = int(np.argmin(done))
        if np.isfinite(done[pos]) and (best is None or done[pos] < best.value):
            m = (pos % per) // n_bound
            parent = frontier[owner[pos // per]]
            best = Found(float(done[pos]), (*parent[4], (m, parent[1], L)), expansions)
        cut = best.value if best is not None else INF
        ok = np.nonzero((flat_f < cut) & ~terminal)[0]
        # Stable order on (bound, position) keeps ties deterministic.
        order = ok[np.lexsort((ok, flat_f[ok]))]
        nxt: list[tuple[float, int, int, int, tuple[RawStage, ...]]] = []
        seen: set[tuple[int, int, int]] = set()
        for pos in order.tolist():
            parent = frontier[owner[pos // per]]
            m, e = divmod(pos % per, n_bound)
            key = (e, m, parent[3] | (1 << m))
            if key in seen:
                continue
            seen.add(key)
            nxt.append((float(flat_g[pos]), e, m, key[2], (*parent[4], (m, parent[1], e))))
            if len(nxt) >= width:
                break
        frontier = nxt
    return best
