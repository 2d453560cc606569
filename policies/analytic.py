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

from policies.plan import Metrics, Stage
from policies.problem import Problem
from policies.routes import Routes, all_routes, serialisation_s, transfer_s


@dataclass(frozen=True)
class NodeTimes:
    """Per-token seconds of each layer on one node, background load already applied."""

    prefill_s: tuple[float, ...]
    decode_s: tuple[float, ...]
    head_prefill_s: float
    head_decode_s: float


@dataclass(frozen=True)
class Violation:
    constraint: str
    detail: str


def node_times(problem: Problem) -> dict[str, NodeTimes]:
    measured = {c.node: c for c in problem.costs}
    out: dict[str, NodeTimes] = {}
    for node in problem.nodes:
        # A node busy with other work a fraction `load` of the time runs our layers 1/(1-load) slower.
        slow = 1.0 / (1.0 - node.load)
        cost = measured.get(node.name)
        if cost is not None:
            pre = tuple(t * slow for t in cost.prefill_s_per_token)
            dec = tuple(t * slow for t in cost.decode_s_per_token)
            hp, hd = cost.head_prefill_s_per_token * slow, cost.head_decode_s_per_token * slow
        else:
            per = tuple(layer.flops_per_token / node.speed_flops * slow for layer in problem.model.layers)
            pre = dec = per
            hp = hd = problem.model.head_flops_per_token / node.speed_flops * slow
        out[node.name] = NodeTimes(pre, dec, hp, hd)
    return out


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
    for k, stage in enumerate(stages):
        t = times[stage.node]
        pre = sum(t.prefill_s[stage.first : stage.end])
        dec = sum(t.decode_s[stage.first : stage.end])
        if stage.end == problem.num_layers:
            # The runtime's last segment computes logits for every prompt position, hence x prompt.
            pre += t.head_prefill_s
            dec += t.head_decode_s
        ttft += prompt * pre
        tpot += dec
        bottleneck = max(bottleneck, dec)
        priv += exposure(problem, stage.node, stage.first)
        a, b, nbytes = hops[k]
        ttft += transfer_s(routes.get(a, b), prompt * nbytes)
        tpot += transfer_s(routes.get(a, b), nbytes)
        bottleneck = max(bottleneck, serialisation_s(routes.get(a, b), nbytes))
    a, b, nbytes = hops[-1]
    ret = transfer_s(routes.get(a, b), nbytes)  # only the sampled token goes back, prefill included
    ttft += ret
    tpot += ret
    bottleneck = max(bottleneck, serialisation_s(routes.get(a, b), nbytes))
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
    if c.min_throughput_tok_s is not None and metrics.throughput_tok_s < c.min_throughput_tok_s:
        out.append(
            Violation("min_throughput", f"{metrics.throughput_tok_s:.4g} tok/s < {c.min_throughput_tok_s}")
        )
    if c.max_ttft_s is not None and metrics.ttft_s > c.max_ttft_s:
        out.append(Violation("max_ttft", f"TTFT {metrics.ttft_s:.4g} s > {c.max_ttft_s}"))
    if c.max_tpot_s is not None and metrics.tpot_s > c.max_tpot_s:
        out.append(Violation("max_tpot", f"TPOT {metrics.tpot_s:.4g} s > {c.max_tpot_s}"))
    return out
