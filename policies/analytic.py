"""The analytic model: a plan's TTFT, per-token latency, throughput and privacy exposure; its feasibility.

This module is the reference: it walks a plan stage by stage in plain Python. The solvers use the same
model compiled into arrays (``policies.tables``) and the tests check both agree. Equations and assumptions
are in docs/policies.md.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from policies.calibration import STEP_CPU_S
from policies.contention import Quota, Station, cycle_time_s, queue_lengths
from policies.contention import bottleneck_s as contention_bottleneck_s
from policies.plan import Metrics, Stage
from policies.problem import Problem
from policies.routes import Routes, all_routes, message_serialisation_s, serialisation_s, transfer_s
from policies.tolerance import within


@dataclass(frozen=True)
class NodeTimes:
    """Per-token seconds of each layer on one node, background load and calibration applied.

    ``decode_s`` is wall time while the node is not held back by its CPU quota; ``decode_cpu_s`` the CPU
    work behind it (what the quota counts); ``capacity`` the cores our work may use over time (the quota
    less the background load; None: no quota)."""

    prefill_s: tuple[float, ...]
    decode_s: tuple[float, ...]
    head_prefill_s: float
    head_decode_s: float
    decode_cpu_s: tuple[float, ...] = ()
    head_cpu_s: float = 0.0
    capacity: float | None = None
    wait_s: float = 0.0  # added to every decode step of a stage here (calibration: a step's fixed cost)
    step_cpu_s: float = 0.0  # the CPU part of that fixed cost


def _loaded_slow(slow: float, stretch: float) -> float:
    """How much slower a node with a CPU quota runs our work beside a background load that leaves it
    ``1 / slow`` of the quota: by the share alone ``slow``, or less where the node was measured faster
    than its share allows (its learned quota stretch below 1), never faster than unloaded. CFS enforces
    the quota per period and per CPU, and beside a load with the larger weight our steps still got more
    than the share: industrial's MEC server, 80 % loaded, gave its stage 0.41 of a core where the share
    says 0.2 (stretch 0.49). Priced at the share, the plan through the loaded server was predicted at
    628-727 ms a token and measured 296, and the controller moved to the cloud for it."""
    return max(1.0, slow * min(1.0, stretch))


@dataclass(frozen=True)
class Violation:
    constraint: str
    detail: str


def node_times(problem: Problem) -> dict[str, NodeTimes]:
    measured = {c.node: c for c in problem.costs}
    cal = problem.calibration
    out: dict[str, NodeTimes] = {}
    for node in problem.nodes:
        # A node busy with other work a fraction `load` of the time runs our layers 1/(1-load) slower.
        slow = 1.0 / (1.0 - node.load)
        cost = measured.get(node.name)
        if cost is not None:
            pre, dec = cost.prefill_s_per_token, cost.decode_s_per_token
            hp, hd = cost.head_prefill_s_per_token, cost.head_decode_s_per_token
        else:
            pre = dec = tuple(layer.flops_per_token / node.speed_flops for layer in problem.model.layers)
            hp = hd = problem.model.head_flops_per_token / node.speed_flops
        if cal is not None and node.cpu_share is not None:
            slow = _loaded_slow(slow, cal.node(node.name).quota_stretch)
        capacity = None if node.cpu_share is None else node.cpu_share / slow
        wait = step_cpu = 0.0
        if cal is None:
            wall, pre_scale, cpu_scale = slow, slow, 1.0
        else:
            c = cal.node(node.name)
            wall, pre_scale, cpu_scale = c.cpu_scale * slow, c.prefill_scale * slow, c.cpu_scale
            wait = c.wait_s + STEP_CPU_S * slow
            step_cpu = STEP_CPU_S
        out[node.name] = NodeTimes(
            prefill_s=tuple(t * pre_scale for t in pre),
            decode_s=tuple(t * wall for t in dec),
            head_prefill_s=hp * pre_scale,
            head_decode_s=hd * wall,
            decode_cpu_s=tuple(t * cpu_scale for t in dec),
            head_cpu_s=hd * cpu_scale,
            capacity=capacity,
            wait_s=wait,
            step_cpu_s=step_cpu,
        )
    return out


def hop_s(problem: Problem, routes: Routes, a: str, b: str, num_bytes: float) -> float:
    """Seconds to move one message of ``num_bytes`` of tensors (its frame added) from ``a`` to ``b``:
    propagation plus the serialisation of its bytes beyond the route's burst, and with a calibration the
    learned software cost of the hop and its goodput (a hop within one node, gateway to a stage on the
    source, then costs its software only)."""
    cal = problem.calibration
    route = routes.get(a, b)
    nbytes = num_bytes + problem.model.frame_bytes
    if cal is None:
        return transfer_s(route, nbytes)
    if a == b:
        return max(0.0, cal.hop_overhead(a, a))
    if route.bw_mbit == 0.0:
        return math.inf
    fixed = max(0.0, route.delay_s + cal.hop_overhead(a, b))
    return fixed + cal.hop_slope(a, b) * message_serialisation_s(route, nbytes)


def stage_memory_bytes(problem: Problem, first: int, end: int) -> int:
    layers = problem.model.layers[first:end]
    ctx = problem.workload.context_tokens * problem.workload.concurrent_sessions
    total = sum(layer.weight_bytes for layer in layers) + ctx * sum(
        layer.kv_bytes_per_token for layer in layers
    )
    if first == 0:
        total += problem.model.embed_weight_bytes
    if end == problem.num_layers:
        total += problem.model.head_weight_bytes
    return total


def boundary_act_bytes(problem: Problem, depth: int) -> int:
    """Bytes per token of the hidden state entering layer ``depth`` (0 = token ids from the source)."""
    if depth == 0:
        return problem.model.input_bytes_per_token
    return problem.model.layers[depth - 1].act_bytes_per_token


def exposure(problem: Problem, node: str, first: int) -> float:
    """What one stage reveals: an untrusted party seeing depth-``first`` activations (raw input = 1)."""
    if problem.is_trusted(node):
        return 0.0
    return (1.0 - problem.node(node).trust) * (1.0 - first / problem.num_layers)


def predict(problem: Problem, stages: Sequence[Stage], routes: Routes | None = None) -> Metrics:
    routes = routes if routes is not None else all_routes(problem)
    times = node_times(problem)
    prompt = problem.workload.prompt_tokens
    src = problem.source
    m = problem.model
    hops: list[tuple[str, str, float]] = [(src, stages[0].node, float(m.input_bytes_per_token))]
    for a, b in itertools.pairwise(stages):
        hops.append((a.node, b.node, float(boundary_act_bytes(problem, a.end))))
    hops.append((stages[-1].node, src, float(m.output_bytes_per_token)))

    ttft = tpot = priv = 0.0
    bottleneck = 0.0
    stage_pre: list[float] = []
    stage_dec: list[float] = []
    for k, stage in enumerate(stages):
        t = times[stage.node]
        pre = sum(t.prefill_s[stage.first : stage.end])
        dec = sum(t.decode_s[stage.first : stage.end]) + t.wait_s
        if stage.end == problem.num_layers:
            # The runtime's last segment computes logits for every prompt position, hence x prompt.
            pre += t.head_prefill_s
            dec += t.head_decode_s
        stage_pre.append(prompt * pre)
        stage_dec.append(dec)
        ttft += prompt * pre
        tpot += dec
        bottleneck = max(bottleneck, dec)
        priv += exposure(problem, stage.node, stage.first)
        a, b, nbytes = hops[k]
        ttft += hop_s(problem, routes, a, b, prompt * nbytes)
        tpot += hop_s(problem, routes, a, b, nbytes)
        bottleneck = max(bottleneck, serialisation_s(routes.get(a, b), nbytes + m.frame_bytes))
    a, b, nbytes = hops[-1]
    ret = hop_s(problem, routes, a, b, nbytes)  # only the sampled token goes back, prefill included
    ttft += ret
    tpot += ret
    bottleneck = max(bottleneck, serialisation_s(routes.get(a, b), nbytes + m.frame_bytes))
    if problem.calibration is not None:
        ttft, tpot, bottleneck = _with_contention(
            problem, stages, routes, times, hops, stage_pre, stage_dec, ttft
        )
    throughput = math.inf if bottleneck == 0.0 else 1.0 / bottleneck
    latency = ttft + (problem.workload.gen_tokens - 1) * tpot
    return Metrics(
        ttft_s=ttft,
        tpot_s=tpot,
        throughput_tok_s=throughput,
        privacy_exposure=priv,
        bottleneck_s=bottleneck,
        request_latency_s=latency,
    )


def _with_contention(
    problem: Problem,
    stages: Sequence[Stage],
    routes: Routes,
    times: dict[str, NodeTimes],
    hops: Sequence[tuple[str, str, float]],
    stage_pre: Sequence[float],
    stage_dec: Sequence[float],
    ttft_alone: float,
) -> tuple[float, float, float]:
    """(TTFT, TPOT, bottleneck) of the workload's concurrent sessions, with the gateway's own work and
    the CPU quotas (policies.contention): what a calibrated model adds to the plain sums."""
    cal = problem.calibration
    assert cal is not None
    w = problem.workload
    gen = max(1, w.gen_tokens)

    def mean(prefill: float, decode: float) -> float:  # per step over one request: 1 prefill, gen-1 decodes
        return (prefill + (gen - 1) * decode) / gen

    stations = [Station("gateway", cal.source_idle_s, cal.source_idle_s)]
    cpu = {problem.source: (cal.source_cpu_s, cal.source_cpu_s)}  # node -> (per decode step, mean per step)
    for stage, pre, dec in zip(stages, stage_pre, stage_dec, strict=True):
        stations.append(Station(f"stage:{stage.node}", dec, mean(pre, dec)))
        t = times[stage.node]
        dec_cpu = sum(t.decode_cpu_s[stage.first : stage.end]) + t.step_cpu_s
        dec_cpu += t.head_cpu_s if stage.end == problem.num_layers else 0.0
        # A prefill runs at the node's sustained pace, its quota's: the CPU behind it is that much less.
        pre_cpu = pre * min(1.0, t.capacity) if t.capacity is not None else pre
        own, avg = cpu.get(stage.node, (0.0, 0.0))
        cpu[stage.node] = (own + dec_cpu, avg + mean(pre_cpu, dec_cpu))
    links: dict[tuple[str, str], list[float]] = {}
    for k, (a, b, nbytes) in enumerate(hops):
        pre_bytes = nbytes if k == len(hops) - 1 else w.prompt_tokens * nbytes
        dec_s = hop_s(problem, routes, a, b, nbytes)
        ser_dec = _ser(problem, routes, a, b, nbytes)
        ser_pre = _ser(problem, routes, a, b, pre_bytes)
        stations.append(Station(f"hop:{a}>{b}", dec_s - ser_dec, dec_s - ser_dec, queue=False))
        # Hops whose routes cross the same link direction at its narrowest share its queue.
        key = _narrowest_link(problem, routes, a, b)
        busy = links.setdefault(key, [0.0, 0.0, 0.0])
        busy[0] += ser_dec
        busy[1] += mean(ser_pre, ser_dec)
        busy[2] += _ser(problem, routes, a, b, nbytes, whole=True)
    stations += [Station(f"link:{a}>{b}", dec, avg) for (a, b), (dec, avg, _) in sorted(links.items())]
    # A link's burst spares a message after a pause, not the link's rate over time: every session's
    # decode messages, all their bytes, must fit into the cycle.
    link_s = max((whole for _, _, whole in links.values()), default=0.0)
    node_caps = {n: times[n].capacity for n in cpu}
    quotas = [
        Quota(n, own, avg, cap, max(1.0, cal.node(n).quota_stretch))
        for n, (own, avg) in sorted(cpu.items())
        if (cap := node_caps[n]) is not None
    ]
    sessions = cal.concurrency if cal.concurrency is not None else w.concurrent_sessions
    tpot = max(cycle_time_s(stations, sessions, quotas), sessions * link_s)
    waiting = queue_lengths(stations, sessions - 1)
    ttft = ttft_alone + cal.source_idle_s + sum(s.mean_s * q for s, q in zip(stations, waiting, strict=True))
    return ttft, tpot, max(contention_bottleneck_s(stations, quotas), link_s)


def _ser(problem: Problem, routes: Routes, a: str, b: str, num_bytes: float, *, whole: bool = False) -> float:
    """Serialisation part of one message of a hop (calibrated goodput, frame included), 0 within a
    node: its bytes beyond the route's burst, or with ``whole`` all of them (the link's time over a
    steady stream)."""
    if a == b:
        return 0.0
    cal = problem.calibration
    slope = 1.0 if cal is None else cal.hop_slope(a, b)
    route, nbytes = routes.get(a, b), num_bytes + problem.model.frame_bytes
    return slope * (serialisation_s(route, nbytes) if whole else message_serialisation_s(route, nbytes))


def _narrowest_link(problem: Problem, routes: Routes, a: str, b: str) -> tuple[str, str]:
    """The directed link of the route ``a`` -> ``b`` with the lowest rate (the first such on ties)."""
    path = routes.get(a, b).nodes
    if len(path) < 2:
        return (a, b)
    rate = {(lk.a, lk.b): lk.bw_mbit for lk in problem.links}
    rate.update({(lk.b, lk.a): lk.bw_mbit for lk in problem.links})
    return min(itertools.pairwise(path), key=lambda pair: rate.get(pair, math.inf))


def metric_value(metrics: Metrics, name: str) -> float:
    return {
        "ttft": metrics.ttft_s,
        "tpot": metrics.tpot_s,
        "bottleneck": metrics.bottleneck_s,
        "privacy": metrics.privacy_exposure,
    }[name]


def weighted_objective(problem: Problem, metrics: Metrics) -> float:
    o = problem.objective
    return (
        o.ttft * metrics.ttft_s
        + problem.tpot_weight() * metrics.tpot_s
        + o.bottleneck * metrics.bottleneck_s
        + o.privacy * metrics.privacy_exposure
    )


def latency_objective(problem: Problem, metrics: Metrics) -> float:
    """The additive part of the weighted objective (what the latency DP minimises)."""
    o = problem.objective
    return (
        o.ttft * metrics.ttft_s
        + problem.tpot_weight() * metrics.tpot_s
        + o.privacy * metrics.privacy_exposure
    )


def violations(problem: Problem, stages: Sequence[Stage], routes: Routes | None = None) -> list[Violation]:
    """Every constraint the plan breaks (empty list: feasible). Structure errors come first."""
    routes = routes if routes is not None else all_routes(problem)
    out: list[Violation] = []
    names = set(problem.node_names)
    L = problem.num_layers
    expect = 0
    for s in stages:
        if s.node not in names:
            return [Violation("structure", f"stage names unknown node {s.node!r}")]
        if s.first != expect or s.end > L:
            return [
                Violation("structure", f"stages must tile [0, {L}) in order; got {s.node}[{s.first},{s.end})")
            ]
        expect = s.end
    if expect != L or not stages:
        return [Violation("structure", f"stages must end at layer {L}")]
    used = [s.node for s in stages]
    if len(set(used)) != len(used):
        return [Violation("structure", f"each node may run one stage; got {used}")]
    c = problem.constraints
    seq = [problem.source, *used, problem.source]
    for a, b in itertools.pairwise(seq):
        if routes.get(a, b).bw_mbit == 0.0:
            out.append(Violation("connectivity", f"no route from {a} to {b}"))
    for s in stages:
        node = problem.node(s.node)
        if c.check_memory:
            need = stage_memory_bytes(problem, s.first, s.end)
            if need > node.mem_bytes:
                out.append(
                    Violation(
                        "memory", f"{s.node} needs {need} B for [{s.first},{s.end}), has {node.mem_bytes}"
                    )
                )
        trusted = problem.is_trusted(s.node)
        if not trusted and s.first < c.trusted_prefix_layers:
            out.append(
                Violation(
                    "trust", f"{s.node} is untrusted but runs layer {s.first} < {c.trusted_prefix_layers}"
                )
            )
        if not trusted and s.first < c.private_depth:
            out.append(
                Violation(
                    "private_depth", f"{s.node} is untrusted and sees depth {s.first} < {c.private_depth}"
                )
            )
        if not trusted and c.trusted_head and s.end == L:
            out.append(Violation("trusted_head", f"{s.node} is untrusted but runs the head"))
    for k, s in enumerate(stages):
        if s.first < c.private_depth:
            prev = problem.source if k == 0 else stages[k - 1].node
            path = routes.get(prev, s.node).nodes
            if any(not problem.is_trusted(n) for n in path):
                out.append(
                    Violation(
                        "private_depth", f"depth-{s.first} activations route {prev}->{s.node} via {path}"
                    )
                )
    metrics = predict(problem, stages, routes)
    # The same relative slack as the solvers' rows (policies.tolerance): a plan a solver may pick passes.
    floor = c.min_throughput_tok_s
    if floor is not None and not within(metrics.bottleneck_s * floor, 1.0):
        out.append(Violation("min_throughput", f"{metrics.throughput_tok_s:.4g} tok/s < {floor}"))
    if c.max_ttft_s is not None and not within(metrics.ttft_s, c.max_ttft_s):
        out.append(Violation("max_ttft", f"TTFT {metrics.ttft_s:.4g} s > {c.max_ttft_s}"))
    if c.max_tpot_s is not None and not within(metrics.tpot_s, c.max_tpot_s):
        out.append(Violation("max_tpot", f"TPOT {metrics.tpot_s:.4g} s > {c.max_tpot_s}"))
    return out
