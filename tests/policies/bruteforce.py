"""Enumeration of every plan (ordered distinct nodes x contiguous ranges) of a small problem.

Prices plans with the compiled tables, vectorised over all compositions of the layers for one node
sequence; ``test_tables_match_reference_model`` checks those tables against ``policies.analytic``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from policies.problem import Problem
from policies.solvers import throughput_cap_s
from policies.tables import REL_TOL, build


@dataclass(frozen=True)
class Enumerated:
    blocks: list[tuple[np.ndarray, np.ndarray]]  # (node sequences [P, k], boundaries [C, k+1]) per k
    ttft: np.ndarray
    tpot: np.ndarray
    bottleneck: np.ndarray
    privacy: np.ndarray
    structural_ok: np.ndarray  # memory, trust, routes, throughput floor
    slo_ok: np.ndarray  # max_ttft, max_tpot

    def layout(self, flat: int) -> tuple[tuple[int, int, int], ...]:
        for perms, comps in self.blocks:
            size = len(perms) * len(comps)
            if flat < size:
                p, c = divmod(flat, len(comps))
                k = perms.shape[1]
                return tuple((int(perms[p, j]), int(comps[c, j]), int(comps[c, j + 1])) for j in range(k))
            flat -= size
        raise IndexError(flat)


def _compositions(n_layers: int, k: int) -> np.ndarray:
    cuts = list(itertools.combinations(range(1, n_layers), k - 1))
    return np.array([(0, *c, n_layers) for c in cuts], dtype=int).reshape(len(cuts), k + 1)


def enumerate_plans(problem: Problem) -> Enumerated:
    """Every plan, as flat arrays over (node sequence, composition) for k = 1..min(N, L) stages."""
    t = build(problem)
    L, n_nodes = t.num_layers, len(t.names)
    cap = throughput_cap_s(problem.constraints)
    c = problem.constraints
    blocks: list[tuple[np.ndarray, np.ndarray]] = []
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("ttft", "tpot", "bott", "priv", "ok", "slo")}
    for k in range(1, min(n_nodes, L) + 1):
        comp = _compositions(L, k)
        perms = np.array(list(itertools.permutations(range(n_nodes), k)), dtype=int).reshape(-1, k)
        blocks.append((perms, comp))
        first, last = perms[:, 0][:, None], perms[:, -1][:, None]
        shape = (len(perms), len(comp))
        ttft = np.broadcast_to(t.start_prefill_s[first] + t.ret_s[last], shape).copy()
        tpot = np.broadcast_to(t.start_decode_s[first] + t.ret_s[last], shape).copy()
        bott = np.broadcast_to(np.maximum(t.start_busy_s[first], t.ret_busy_s[last]), shape).copy()
        priv = np.zeros(shape)
        ok = np.broadcast_to(t.start_ok[first] & t.ret_ok[last], shape).copy()
        for j in range(k):
            n = perms[:, j][:, None]
            i, e = comp[:, j][None, :], comp[:, j + 1][None, :]
            ttft += t.stage_prefill_s[n, i, e]
            tpot += t.stage_decode_s[n, i, e]
            priv += t.stage_privacy[n, i, e]
            bott = np.maximum(bott, t.stage_decode_s[n, i, e])
            ok &= t.stage_mem_ok[n, i, e] & t.stage_trust_ok[n, i, e]
            if j > 0:
                prev = perms[:, j - 1][:, None]
                ttft += t.hop_prefill_s[prev, n, i]
                tpot += t.hop_decode_s[prev, n, i]
                bott = np.maximum(bott, t.hop_busy_s[prev, n, i])
                ok &= t.hop_ok[prev, n, i]
        ok &= bott <= cap
        slo = np.ones(shape, dtype=bool)
        if c.max_ttft_s is not None:
            slo &= ttft <= c.max_ttft_s * (1 + REL_TOL)
        if c.max_tpot_s is not None:
            slo &= tpot <= c.max_tpot_s * (1 + REL_TOL)
        for key, val in (
            ("ttft", ttft),
            ("tpot", tpot),
            ("bott", bott),
            ("priv", priv),
            ("ok", ok),
            ("slo", slo),
        ):
            cols[key].append(val.ravel())
    return Enumerated(
        blocks=blocks,
        ttft=np.concatenate(cols["ttft"]),
        tpot=np.concatenate(cols["tpot"]),
        bottleneck=np.concatenate(cols["bott"]),
        privacy=np.concatenate(cols["priv"]),
        structural_ok=np.concatenate(cols["ok"]),
        slo_ok=np.concatenate(cols["slo"]),
    )
