"""The analytic model compiled into arrays over (node, first, end) so that solvers price stages in O(1).

Index conventions: ``N`` nodes in problem order, boundaries ``0..L``; ``stage_*[n, i, e]`` prices node ``n``
running ``[i, e)`` (0 where ``e <= i``, excluded by the masks); ``hop_*[p, m, i]`` prices moving
depth-``i`` activations from
``p`` to ``m``; ``start_*[m]`` the hop source -> first stage, ``ret_*[n]`` the hop last stage -> source.
Infeasible choices (memory, trust, routes) carry ``inf`` in the ``*_ok`` form of the cost arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from policies.analytic import node_times
from policies.problem import Problem
from policies.routes import Routes, all_routes
from policies.tolerance import REL_TOL

INF = np.inf
__all__ = ["INF", "REL_TOL", "Costs", "Tables", "bottleneck_values", "build", "latency_costs"]


@dataclass(frozen=True)
class Tables:
    names: tuple[str, ...]
    src: int
    num_layers: int
    prompt_tokens: int
    stage_prefill_s: np.ndarray  # [N, L+1, L+1]
    stage_decode_s: np.ndarray
    stage_privacy: np.ndarray
    stage_mem_ok: np.ndarray  # bool
    stage_trust_ok: np.ndarray  # bool
    hop_prefill_s: np.ndarray  # [N, N, L+1]
    hop_decode_s: np.ndarray
    hop_busy_s: np.ndarray
    hop_ok: np.ndarray  # bool: distinct nodes, reachable, private routes
    start_prefill_s: np.ndarray  # [N]
    start_decode_s: np.ndarray
    start_busy_s: np.ndarray
    start_ok: np.ndarray
    ret_s: np.ndarray  # [N]
    ret_busy_s: np.ndarray
    ret_ok: np.ndarray
    routes: Routes


@dataclass(frozen=True)
class Costs:
    """One additive objective over the layered graph; ``inf`` marks what may not be chosen."""

    stage: np.ndarray  # [N, L+1, L+1]
    hop: np.ndarray  # [N, N, L+1]
    start: np.ndarray  # [N]
    ret: np.ndarray  # [N]


def build(problem: Problem, *, check_memory: bool | None = None, check_trust: bool = True) -> Tables:
    names = problem.node_names
    n_nodes, L = len(names), problem.num_layers
    prompt = problem.workload.prompt_tokens
    times = node_times(problem)
    pre = np.array([times[n].prefill_s for n in names], dtype=float)
    dec = np.array([times[n].decode_s for n in names], dtype=float)
    head_p = np.array([times[n].head_prefill_s for n in names], dtype=float)
    head_d = np.array([times[n].head_decode_s for n in names], dtype=float)
    pre_cum = np.concatenate([np.zeros((n_nodes, 1)), np.cumsum(pre, axis=1)], axis=1)
    dec_cum = np.concatenate([np.zeros((n_nodes, 1)), np.cumsum(dec, axis=1)], axis=1)
    valid = np.triu(np.ones((L + 1, L + 1), dtype=bool), k=1)
    last = np.zeros(L + 1)
    last[L] = 1.0
    st_pre = prompt * (
        pre_cum[:, None, :] - pre_cum[:, :, None] + last[None, None, :] * head_p[:, None, None]
    )
    wait = np.array([times[n].wait_s for n in names], dtype=float)  # per step on the node (calibration)
    st_dec = (
        dec_cum[:, None, :]
        - dec_cum[:, :, None]
        + last[None, None, :] * head_d[:, None, None]
        + wait[:, None, None]
    )
    # Entries outside e > i are never chosen (the *_ok masks exclude them); zeros keep weighted sums free
    # of inf * 0 = nan.
    st_pre = np.where(valid[None], st_pre, 0.0)
    st_dec = np.where(valid[None], st_dec, 0.0)

    c = problem.constraints
    trust = np.array([problem.node(n).trust for n in names])
    trusted = trust >= c.trust_threshold
    untrust_w = np.where(trusted, 0.0, 1.0 - trust)
    depth = np.arange(L + 1)
    st_priv = np.broadcast_to((untrust_w[:, None] * (1.0 - depth / L))[:, :, None], (n_nodes, L + 1, L + 1))

    mem_need = _memory_need(problem)
    mem = np.array([problem.node(n).mem_bytes for n in names], dtype=float)
    do_mem = c.check_memory if check_memory is None else check_memory
    mem_ok = (mem_need[None] <= mem[:, None, None]) if do_mem else np.ones((n_nodes, L + 1, L + 1), bool)
    trust_ok = np.ones((n_nodes, L + 1, L + 1), dtype=bool)
    if check_trust:
        first_min = max(c.trusted_prefix_layers, c.private_depth)
        trust_ok &= trusted[:, None, None] | (depth[None, :, None] >= first_min)
        if c.trusted_head:
            trust_ok[:, :, L] &= trusted[:, None]

    routes = all_routes(problem)
    bw = routes.bw_mbit * 1e6
    reach = bw > 0
    delay = np.where(reach, routes.delay_s, 0.0)  # unreachable pairs are excluded by hop_ok
    path_trusted = routes.trusted
    with np.errstate(divide="ignore"):
        inv_bw = np.where(reach, 8.0 / np.where(reach, bw, 1.0), 0.0)  # seconds per byte; 0 on the diagonal
    act = np.array([_act_bytes(problem, i) for i in range(L + 1)], dtype=float)
    frame = float(problem.model.frame_bytes)
    free = routes.free_bytes

    def message_s(nbytes: np.ndarray | float) -> np.ndarray:
        """Seconds one message of ``nbytes`` (per boundary, frame included) is slowed by each route: its
        bytes beyond the route's burst. Shape (nodes, nodes, len(nbytes))."""
        return inv_bw[:, :, None] * np.maximum(0.0, np.atleast_1d(nbytes)[None, None, :] - free[:, :, None])

    eye = np.eye(n_nodes, dtype=bool)
    same = eye[:, :, None]
    overhead, slope = _hop_terms(problem, names)
    busy = np.where(same, 0.0, inv_bw[:, :, None] * (act + frame)[None, None, :])
    fixed = np.maximum(0.0, delay + overhead)  # per hop: propagation and the learned software cost
    hop_pre = np.where(same, 0.0, fixed[:, :, None] + slope[:, :, None] * message_s(prompt * act + frame))
    hop_dec = np.where(same, 0.0, fixed[:, :, None] + slope[:, :, None] * message_s(act + frame))
    private = depth < c.private_depth if check_trust else np.zeros(L + 1, dtype=bool)
    hop_ok = (~same) & reach[:, :, None] & (path_trusted[:, :, None] | ~private[None, None, :])

    s = names.index(problem.source)
    in_b = float(problem.model.input_bytes_per_token)
    out_b = float(problem.model.output_bytes_per_token)
    # The source's own hops: to the first stage and back from the last; within the source node (the
    # gateway and a stage there) they cost the hop's software only.
    start_busy = np.where(eye[s], 0.0, inv_bw[s] * (in_b + frame))
    local = max(0.0, float(overhead[s, s]))
    start_pre = np.where(eye[s], local, fixed[s] + slope[s] * message_s(prompt * in_b + frame)[s, :, 0])
    start_dec = np.where(eye[s], local, fixed[s] + slope[s] * message_s(in_b + frame)[s, :, 0])
    start_ok = reach[s] & (path_trusted[s] | (not bool(private[0])))
    ret_busy = np.where(eye[s], 0.0, inv_bw[:, s] * (out_b + frame))
    ret = np.where(eye[s], local, fixed[:, s] + slope[:, s] * message_s(out_b + frame)[:, s, 0])
    return Tables(
        names=names,
        src=s,
        num_layers=L,
        prompt_tokens=prompt,
        stage_prefill_s=st_pre,
        stage_decode_s=st_dec,
        stage_privacy=st_priv,
        stage_mem_ok=mem_ok & valid[None],
        stage_trust_ok=trust_ok & valid[None],
        hop_prefill_s=hop_pre,
        hop_decode_s=hop_dec,
        hop_busy_s=busy,
        hop_ok=hop_ok,
        start_prefill_s=start_pre,
        start_decode_s=start_dec,
        start_busy_s=start_busy,
        start_ok=start_ok,
        ret_s=ret,
        ret_busy_s=ret_busy,
        ret_ok=reach[:, s],
        routes=routes,
    )


