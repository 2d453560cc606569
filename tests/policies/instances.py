"""Seeded small instances with varied constraints and objectives for the exactness tests."""

from __future__ import annotations

import numpy as np

from policies.generate import random_problem
from policies.problem import Constraints, Layer, Link, ModelSpec, Node, NodeCost, Objective, Problem, Workload


def small_instance(seed: int) -> Problem:
    """Up to 6 nodes x 12 layers; about half carry trust, throughput or SLO constraints."""
    rng = np.random.default_rng(10_000 + seed)
    n_nodes = int(rng.integers(1, 7))
    n_layers = int(rng.integers(1, 13))
    base = random_problem(
        seed,
        n_nodes,
        n_layers,
        measured=bool(rng.uniform() < 0.7),
        complete=bool(rng.uniform() < 0.6),
        mem_scale=float(rng.choice([0.6, 1.0, 2.0])),
    )
    objective = Objective(
        ttft=float(rng.choice([0.0, 1.0, 1.0])),
        tpot=None if rng.uniform() < 0.5 else float(rng.uniform(0.0, 50.0)),
        bottleneck=0.0 if rng.uniform() < 0.5 else float(rng.uniform(0.0, 500.0)),
        privacy=0.0 if rng.uniform() < 0.5 else float(rng.uniform(0.0, 2.0)),
    )
    if objective.ttft == 0.0 and objective.tpot == 0.0:
        objective = objective.model_copy(update={"tpot": 1.0})
    kind = int(rng.integers(0, 6))
    c = Constraints()
    if kind == 1:
        c = Constraints(
            trusted_prefix_layers=int(rng.integers(0, n_layers + 1)), trusted_head=bool(rng.uniform() < 0.5)
        )
    elif kind == 2:
        c = Constraints(
            private_depth=int(rng.integers(0, n_layers + 1)), trust_threshold=float(rng.choice([0.5, 1.0]))
        )
    elif kind == 3:
        c = Constraints(min_throughput_tok_s=float(rng.uniform(5.0, 400.0)))
    elif kind == 4:
        c = Constraints(max_tpot_s=float(rng.uniform(0.002, 0.08)))
    elif kind == 5:
        c = Constraints(max_ttft_s=float(rng.uniform(0.05, 2.0)), trusted_prefix_layers=1)
    return base.model_copy(update={"objective": objective, "constraints": c})


def with_bursts(p: Problem, seed: int) -> Problem:
    """``p`` with a frame on every message and a burst on every link (HTB-shaped), sized about one
    decode message, so that some messages fit and others do not."""
    rng = np.random.default_rng(20_000 + seed)
    act = p.model.layers[0].act_bytes_per_token
    links = tuple(
        lk.model_copy(
            update={"burst_bytes": int(rng.uniform(0, 2 * act)), "burst_s": float(rng.choice([0.0, 0.002]))}
        )
        for lk in p.links
    )
    model = p.model.model_copy(update={"frame_bytes": int(rng.uniform(0, 1000))})
    return p.model_copy(update={"links": links, "model": model})


