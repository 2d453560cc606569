"""Routes between nodes over the link graph (pure; Dijkstra from scipy).

The network, not the planner, picks routes: a transfer follows the path of least total RTT (ties: fewer
hops), its one-way delay is half that path's RTT and its rate is the narrowest link on the path, because a
TCP stream through routers runs at the bottleneck rate. Unreachable pairs have rate 0 and infinite delay.
A route's burst (``policies.problem.Link.free_bytes``) is its narrowest link's: a message after a pause
is slowed only by its bytes beyond it (``message_serialisation_s``), while what a link carries over time
is bound by its rate (``serialisation_s``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import dijkstra

from policies.problem import Problem

# Breaks RTT ties toward fewer hops, and keeps zero-RTT links as edges of the sparse graph.
_HOP_TIEBREAK_MS = 1e-6


@dataclass(frozen=True)
class Route:
    nodes: tuple[str, ...]
    delay_s: float
    bw_mbit: float  # inf for a node to itself, 0 when unreachable
    burst_bytes: float = 0.0  # the narrowest link's burst floor and burst time (Link.free_bytes)
    burst_s: float = 0.0

    def free_bytes(self, bw_mbit: float | None = None) -> float:
        """Bytes the route's narrowest link passes at line rate after a pause (at ``bw_mbit``)."""
        rate = self.bw_mbit if bw_mbit is None else bw_mbit
        per_s = rate * 1e6 / 8.0 if math.isfinite(rate) else 0.0
        return max(self.burst_bytes, self.burst_s * per_s)


class Routes:
    """All-pairs routes as arrays (``delay_s``, ``bw_mbit``, ``trusted``), paths built on demand."""

    def __init__(self, problem: Problem) -> None:
        names = problem.node_names
        self.names = names
        self.index = {n: k for k, n in enumerate(names)}
        size = len(names)
        weight = np.zeros((size, size))
        rtt = np.zeros((size, size))
        bw = np.zeros((size, size))
        burst = np.zeros((2, size, size))  # per link: burst floor (bytes), burst time (s)
        for link in problem.links:
            a, b = self.index[link.a], self.index[link.b]
            weight[a, b] = weight[b, a] = link.rtt_ms + _HOP_TIEBREAK_MS
            rtt[a, b] = rtt[b, a] = link.rtt_ms
            bw[a, b] = bw[b, a] = link.bw_mbit
            burst[:, a, b] = burst[:, b, a] = (link.burst_bytes, link.burst_s)
        _dist, pred = dijkstra(csr_matrix(weight), directed=False, return_predecessors=True)
        self._pred = pred
        trusted = np.array([n.trust >= problem.constraints.trust_threshold for n in problem.nodes])
        self.delay_s, self.bw_mbit, self.trusted, self.burst = _accumulate(pred, rtt, bw, burst, trusted)
        with np.errstate(invalid="ignore"):
            per_s = np.where(np.isfinite(self.bw_mbit), self.bw_mbit * 1e6 / 8.0, 0.0)
        # Bytes each route passes at line rate after a pause (0 within a node: nothing crosses a link).
        self.free_bytes = np.maximum(self.burst[0], self.burst[1] * per_s)
        # Built once per pair: the online calibration asks for the same few routes for every step.
        self._built: dict[tuple[str, str], Route] = {}

    def get(self, a: str, b: str) -> Route:
        route = self._built.get((a, b))
        if route is None:
            route = self._built[(a, b)] = self._build(a, b)
        return route

    def _build(self, a: str, b: str) -> Route:
        s, d = self.index[a], self.index[b]
        if s == d:
            return Route((a,), 0.0, math.inf)
        if self._pred[s, d] < 0:
            return Route((), math.inf, 0.0)
        path = [d]
        while path[-1] != s:
            path.append(int(self._pred[s, path[-1]]))
        nodes = tuple(self.names[k] for k in reversed(path))
        burst_bytes, burst_s = (float(x) for x in self.burst[:, s, d])
        return Route(nodes, float(self.delay_s[s, d]), float(self.bw_mbit[s, d]), burst_bytes, burst_s)


