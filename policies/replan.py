"""Re-planning with hysteresis: adopt a new plan only when its gain over a horizon clears its migration cost.

Costs follow a make-before-break switch (what ``flows.deploy`` does): the target nodes fetch the layer
weights they lack while the current plan keeps serving, so fetching delays the gain rather than stopping
service; then every live session pauses once for a fixed switch stall plus the time to bring its KV cache
to the new owners. Per session, the first ``k`` stages of the candidate recompute their KV from the token
history the gateway keeps (one prefill through them) and the other stages receive the KV of their layers
from the old holders; ``k`` is chosen by predicted cost, from 0 (move everything: wins on fast links) to
all stages (replay: wins when the KV would cross a slow link, and the only way when an old holder is gone).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict

from policies.analytic import node_times, predict, violations, weighted_objective
from policies.plan import Metrics, Plan, Stage
from policies.problem import Problem
from policies.routes import Routes, all_routes, transfer_s


class MigrationCost(BaseModel):
    model_config = ConfigDict(frozen=True)

    weight_bytes: int
    weight_s: float
    kv_bytes: int
    kv_move_s: float  # move every moved layer's KV (k = 0)
    kv_recompute_s: float  # recompute on every stage (k = all)
    kv_mode: Literal["none", "move", "recompute", "mixed"]
    recompute_stages: int  # k: the candidate's first k stages recompute, the rest receive KV
    kv_s: float  # the predicted KV time per switch for the chosen k
    stall_s: float  # what each live session waits at the switch
    total_s: float  # objective seconds lost: live sessions x stall + gain forgone while fetching


class Decision(BaseModel):
    model_config = ConfigDict(frozen=True)

    adopt: bool
    reason: str
    gain_s: float  # objective seconds saved over the horizon, before cost
    cost: MigrationCost
    current: Metrics | None
    candidate: Metrics


def decide(
    problem: Problem,
    current: Plan,
    candidate: Plan,
    horizon_s: float,
    *,
    switch_stall_s: float = 0.05,
    min_gain_ratio: float = 0.05,
    store_node: str | None = None,
    kv_mode: Literal["auto", "move", "recompute"] = "auto",
) -> Decision:
    """Compare ``current`` (re-priced under ``problem``, the newest profiles) with ``candidate``.

    Adopt only when (a) the current plan is no longer feasible, or (b) the candidate's objective is at
    least ``min_gain_ratio`` better per request AND the gain over ``horizon_s`` exceeds the migration
    cost. ``store_node`` holds every layer (the model store); layers whose current holder is gone are
    fetched from it (default: a cloud node, else the source).
    """
    routes = all_routes(problem)
    cand_metrics = predict(problem, candidate.stages, routes)
    cost = migration_cost(
        problem, current.stages, candidate.stages, routes, store_node, kv_mode, switch_stall_s
    )
    broken = violations(problem, current.stages, routes)
    if broken:
        return Decision(
            adopt=True,
            reason=f"current plan infeasible ({broken[0].constraint}: {broken[0].detail})",
            gain_s=float("inf"),
            cost=cost,
            current=None,
            candidate=cand_metrics,
        )
    cur_metrics = predict(problem, current.stages, routes)
    j_cur = weighted_objective(problem, cur_metrics)
    j_new = weighted_objective(problem, cand_metrics)
    per_request = j_cur - j_new
    rate = _requests_per_s(problem, cur_metrics)
    # Gain over the whole horizon; the part lost while the targets fetch weights is counted as cost.
    gain = per_request * rate * horizon_s
    forgone = per_request * rate * min(horizon_s, cost.weight_s)
    total = cost.stall_s * problem.workload.concurrent_sessions + max(0.0, forgone)
    cost = cost.model_copy(update={"total_s": total})
    if candidate.layout() == _layout(current.stages):
        return Decision(
            adopt=False,
            reason="same plan",
            gain_s=0.0,
            cost=cost,
            current=cur_metrics,
            candidate=cand_metrics,
        )
    if j_cur <= 0 or per_request < min_gain_ratio * j_cur:
        share = per_request / j_cur if j_cur > 0 else 0.0
        reason = f"gain {share:.2%} per request < threshold {min_gain_ratio:.0%}"
        return Decision(
            adopt=False, reason=reason, gain_s=gain, cost=cost, current=cur_metrics, candidate=cand_metrics
        )
    if gain <= total:
        reason = f"gain {gain:.3g} s over {horizon_s:g} s does not clear migration cost {total:.3g} s"
        return Decision(
            adopt=False, reason=reason, gain_s=gain, cost=cost, current=cur_metrics, candidate=cand_metrics
        )
    reason = f"gain {gain:.3g} s over {horizon_s:g} s exceeds migration cost {total:.3g} s"
    return Decision(
        adopt=True, reason=reason, gain_s=gain, cost=cost, current=cur_metrics, candidate=cand_metrics
    )


def _layout(stages: Sequence[Stage]) -> tuple[tuple[str, int, int], ...]:
    return tuple((s.node, s.first, s.end) for s in stages)


def _requests_per_s(problem: Problem, metrics: Metrics) -> float:
    """Offered load; with none given, one client issuing requests back to back."""
    if problem.workload.request_rate_rps > 0:
        return problem.workload.request_rate_rps
    return 1.0 / metrics.request_latency_s if metrics.request_latency_s > 0 else 0.0


def _holders(stages: Sequence[Stage]) -> dict[int, str]:
    return {layer: s.node for s in stages for layer in range(s.first, s.end)}


def migration_cost(
    problem: Problem,
    current: Sequence[Stage],
    candidate: Sequence[Stage],
    routes: Routes,
    store_node: str | None,
    kv_mode: Literal["auto", "move", "recompute"],
    switch_stall_s: float,
) -> MigrationCost:
    names = set(problem.node_names)
    L = problem.num_layers
    store = store_node or next((n.name for n in problem.nodes if n.tier == "cloud"), problem.source)
    old = {k: v for k, v in _holders(current).items() if v in names}
    new = _holders(candidate)
    m = problem.model
    # Weights: each target fetches what it lacks from the current holder (or the store), targets in parallel.
    fetch: dict[str, dict[str, int]] = {}
    for layer in range(L):
        target = new[layer]
        if old.get(layer) == target:
            continue
        origin = old.get(layer, store)
        fetch.setdefault(target, {}).setdefault(origin, 0)
        fetch[target][origin] += m.layers[layer].weight_bytes
    for edge_bytes, layer in ((m.embed_weight_bytes, 0), (m.head_weight_bytes, L - 1)):
        owner = new[layer]
        had = [s.node for s in current if (s.first == 0 if layer == 0 else s.end == L)]
        if edge_bytes and (not had or had[0] != owner):
            origin = had[0] if had and had[0] in names else store
            fetch.setdefault(owner, {}).setdefault(origin, 0)
            fetch[owner][origin] += edge_bytes
    weight_bytes = sum(b for per in fetch.values() for b in per.values())
    weight_s = max(
        (
            sum(transfer_s(routes.get(o, t), b) for o, b in sorted(per.items()))
            for t, per in sorted(fetch.items())
        ),
        default=0.0,
    )
    # KV of live sessions (at mid-generation on average) for every layer that changes owner.
    w = problem.workload
    ctx = w.prompt_tokens + w.gen_tokens // 2
    moving = [layer for layer in range(L) if old.get(layer) != new[layer]]
    kv_bytes = sum(m.layers[layer].kv_bytes_per_token for layer in moving) * ctx * w.concurrent_sessions
    per_k = [
        _kv_recompute_s(problem, candidate[:k], routes, ctx)
        + _kv_move_s(problem, [x for x in moving if x >= (candidate[k].first if k < len(candidate) else L)],
                     old, new, routes, ctx)
        for k in range(len(candidate) + 1)
    ]  # fmt: skip
    allowed = {"move": [0], "recompute": [len(candidate)]}.get(kv_mode, range(len(candidate) + 1))
    k = min(allowed, key=lambda i: (per_k[i], i))
    if not moving:
        mode: Literal["none", "move", "recompute", "mixed"] = "none"
        k, kv_s = 0, 0.0
    else:
        mode = "move" if k == 0 else "recompute" if k == len(candidate) else "mixed"
        kv_s = per_k[k]
    return MigrationCost(
        weight_bytes=weight_bytes,
        weight_s=weight_s,
        kv_bytes=kv_bytes,
        kv_move_s=per_k[0],
        kv_recompute_s=per_k[-1],
        kv_mode=mode,
        recompute_stages=k,
        kv_s=kv_s,
        stall_s=switch_stall_s + kv_s,
        total_s=0.0,
    )


def _kv_move_s(
    problem: Problem,
    moving: list[int],
    old: dict[int, str],
    new: dict[int, str],
    routes: Routes,
    ctx: int,
) -> float:
    if any(layer not in old for layer in moving):
        return float("inf")  # the old holder is gone: its KV is lost, only recomputation remains
    per_pair: dict[tuple[str, str], int] = {}
    for layer in moving:
        key = (old[layer], new[layer])
        per_pair[key] = per_pair.get(key, 0) + problem.model.layers[layer].kv_bytes_per_token * ctx
    sessions = problem.workload.concurrent_sessions
    # Pairs transfer in parallel; a pair's sessions go one after another.
    return max(
        (transfer_s(routes.get(a, b), nbytes * sessions) for (a, b), nbytes in sorted(per_pair.items())),
        default=0.0,
    )


def _kv_recompute_s(problem: Problem, prefix: Sequence[Stage], routes: Routes, ctx: int) -> float:
    """One prefill of the context through ``prefix`` (from the source, which keeps the token history),
    session after session: each stage's layers at prefill speed plus the activations between stages."""
    if not prefix:
        return 0.0
    times = node_times(problem)
    m = problem.model
    total = 0.0
    previous = problem.source
    for stage in prefix:
        if stage.first > 0:
            activations = m.layers[stage.first - 1].act_bytes_per_token * ctx
            total += transfer_s(routes.get(previous, stage.node), activations)
        total += sum(times[stage.node].prefill_s[stage.first : stage.end]) * ctx
        previous = stage.node
    return total * problem.workload.concurrent_sessions
