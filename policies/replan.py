"""Re-planning under uncertainty: adopt a plan when its expected gain over the forecast clears the cost.

The rule (docs/policies.md, "Re-planning"):
1. A current plan that breaks a constraint now (a node failed, memory shrank, an SLO cannot hold) is
   left at once, unless only a performance bound (TTFT, TPOT, throughput) breaks and the forecast
   expects today's rates to hold for less of the horizon than the candidate needs before it serves
   (``P`` below the time until its new stages are ready): the move would arrive after the dip it answers,
   so it is valued like any other (2-4). On the smart-city 5G backhaul, dips to 0.1 Mbit/s that lasted
   seconds forced cold starts of 21-62 s on the loaded pole, which slowed the plan still serving.
2. Otherwise both plans are valued over the horizon ``H`` against the link forecast (policies.forecast):
   requests served per session, ``N = P / J_now + (H - P) x mean_i 1 / J_i``, where ``J`` is the
   objective per request (by default its latency) at today's rates and at each of the recent past's
   joint snapshots of the rates, and ``P = tau (1 - exp(-H / tau))`` the share of the horizon today's
   rates are expected to hold. On a steady link that is today's value; on a link that swings every few
   seconds (``tau`` about a second) it is the plan's value over what the link has lately been doing, so a
   plan is neither chased into a dip nor held against the link's average. ``tau`` is that of the state
   that sets the two plans apart (``Forecast.apart``: the links one plan crosses and the other does
   not, the loads of the nodes where they compute different layers), not of every series: on
   industrial the AGV's cellular link, which both plans cross, changes every second or two, and after
   the MEC server's 40 s load ended the unloaded present counted for 5 s of a minute's horizon, so the
   plan through the server was valued at par with the cloud plan it measured 35 % faster than.
   The gain, in session-seconds of
   the current plan's service, is ``(N_new - N_cur) x (H / N_cur) x sessions``.
   The controller re-plans when the network changes again, within ``reaction_s``: of a past state that
   lasted ``L`` (``Forecast.lasting_s``), the share ``1 - (reaction_s + move_s) / L`` after the reaction
   and the move would be served by the better of the two plans whichever is deployed, so each plan is
   valued there at that rate; states too brief to follow count at the plan's own. ``move_s`` is the
   time until the other plan serves: this move's readiness for the current plan, the move back's for the
   candidate (its nodes start again unless a standby waits there). Counting the reaction alone, a move
   to the cloud for a load on industrial's MEC server was valued as if the way back were instant; it
   needed a 14-20 s start. A link that was down for most of the last
   minute and is back then counts against a move back only by what the move risks, not as if the plan
   would sit through the next outage (without ``reaction_s``: every past state at the plan's own).
3. The candidate serves only once its new stages are ready (make-before-break: the current plan serves
   meanwhile): loading them into a warm server, starting one, or fetching weights a node's store lacks.
   A node that starts a process for its new stage (``starting``) gives that start half of the CPU left
   to it until then (CFS shares one quota between the two runnable groups; the start is CPU-bound), so
   the current plan's stages there run slower meanwhile: on smart city's pole, the plan serving beside
   a 58 s cold start measured 253-276 ms per token against 152-166 ms without one.
   The cost: every live session stalls once at the switch (a fixed ``switch_stall_s`` plus moving or
   recomputing its KV).
4. Adopt when the gain is at least ``min_gain_ratio`` of what the current plan serves where the two
   plans are valued apart (``_contested``: where the controller would follow either way, neither plan
   changes anything) and exceeds the cost by the hysteresis factor: ``gain > (1 + hysteresis) * cost``.
   Moving back later pays its own cost again, so a plan that would be left soon does not pay for
   coming (break-even). The caller raises ``min_gain_ratio`` to what the model's own record of past
   moves allows (``error_bar``): a promised gain smaller than the model has lately been wrong by on the
   plans it moved to is no gain.

Per session, the first ``k`` stages of the candidate recompute their KV from the token history the gateway
keeps (one prefill through them) and the other stages receive the KV of their layers from the old
holders; ``k`` is chosen by predicted cost, from 0 (move everything: wins on fast links) to all stages
(replay: wins when the KV would cross a slow link, and the only way when an old holder is gone).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict

from policies.analytic import Violation, node_times, predict, violations, weighted_objective
from policies.forecast import Forecast, persistent, requests_per_s
from policies.plan import Metrics, Plan, Stage
from policies.problem import MAX_LOAD, Problem
from policies.routes import Routes, all_routes, links_used, transfer_s


class MigrationCost(BaseModel):
    model_config = ConfigDict(frozen=True)

    weight_bytes: int
    weight_s: float  # until the new stages serve: fetching what stores lack, or loading / starting
    kv_bytes: int
    kv_move_s: float  # move every moved layer's KV (k = 0)
    kv_recompute_s: float  # recompute on every stage (k = all)
    kv_mode: Literal["none", "move", "recompute", "mixed"]
    recompute_stages: int  # k: the candidate's first k stages recompute, the rest receive KV
    kv_s: float  # the predicted KV time per switch for the chosen k
    stall_s: float  # what each live session waits at the switch
    total_s: float  # session-seconds lost: live sessions x stall


class Decision(BaseModel):
    model_config = ConfigDict(frozen=True)

    adopt: bool
    reason: str
    gain_s: float  # session-seconds gained over the horizon, before cost
    cost: MigrationCost
    current: Metrics | None
    candidate: Metrics
    # Requests each plan serves per session over the horizon (``lasting_s`` of it at today's rates).
    served_current: float | None = None
    served_candidate: float | None = None
    lasting_s: float | None = None


def decide(
    problem: Problem,
    current: Plan,
    candidate: Plan,
    horizon_s: float,
    *,
    switch_stall_s: float = 0.05,
    min_gain_ratio: float = 0.05,
    hysteresis: float = 0.0,
    store_node: str | None = None,
    kv_mode: Literal["auto", "move", "recompute"] = "auto",
    forecast: Forecast | None = None,
    ready_s: Mapping[str, float] | None = None,
    holdings: Mapping[str, frozenset[int]] | None = None,
    reaction_s: float | None = None,
    starting: Collection[str] = (),
) -> Decision:
    """Compare ``current`` (re-priced under ``problem``, the newest profiles) with ``candidate``.

    ``forecast``: the links over the horizon (None: today's rates persist). ``ready_s[node]``: seconds
    until ``node`` serves a new stage of its own (a warm server loads it; otherwise a process starts);
    ``holdings[node]``: the layers its store holds (None: weights are fetched from the current holder or
    ``store_node``, default a cloud node); ``reaction_s``: how soon the controller follows a change (None:
    it is not counted on); ``starting``: nodes where a new stage of the candidate starts a process (no warm
    server takes it). See the module docstring for the rule."""
    routes = all_routes(problem)
    cand_metrics = predict(problem, candidate.stages, routes)
    cost = migration_cost(
        problem, current.stages, candidate.stages, routes, store_node, kv_mode, switch_stall_s, holdings
    )
    if ready_s is not None:
        cost = cost.model_copy(update={"weight_s": max(cost.weight_s, _ready_s(current, candidate, ready_s))})
    broken = violations(problem, current.stages, routes)
    fc = forecast or persistent({f"{lk.a}-{lk.b}": lk.bw_mbit for lk in problem.links})
    # A plan that breaks a bound is left for another one, not for itself (the best plan there is may
    # break a TTFT bound in a dip as well): the same plan is valued below and kept.
    same = candidate.layout() == _layout(current.stages)
    if broken and not same and not _outlasted(broken, fc, horizon_s, cost.weight_s):
        return Decision(
            adopt=True,
            reason=f"current plan infeasible ({broken[0].constraint}: {broken[0].detail})",
            gain_s=float("inf"),
            cost=cost,
            current=None,
            candidate=cand_metrics,
        )
    fc = fc.apart(*_apart(problem, current.stages, candidate.stages))
    cur_metrics = predict(problem, current.stages, routes)
    j_cur = weighted_objective(problem, cur_metrics)
    raw_cur = _past_costs(problem, current.stages, fc)
    raw_new = _past_costs(problem, candidate.stages, fc)
    # Following a change takes the reaction and then the move's own readiness: the current plan is left
    # for the candidate as fast as this move serves, the candidate for the current plan as fast as the
    # move back would (its nodes start again unless warm).
    back_s = 0.0 if ready_s is None else _ready_s(candidate, current, ready_s)
    lasting = _lasting_apart(problem, current.stages, candidate.stages, fc)
    ahead = _follow_shares(lasting, reaction_s, cost.weight_s, len(raw_cur))
    back = _follow_shares(lasting, reaction_s, back_s, len(raw_cur))
    past_cur, past_new = _followed(raw_cur, raw_new, ahead), _followed(raw_new, raw_cur, back)
    # Until the new stages serve (make-before-break), the current plan does, beside the starts.
    ready = min(horizon_s, cost.weight_s)
    n_cur = fc.served(j_cur, past_cur, 0.0, horizon_s)
    starts = _started_on(current, candidate, starting)
    meanwhile = _beside_starts(problem, starts)
    j_meanwhile, past_meanwhile = (
        (j_cur, past_cur)
        if not starts
        else (
            weighted_objective(meanwhile, predict(meanwhile, current.stages)),
            _past_costs(problem, current.stages, fc, starts),
        )
    )
    j_new = weighted_objective(problem, cand_metrics)
    n_new = fc.served(j_meanwhile, past_meanwhile, 0.0, ready) + fc.served(j_new, past_new, ready, horizon_s)
    sessions = _sessions(problem)
    unit = horizon_s / n_cur if n_cur > 0 else 0.0  # session-seconds per request, current plan
    gain = (n_new - n_cur) * unit * sessions
    total = cost.stall_s * sessions
    lasting = fc.present_s(0.0, horizon_s)
    cost = cost.model_copy(update={"total_s": total})

    def verdict(adopt: bool, reason: str) -> Decision:
        return Decision(
            adopt=adopt, reason=reason, gain_s=gain, cost=cost, current=cur_metrics, candidate=cand_metrics,
            served_current=n_cur, served_candidate=n_new, lasting_s=lasting,
        )  # fmt: skip

    if same:
        return verdict(False, "same plan")
    shares = [min(a, b) for a, b in zip(ahead, back, strict=True)]
    contested = _contested(fc, (j_cur, j_new), (raw_cur, raw_new), shares, horizon_s)
    share = (n_new - n_cur) / contested if contested > 0 else 0.0
    if n_cur <= 0 or share < min_gain_ratio:
        return verdict(False, f"gain {share:.2%} where the plans differ < threshold {min_gain_ratio:.0%}")
    bar = (1.0 + hysteresis) * total
    if gain <= bar:
        return verdict(False, f"gain {gain:.3g} s over {horizon_s:g} s does not clear the cost {total:.3g} s")
    return verdict(True, f"gain {gain:.3g} s over {horizon_s:g} s clears the cost {total:.3g} s")


def error_bar(ratios: Sequence[float], floor: float) -> float:
    """The least gain share a move must promise, given ``ratios``: measured over predicted per-token
    latency of the plans recent moves went to. A plan measured ``r`` times its prediction serves ``1 / r``
    of the requests predicted, so a move promising less than ``r - 1`` can lose; the worst recent ``r``
    sets the bar, never below ``floor``. A plan measured faster than predicted (``r < 1``) raises nothing:
    it made its move look smaller than it was, never a losing move look good."""
    return max(floor, max(ratios, default=1.0) - 1.0)


# Bounds on how the plan performs at today's link rates (a dip can break them for a while), unlike the
# structure, memory, trust and reachability a plan either has or has not.
PERFORMANCE_BOUNDS = frozenset({"max_ttft", "max_tpot", "min_throughput"})


def _outlasted(broken: Sequence[Violation], fc: Forecast, horizon_s: float, ready_s: float) -> bool:
    """Whether the breaks are performance bounds only, expected to pass before the move would serve."""
    transient = all(v.constraint in PERFORMANCE_BOUNDS for v in broken)
    return transient and fc.present_s(0.0, horizon_s) < ready_s


def _past_costs(
    problem: Problem, stages: Sequence[Stage], fc: Forecast, starts: Collection[str] = ()
) -> list[float]:
    """The objective per request (seconds) of ``stages`` at each of the forecast's past snapshots (the
    nodes' loads then, with a start beside the stages on ``starts``): the time to first token at the
    links' mean rates over a request there (``Forecast.smoothed``), the rest at the snapshot's own rates
    (``Forecast``'s docstring says why)."""
    out = []
    smoothed = fc.smoothed or fc.snapshots
    loads = fc.loads or tuple({} for _ in fc.snapshots)
    for snap, smooth, load in zip(fc.snapshots, smoothed, loads, strict=True):
        loaded = _beside_starts(_at_loads(problem, load), set(starts))
        past = _at_rates(loaded, snap)
        metrics = predict(past, stages)
        if smooth != snap:
            ttft_s = predict(_at_rates(loaded, smooth), stages).ttft_s
            metrics = metrics.model_copy(update={"ttft_s": ttft_s})
        out.append(weighted_objective(past, metrics))
    return out


def _at_rates(problem: Problem, rates_mbit: Mapping[str, float]) -> Problem:
    links = tuple(
        lk.model_copy(update={"bw_mbit": max(0.01, rates_mbit.get(f"{lk.a}-{lk.b}", lk.bw_mbit))})
        for lk in problem.links
    )
    return problem.model_copy(update={"links": links})


def _at_loads(problem: Problem, loads: Mapping[str, float]) -> Problem:
    if not loads:
        return problem
    nodes = tuple(
        n.model_copy(update={"load": min(MAX_LOAD, max(0.0, loads.get(n.name, n.load)))})
        for n in problem.nodes
    )
    return problem.model_copy(update={"nodes": nodes})


def _apart(
    problem: Problem, current: Sequence[Stage], candidate: Sequence[Stage]
) -> tuple[set[str], set[str]]:
    """What sets two plans apart: the links one crosses and the other does not, and the nodes where
    they compute different layers."""
    links = links_used(problem, [s.node for s in current]) ^ links_used(problem, [s.node for s in candidate])
    layers = {s.node: (s.first, s.end) for s in current}
    other = {s.node: (s.first, s.end) for s in candidate}
    return links, {n for n in layers.keys() | other.keys() if layers.get(n) != other.get(n)}


def _lasting_apart(
    problem: Problem, current: Sequence[Stage], candidate: Sequence[Stage], fc: Forecast
) -> tuple[float, ...]:
    """Per snapshot, how long the state that sets the two plans apart lasted: the shortest run among the
    links one plan crosses and the other does not, and the loads of the nodes where the plans compute
    different layers. A link both cross alike (the source's access link) changes both plans alike: its
    swings end no state the controller would follow. On industrial the AGV's cellular link changed every
    second or two, and a MEC load that had lasted 40 s was counted as states of 1-2 s that no
    controller follows. Without per-series runs, or where nothing sets the plans apart: every series."""
    if not fc.link_runs_s:
        return fc.lasting_s
    links, nodes = _apart(problem, current, candidate)
    out = []
    for joint, link_runs, load_runs in zip(fc.lasting_s, fc.link_runs_s, fc.load_runs_s, strict=True):
        runs = [link_runs[k] for k in links if k in link_runs]
        runs += [load_runs[n] for n in nodes if n in load_runs]
        out.append(min(runs) if runs else joint)
    return tuple(out)


def _follow_shares(
    lasting_s: Sequence[float], reaction_s: float | None, move_s: float, count: int
) -> list[float]:
    """Of each past state that lasted ``L``, the share served by the plan the controller moves to: what
    is left of ``L`` after the reaction and the move (none without ``reaction_s``). A state seen for no
    time at all (one sample, a node that just came back) cannot be followed."""
    if reaction_s is None or not lasting_s:
        return [0.0] * count
    return [max(0.0, 1.0 - (reaction_s + move_s) / lasted) if lasted > 0 else 0.0 for lasted in lasting_s]


def _followed(own: Sequence[float], other: Sequence[float], shares: Sequence[float]) -> list[float]:
    """Per past state, the cost per request of a plan that the controller leaves for ``other``, where it
    serves more, for the ``share`` of the state after the controller's reaction."""
    out = []
    for mine, theirs, share in zip(own, other, shares, strict=True):
        rate = requests_per_s(mine)
        blended = share * max(rate, requests_per_s(theirs)) + (1.0 - share) * rate
        out.append(1.0 / blended if blended > 0 else math.inf)
    return out


def _contested(
    fc: Forecast,
    now_s: tuple[float, float],
    past_s: tuple[Sequence[float], Sequence[float]],
    shares: Sequence[float],
    horizon_s: float,
) -> float:
    """Requests the current plan serves over the spans where the two plans are valued apart: today's
    rates while they last, and of each past state the share before the controller's reaction. Where the
    controller would serve the better plan whichever is deployed, both are valued alike, and a share of
    the whole horizon would dilute the gain by what neither plan changes."""
    present = fc.present_s(0.0, horizon_s)
    differ = not math.isclose(*now_s, rel_tol=1e-9)
    now = present * requests_per_s(now_s[0]) if differ else 0.0
    if not past_s[0]:
        return now + (horizon_s - present) * requests_per_s(now_s[0]) if differ else now
    past = sum(
        (1.0 - share) * requests_per_s(cur)
        for cur, new, share in zip(*past_s, shares, strict=True)
        if not math.isclose(cur, new, rel_tol=1e-9)
    )
    return now + (horizon_s - present) * past / len(past_s[0])


def _sessions(problem: Problem) -> float:
    """Sessions generating at once: measured where the model is calibrated, else the workload's."""
    cal = problem.calibration
    return (
        cal.concurrency
        if cal is not None and cal.concurrency
        else float(problem.workload.concurrent_sessions)
    )


def _ready_s(current: Plan, candidate: Plan, ready_s: Mapping[str, float]) -> float:
    """Until every changed stage of ``candidate`` serves (they come up in parallel)."""
    return max((ready_s.get(node, math.inf) for node in _changed_nodes(current, candidate)), default=0.0)


def _changed_nodes(current: Plan, candidate: Plan) -> set[str]:
    kept = set(current.layout())
    return {s.node for s in candidate.stages if (s.node, s.first, s.end) not in kept}


def keeping(problem: Problem, candidate: Plan, current: Plan, cold: Collection[str]) -> Plan | None:
    """``candidate`` with each stage it gives a ``cold`` node (one where a new stage starts a process)
    set to the layers that node serves now, its neighbours taking up the difference; None where that
    breaks a constraint or changes nothing. A move's value counts the time until its new stages serve,
    and a start is seconds where a warm standby loads a stage in under one: on industrial the solver's
    plans for the MEC server's load moved the cell's boundary by two layers, so each move started a
    server on the loaded host (14-17 s) for the cloud's standby to take over the rest, and it served
    when the load had ended. The same plan keeping the cell's layers served 0.4 s after its deploy began."""
    serving: dict[str, list[tuple[int, int]]] = {}
    for s in current.stages:
        serving.setdefault(s.node, []).append((s.first, s.end))
    nodes = [s.node for s in candidate.stages]
    cuts = [s.first for s in candidate.stages] + [problem.num_layers]
    pinned: list[tuple[int, int, int]] = []
    for i, node in enumerate(nodes):
        held = serving.get(node, [])
        if node not in cold or len(held) != 1 or held[0] == (cuts[i], cuts[i + 1]):
            continue
        first, end = held[0]
        if (i == 0 and first > 0) or (i == len(nodes) - 1 and end < problem.num_layers):
            return None  # no neighbour there to take up the layers it leaves
        cuts = [min(c, first) if j <= i else max(c, end) if j > i + 1 else c for j, c in enumerate(cuts)]
        cuts[i], cuts[i + 1] = first, end
        pinned.append((i, first, end))
    if not pinned or any((cuts[i], cuts[i + 1]) != (a, b) for i, a, b in pinned):
        return None  # nothing to keep, or two kept stages overlap
    stages = [Stage(node=n, first=a, end=b) for n, a, b in zip(nodes, cuts, cuts[1:], strict=False) if b > a]
    routes = all_routes(problem)
    if violations(problem, stages, routes):
        return None
    metrics = predict(problem, stages, routes)
    return Plan(
        stages=tuple(stages), policy=f"{candidate.policy}+kept", predicted=metrics,
        objective_value=weighted_objective(problem, metrics),
    )  # fmt: skip


# The share of a node's CPU a starting server takes from its serving stages: CFS splits one quota evenly
# between two runnable groups, and a start (imports, mapping weights) is runnable throughout.
START_CPU_SHARE = 0.5


def _started_on(current: Plan, candidate: Plan, starting: Collection[str]) -> set[str]:
    """Nodes that start a process for the candidate while serving a stage of the current plan."""
    serving = {s.node for s in current.stages}
    return _changed_nodes(current, candidate) & set(starting) & serving


def _beside_starts(problem: Problem, nodes: set[str]) -> Problem:
    """``problem`` with each of ``nodes`` giving ``START_CPU_SHARE`` of its free CPU to a start."""
    if not nodes:
        return problem
    busier = tuple(
        n.model_copy(update={"load": n.load + (1.0 - n.load) * START_CPU_SHARE}) if n.name in nodes else n
        for n in problem.nodes
    )
    return problem.model_copy(update={"nodes": busier})


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
    holdings: Mapping[str, frozenset[int]] | None = None,
) -> MigrationCost:
    names = set(problem.node_names)
    L = problem.num_layers
    store = store_node or next((n.name for n in problem.nodes if n.tier == "cloud"), problem.source)
    old = {k: v for k, v in _holders(current).items() if v in names}
    new = _holders(candidate)
    m = problem.model
    fetch = (
        _fetches(problem, routes, new, holdings)
        if holdings is not None
        else _fetches_from_holders(problem, current, old, new, store)
    )
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


def _fetches_from_holders(
    problem: Problem, current: Sequence[Stage], old: dict[int, str], new: dict[int, str], store: str
) -> dict[str, dict[str, int]]:
    """Weights each target lacks, from the layer's current holder (or the store node)."""
    names = set(problem.node_names)
    L = problem.num_layers
    m = problem.model
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
    return fetch


def _fetches(
    problem: Problem, routes: Routes, new: dict[int, str], holdings: Mapping[str, frozenset[int]]
) -> dict[str, dict[str, int]]:
    """Weights each target's store lacks, from the holder it reaches fastest (the embeddings travel with
    layer 0, the head with the last layer)."""
    m = problem.model
    L = problem.num_layers
    fetch: dict[str, dict[str, int]] = {}
    for layer in range(L):
        target = new[layer]
        if layer in holdings.get(target, frozenset()):
            continue
        nbytes = m.layers[layer].weight_bytes
        nbytes += m.embed_weight_bytes if layer == 0 else 0
        nbytes += m.head_weight_bytes if layer == L - 1 else 0
        sources = sorted(n for n, held in holdings.items() if layer in held and n != target)
        if not sources:
            raise ValueError(f"no node's store holds layer {layer}; prepare the model in a store")
        origin = min(sources, key=lambda n: transfer_s(routes.get(n, target), nbytes))
        fetch.setdefault(target, {}).setdefault(origin, 0)
        fetch[target][origin] += nbytes
    return fetch


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