def links_used(problem: Problem, nodes: Sequence[str], routes: Routes | None = None) -> frozenset[str]:
    """The links (``"a-b"`` as ``problem.links`` names them) that a chain from the source through
    ``nodes`` and back to the source crosses (a hop from or to a node the problem lacks, a failed one,
    crosses none)."""
    routes = routes or all_routes(problem)
    names = {frozenset((lk.a, lk.b)): f"{lk.a}-{lk.b}" for lk in problem.links}
    hops = [problem.source, *nodes, problem.source]
    used = set()
    for a, b in itertools.pairwise(hops):
        if a not in routes.index or b not in routes.index:
            continue
        path = routes.get(a, b).nodes
        used |= {names[frozenset(pair)] for pair in itertools.pairwise(path)}
    return frozenset(used)


def _accumulate(
    pred: np.ndarray, rtt: np.ndarray, bw: np.ndarray, burst: np.ndarray, trusted: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Delay, narrowest rate, the narrowest link's burst and all-trusted flag of every shortest path, one
    hop level at a time: a pair's values follow from its predecessor pair's, all pairs at once."""
    size = pred.shape[0]
    src = np.repeat(np.arange(size)[:, None], size, axis=1)
    dst = np.repeat(np.arange(size)[None, :], size, axis=0)
    delay = np.full((size, size), np.inf)
    rate = np.zeros((size, size))
    narrow_burst = np.zeros((2, size, size))
    path_ok = np.zeros((size, size), dtype=bool)
    diag = np.eye(size, dtype=bool)
    delay[diag], rate[diag], path_ok[diag] = 0.0, np.inf, trusted
    known = diag.copy()
    reach = pred >= 0
    p = np.where(reach, pred, 0)
    for _ in range(size):
        ready = reach & ~known & known[src, p]
        if not ready.any():
            break
        s, d, q = src[ready], dst[ready], p[ready]
        delay[s, d] = delay[s, q] + rtt[q, d] / 2000.0
        # The first link at the narrowest rate keeps its burst (the same on ties as _narrowest_link).
        narrower = bw[q, d] < rate[s, q]
        narrow_burst[:, s, d] = np.where(narrower, burst[:, q, d], narrow_burst[:, s, q])
        rate[s, d] = np.minimum(rate[s, q], bw[q, d])
        path_ok[s, d] = path_ok[s, q] & trusted[d]
        known |= ready
    return delay, rate, path_ok, narrow_burst


def all_routes(problem: Problem) -> Routes:
    return Routes(problem)


def transfer_s(route: Route, num_bytes: float) -> float:
    """Seconds to deliver ``num_bytes`` along ``route``: one-way delay plus serialisation at its rate."""
    if len(route.nodes) == 1:
        return 0.0
    if route.bw_mbit == 0.0:
        return math.inf
    return route.delay_s + message_serialisation_s(route, num_bytes)


def message_serialisation_s(route: Route, num_bytes: float, bw_mbit: float | None = None) -> float:
    """Seconds one message after a pause is slowed by the route's rate (``bw_mbit``, default its own):
    its bytes beyond the narrowest link's burst."""
    if len(route.nodes) == 1:
        return 0.0
    rate = route.bw_mbit if bw_mbit is None else bw_mbit
    if rate == 0.0:
        return math.inf
    return 8.0 * max(0.0, num_bytes - route.free_bytes(rate)) / (rate * 1e6)


def serialisation_s(route: Route, num_bytes: float) -> float:
    """Seconds the route's narrowest link is busy with ``num_bytes`` (what limits pipelined throughput)."""
    if len(route.nodes) == 1:
        return 0.0
    if route.bw_mbit == 0.0:
        return math.inf
    return 8.0 * num_bytes / (route.bw_mbit * 1e6)
