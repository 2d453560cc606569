"""Seeded small instances with varied constraints and objectives for the exactness tests."""

from __future__ import annotations

import numpy as np

from policies.generate import random_problem
from policies.problem import Constraints, Objective, Problem


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
