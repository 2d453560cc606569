"""Seeded random instances: heterogeneous device/edge/MEC/cloud nodes, used by tests and the benchmark.

Pure: a numpy ``Generator`` seeded by the caller; no file or network access.
"""

from __future__ import annotations

import numpy as np

from policies.problem import Constraints, Layer, Link, ModelSpec, Node, NodeCost, Objective, Problem, Workload

_TIERS = ("device", "edge", "mec", "cloud")
# Per tier: flop/s range, memory range (bytes), trust, RTT to the source (ms), bandwidth to it (Mbit/s).
_TIER_SPEC = {
    "device": ((2e9, 8e9), (0.3e9, 2e9), 1.0, (1, 3), (200, 1000)),
    "edge": ((8e9, 40e9), (0.5e9, 4e9), 1.0, (2, 10), (50, 500)),
    "mec": ((20e9, 120e9), (1e9, 8e9), 0.6, (5, 20), (50, 400)),
    "cloud": ((100e9, 600e9), (8e9, 64e9), 0.2, (30, 90), (20, 200)),
}


def random_problem(
    seed: int,
    n_nodes: int,
    n_layers: int,
    *,
    measured: bool = True,
    complete: bool = True,
    constraints: Constraints | None = None,
    objective: Objective | None = None,
    workload: Workload | None = None,
    mem_scale: float = 1.0,
) -> Problem:
    """A heterogeneous instance: node 0 is the source device; the rest draw a tier at random.

    Layer sizes follow a transformer of random width; ``measured`` gives every node per-layer measured
    costs with noise (as profiling does), otherwise costs come from flops / speed. ``mem_scale`` < 1 makes
    memory tight relative to the model.
    """
    rng = np.random.default_rng(seed)
    hidden = int(rng.choice([256, 576, 768, 1024, 2048]))
    layer_params = 12 * hidden * hidden
    layers = tuple(
        Layer(
            weight_bytes=int(4 * layer_params * rng.uniform(0.9, 1.1)),
            kv_bytes_per_token=int(2 * hidden * 4 // 3),
            act_bytes_per_token=4 * hidden,
            flops_per_token=float(2 * layer_params * rng.uniform(0.9, 1.1)),
        )
        for _ in range(n_layers)
    )
    model_bytes = sum(layer.weight_bytes for layer in layers)
    tiers = ["device", *[_TIERS[int(rng.integers(0, 4))] for _ in range(n_nodes - 1)]]
    nodes = []
    for k, tier in enumerate(tiers):
        speed, _mem, trust, _rtt, _bw = _TIER_SPEC[tier]
        # Memory is drawn relative to the model so that interesting instances need several nodes.
        frac = rng.uniform(0.15, 1.2) if tier != "cloud" else rng.uniform(1.0, 3.0)
        nodes.append(
            Node(
                name=f"{tier}{k:03d}",
                tier=tier,
                speed_flops=float(rng.uniform(*speed)),
                mem_bytes=int(frac * model_bytes * mem_scale),
                load=float(rng.choice([0.0, 0.0, 0.2, 0.5])),
                trust=trust,
            )
        )
    links = _links(rng, nodes, complete)
    costs = ()
    if measured:
        costs = tuple(
            NodeCost(
                node=n.name,
                prefill_s_per_token=tuple(
                    float(layer.flops_per_token / n.speed_flops * rng.uniform(0.3, 0.6)) for layer in layers
                ),
                decode_s_per_token=tuple(
                    float(layer.flops_per_token / n.speed_flops * rng.uniform(0.9, 1.3)) for layer in layers
                ),
                head_prefill_s_per_token=float(4 * layer_params / n.speed_flops),
                head_decode_s_per_token=float(8 * layer_params / n.speed_flops),
            )
            for n in nodes
        )
    return Problem(
        model=ModelSpec(
            name=f"random-h{hidden}",
            layers=layers,
            embed_weight_bytes=int(layer_params),
            head_weight_bytes=int(layer_params),
            head_flops_per_token=float(2 * layer_params),
        ),
        nodes=tuple(nodes),
        links=links,
        costs=costs,
        source=nodes[0].name,
        workload=workload
        or Workload(prompt_tokens=int(rng.integers(16, 256)), gen_tokens=int(rng.integers(8, 128))),
        constraints=constraints or Constraints(),
        objective=objective or Objective(),
    )


def _links(rng: np.random.Generator, nodes: list[Node], complete: bool) -> tuple[Link, ...]:
    links: list[Link] = []
    for a in range(len(nodes)):
        for b in range(a + 1, len(nodes)):
            if not complete and b > a + 1 and rng.uniform() < 0.6:
                continue  # a sparse mesh that keeps the chain a-(a+1) so everything stays reachable
            ta, tb = nodes[a].tier, nodes[b].tier
            rtt = _TIER_SPEC[ta][3][0] + _TIER_SPEC[tb][3][0] + rng.uniform(*_TIER_SPEC[tb][3])
            bw = min(rng.uniform(*_TIER_SPEC[ta][4]), rng.uniform(*_TIER_SPEC[tb][4]))
            links.append(Link(a=nodes[a].name, b=nodes[b].name, bw_mbit=float(bw), rtt_ms=float(rtt)))
    return tuple(links)