def tiny_instance(seed: int) -> Problem:
    """Fast hardware: layers of ~1e-4 s per token, hops of ~1e-6..1e-3 s, weights and memory of 1e6..1e9
    bytes: magnitudes that break solvers whose tolerances are absolute (1e-6 next to 1e-4 s). Up to 5
    nodes x 8 layers; weighted (bottleneck and privacy weights from 0 to 500) or lexicographic, with or
    without an SLO or a throughput floor."""
    rng = np.random.default_rng(seed)
    n_nodes, n_layers = int(rng.integers(2, 6)), int(rng.integers(3, 9))
    hidden = int(rng.choice([576, 960, 2048]))
    weights = [int(rng.uniform(0.9, 1.1) * 12 * hidden * hidden * 2) for _ in range(n_layers)]
    layers = tuple(
        Layer(weight_bytes=b, kv_bytes_per_token=4 * hidden, act_bytes_per_token=2 * hidden) for b in weights
    )
    names = [f"n{k}" for k in range(n_nodes)]
    nodes = tuple(
        Node(
            name=name,
            tier="edge",
            speed_flops=1e12,
            mem_bytes=int(sum(weights) * rng.uniform(0.3, 1.5)),
            trust=float(rng.choice([1.0, 0.6, 0.2])),
        )
        for name in names
    )
    costs = []
    for name in names:
        pace = rng.uniform(0.5, 3.0)
        dec = tuple(float(1e-4 * pace * rng.uniform(0.9, 1.1)) for _ in range(n_layers))
        pre = tuple(float(d * rng.uniform(0.02, 0.1)) for d in dec)
        costs.append(
            NodeCost(
                node=name,
                prefill_s_per_token=pre,
                decode_s_per_token=dec,
                head_prefill_s_per_token=float(5e-6 * pace),
                head_decode_s_per_token=float(2e-4 * pace),
            )
        )
    links = tuple(
        Link(
            a=names[a],
            b=names[b],
            bw_mbit=float(rng.uniform(100, 10000)),
            rtt_ms=float(rng.uniform(0.02, 1.0)),
        )
        for a in range(n_nodes)
        for b in range(a + 1, n_nodes)
    )
    kind = int(rng.integers(0, 5))
    objective = Objective(
        ttft=float(rng.choice([0.0, 1.0])),
        tpot=float(rng.choice([1.0, 63.0])),
        bottleneck=float(rng.choice([0.0, 10.0, 500.0])),
        privacy=float(rng.choice([0.0, 0.0, 1e-3, 1.0])),
    )
    if rng.uniform() < 0.2:
        order = tuple(rng.permutation(["ttft", "tpot", "bottleneck", "privacy"]).tolist())
        objective = Objective(mode="lexicographic", order=order)
    c = Constraints()
    if kind == 1:
        c = Constraints(max_tpot_s=float(1e-4 * n_layers * rng.uniform(1.0, 3.0)))
    elif kind == 2:
        c = Constraints(max_ttft_s=float(1e-5 * n_layers * 128 * rng.uniform(0.3, 2.0)))
    elif kind == 3:
        c = Constraints(min_throughput_tok_s=float(rng.uniform(500, 5000)))
    return Problem(
        model=ModelSpec(
            name="tiny", layers=layers, embed_weight_bytes=20_000_000, head_weight_bytes=20_000_000
        ),
        nodes=nodes,
        links=links,
        costs=tuple(costs),
        source=names[0],
        workload=Workload(prompt_tokens=int(rng.integers(16, 256)), gen_tokens=int(rng.integers(8, 128))),
        constraints=c,
        objective=objective,
    )


def time_scaled(p: Problem, factor: float) -> Problem:
    """``p`` with every time multiplied by ``factor``: compute (measured costs, or speed), wire (bandwidth
    divided, RTT multiplied), SLOs; the throughput floor divided. Plans keep their ranking on time."""
    costs = tuple(
        cost.model_copy(
            update={
                "prefill_s_per_token": tuple(v * factor for v in cost.prefill_s_per_token),
                "decode_s_per_token": tuple(v * factor for v in cost.decode_s_per_token),
                "head_prefill_s_per_token": cost.head_prefill_s_per_token * factor,
                "head_decode_s_per_token": cost.head_decode_s_per_token * factor,
            }
        )
        for cost in p.costs
    )
    nodes = tuple(n.model_copy(update={"speed_flops": n.speed_flops / factor}) for n in p.nodes)
    links = tuple(
        lk.model_copy(update={"bw_mbit": lk.bw_mbit / factor, "rtt_ms": lk.rtt_ms * factor}) for lk in p.links
    )
    c = p.constraints
    scaled = {
        "max_ttft_s": None if c.max_ttft_s is None else c.max_ttft_s * factor,
        "max_tpot_s": None if c.max_tpot_s is None else c.max_tpot_s * factor,
        "min_throughput_tok_s": None if c.min_throughput_tok_s is None else c.min_throughput_tok_s / factor,
    }
    return p.model_copy(
        update={"costs": costs, "nodes": nodes, "links": links, "constraints": c.model_copy(update=scaled)}
    )