def _hop_terms(problem: Problem, names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Learned software cost (seconds) and goodput slope of every directed hop; 0 and 1 uncalibrated."""
    size = len(names)
    cal = problem.calibration
    if cal is None:
        return np.zeros((size, size)), np.ones((size, size))
    overhead = np.array([[cal.hop_overhead(a, b) for b in names] for a in names], dtype=float)
    slope = np.array([[cal.hop_slope(a, b) for b in names] for a in names], dtype=float)
    return overhead, slope


def _act_bytes(problem: Problem, depth: int) -> int:
    if depth == 0:
        return problem.model.input_bytes_per_token
    return problem.model.layers[depth - 1].act_bytes_per_token


def _memory_need(problem: Problem) -> np.ndarray:
    L = problem.num_layers
    w = np.array([layer.weight_bytes for layer in problem.model.layers], dtype=float)
    kv = np.array([layer.kv_bytes_per_token for layer in problem.model.layers], dtype=float)
    ctx = problem.workload.context_tokens * problem.workload.concurrent_sessions
    per = np.concatenate([[0.0], np.cumsum(w + ctx * kv)])
    need = per[None, :] - per[:, None]
    need[0, :] += problem.model.embed_weight_bytes
    need[:, L] += problem.model.head_weight_bytes
    return need


def latency_costs(
    t: Tables,
    *,
    w_ttft: float,
    w_tpot: float,
    w_privacy: float,
    cap_s: float = INF,
    cap_source_hops: bool = True,
) -> Costs:
    """The additive objective w_ttft*TTFT + w_tpot*TPOT + w_privacy*exposure, with every stage and hop
    whose busy time exceeds ``cap_s`` forbidden (a throughput floor, or a bottleneck search's threshold)."""
    stage = w_ttft * t.stage_prefill_s + w_tpot * t.stage_decode_s + w_privacy * t.stage_privacy
    stage_ok = t.stage_mem_ok & t.stage_trust_ok & (t.stage_decode_s <= cap_s)
    hop = w_ttft * t.hop_prefill_s + w_tpot * t.hop_decode_s
    hop_ok = t.hop_ok & (t.hop_busy_s <= cap_s)
    start = w_ttft * t.start_prefill_s + w_tpot * t.start_decode_s
    ret = (w_ttft + w_tpot) * t.ret_s
    start_ok, ret_ok = t.start_ok, t.ret_ok
    if cap_source_hops:
        start_ok = start_ok & (t.start_busy_s <= cap_s)
        ret_ok = ret_ok & (t.ret_busy_s <= cap_s)
    return Costs(
        stage=np.where(stage_ok, stage, INF),
        hop=np.where(hop_ok, hop, INF),
        start=np.where(start_ok, start, INF),
        ret=np.where(ret_ok, ret, INF),
    )


def bottleneck_values(t: Tables, costs: Costs, *, include_source_hops: bool = True) -> np.ndarray:
    """Sorted distinct busy times of every allowed stage and hop: the candidate optimal bottlenecks."""
    parts = [t.stage_decode_s[np.isfinite(costs.stage)], t.hop_busy_s[np.isfinite(costs.hop)]]
    if include_source_hops:
        parts += [t.start_busy_s[np.isfinite(costs.start)], t.ret_busy_s[np.isfinite(costs.ret)]]
    return np.unique(np.concatenate(parts))
