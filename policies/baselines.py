"""Published placement strategies, re-implemented on mecsplit's problem so experiments compare like with
like. Each returns a validated ``Plan`` or raises ``InfeasibleError`` naming what it could not satisfy.

All of them respect memory and trust (the published systems know no trust domains; we apply the same
rules to every policy so that no baseline wins by breaking them). What each mirrors:

* ``all_device``: everything on the source (on-device inference).
* ``all_cloud``: everything on the best cloud-tier node (cloud offloading).
* ``neurosurgeon``: Neurosurgeon (Kang et al., ASPLOS'17): one split point between the source device and
  one remote node (cloud tier when there is one), the split and node of least latency.
* ``exo``: exo's ring memory-weighted partitioning: every node, ordered by memory (largest first, trusted
  nodes first when a trusted prefix is asked), layers proportional to memory.
* ``petals``: Petals (Borzunov et al., 2023): servers, fastest first, each pick the span of blocks as long
  as their memory allows where the swarm's throughput is lowest; the client then routes through the
  span that reaches furthest. A Petals client keeps the embeddings and the head; here the stage with the
  first or last block holds them, so such a span is cut short until they fit too.
* ``pipeedge``: PipeEdge (Hu et al., 2022): minimum bottleneck over the inter-stage pipeline (compute and
  stage-to-stage links; the source hops are outside its model).
* ``edgeshard``: EdgeShard (Zhang et al., 2024): latency DP over selected devices minimising per-token
  (decode) latency only.
* ``even``: layers split evenly over all nodes (source first, then device < edge < mec < cloud, then name).
"""

from __future__ import annotations

from policies.analytic import latency_objective, node_times, stage_memory_bytes
from policies.errors import InfeasibleError
from policies.plan import Plan, Stage
from policies.problem import Objective, Problem
from policies.solvers import latency_dp, plan_from_stages, throughput_dp

_TIER_ORDER = {"device": 0, "edge": 1, "mec": 2, "cloud": 3}


def all_device(problem: Problem) -> Plan:
    return plan_from_stages(
        problem, (Stage(node=problem.source, first=0, end=problem.num_layers),), "all_device"
    )


def all_cloud(problem: Problem) -> Plan:
    clouds = sorted(n.name for n in problem.nodes if n.tier == "cloud")
    if not clouds:
        raise InfeasibleError("tier", "policy 'all_cloud' needs a node with tier 'cloud'; add one")
    return _best_of(problem, [(Stage(node=c, first=0, end=problem.num_layers),) for c in clouds], "all_cloud")


def neurosurgeon(problem: Problem) -> Plan:
    L = problem.num_layers
    remote = sorted(n.name for n in problem.nodes if n.tier == "cloud" and n.name != problem.source)
    if not remote:
        remote = sorted(n for n in problem.node_names if n != problem.source)
    options: list[tuple[Stage, ...]] = [(Stage(node=problem.source, first=0, end=L),)]
    for node in remote:
        options.append((Stage(node=node, first=0, end=L),))
        for split in range(1, L):
            options.append(
                (Stage(node=problem.source, first=0, end=split), Stage(node=node, first=split, end=L))
            )
    return _best_of(problem, options, "neurosurgeon")


def _best_of(problem: Problem, options: list[tuple[Stage, ...]], policy: str) -> Plan:
    """The feasible option of least latency objective; ties keep the earliest option."""
    best: Plan | None = None
    first_error: InfeasibleError | None = None
    for stages in options:
        try:
            plan = plan_from_stages(problem, stages, policy)
        except InfeasibleError as err:
            first_error = first_error or err
            continue
        if best is None or latency_objective(problem, plan.predicted) < latency_objective(
            problem, best.predicted
        ):
            best = plan
    if best is None:
        assert first_error is not None
        raise first_error
    return best


def exo(problem: Problem) -> Plan:
    c = problem.constraints
    trusted_first = c.trusted_prefix_layers > 0 or c.private_depth > 0
    nodes = sorted(
        problem.nodes,
        key=lambda n: (not problem.is_trusted(n.name) if trusted_first else False, -n.mem_bytes, n.name),
    )
    total = sum(n.mem_bytes for n in nodes)
    if total == 0:
        raise InfeasibleError("memory", "policy 'exo': no node has memory")
    # Cumulative rounding, as exo does: boundaries at round(L * cumulative memory share).
    stages: list[Stage] = []
    cum = 0
    start = 0
    for n in nodes:
        cum += n.mem_bytes
        end = round(problem.num_layers * cum / total)
        if end > start:
            stages.append(Stage(node=n.name, first=start, end=end))
            start = end
    return plan_from_stages(problem, tuple(stages), "exo")


def petals(problem: Problem) -> Plan:
    L = problem.num_layers
    times = node_times(problem)
    c = problem.constraints
    first_min = max(c.trusted_prefix_layers, c.private_depth)
    # Servers join fastest first (throughput = 1 / mean decode time per layer).
    servers = sorted(problem.nodes, key=lambda n: (sum(times[n.name].decode_s) / L, n.name))
    coverage = [0.0] * L
    spans: dict[str, tuple[int, int]] = {}
    for n in servers:
        length = _max_layers(problem, n.name)
        lo = 0 if problem.is_trusted(n.name) else first_min
        hi = L - 1 if (c.trusted_head and not problem.is_trusted(n.name)) else L
        length = min(length, hi - lo)
        if length <= 0:
            continue
        rate = 1.0 / max(sum(times[n.name].decode_s) / L, 1e-12)
        # Where the span holds the first or last block it also holds the embeddings or the head, so
        # its length depends on where it starts: every start is a candidate, cut short to fit.
        spans_at = (_fitting_span(problem, n.name, s, min(s + length, hi)) for s in range(lo, hi))
        candidates = [span for span in spans_at if span is not None]
        if not candidates:
            continue
        first, end = min(candidates, key=lambda span: (min(coverage[span[0] : span[1]]), span[0]))
        spans[n.name] = (first, end)
        for k in range(first, end):
            coverage[k] += rate
    # Client routing: from the current block, the server whose span reaches furthest (ties: faster).
    order = {n.name: k for k, n in enumerate(servers)}
    stages: list[Stage] = []
    cur = 0
    used: set[str] = set()
    while cur < L:
        holders = [(s, e, name) for name, (s, e) in spans.items() if s <= cur < e and name not in used]
        if not holders:
            raise InfeasibleError(
                "memory", f"policy 'petals': no server holds block {cur}; add memory or nodes"
            )
        _s, e, name = max(holders, key=lambda h: (h[1], -order[h[2]]))
        stages.append(Stage(node=name, first=cur, end=e))
        used.add(name)
        cur = e
    return plan_from_stages(problem, tuple(stages), "petals")


def _fitting_span(problem: Problem, node: str, first: int, end: int) -> tuple[int, int] | None:
    """``[first, end)`` cut short until it fits ``node`` (None if no block does)."""
    mem = problem.node(node).mem_bytes
    while end > first and problem.constraints.check_memory and stage_memory_bytes(problem, first, end) > mem:
        end -= 1
    return (first, end) if end > first else None


def _max_layers(problem: Problem, node: str) -> int:
    """Most layers a node can hold (weights + KV), as a Petals server sizes its span from free memory."""
    if not problem.constraints.check_memory:
        return problem.num_layers
    mem = problem.node(node).mem_bytes
    ctx = problem.workload.context_tokens * problem.workload.concurrent_sessions
    count = used = 0
    for layer in problem.model.layers:
        need = layer.weight_bytes + ctx * layer.kv_bytes_per_token
        if used + need > mem:
            break
        used += need
        count += 1
    return count


def pipeedge(problem: Problem) -> Plan:
    return throughput_dp(problem, policy="pipeedge", source_hops=False, strict=False)


def edgeshard(problem: Problem) -> Plan:
    per_token = Objective(ttft=0.0, tpot=1.0, bottleneck=0.0, privacy=0.0)
    plan = latency_dp(problem.model_copy(update={"objective": per_token}), policy="edgeshard")
    # Re-price with the caller's objective so objective_value compares across policies.
    return plan_from_stages(problem, plan.stages, "edgeshard")


def even(problem: Problem) -> Plan:
    nodes = sorted(
        problem.nodes,
        key=lambda n: (n.name != problem.source, _TIER_ORDER[n.tier], n.name),
    )
    c = problem.constraints
    if c.trusted_prefix_layers or c.private_depth:
        nodes.sort(key=lambda n: not problem.is_trusted(n.name))  # stable: trusted nodes take the prefix
    k = min(len(nodes), problem.num_layers)
    base, extra = divmod(problem.num_layers, k)
    stages: list[Stage] = []
    start = 0
    for idx, n in enumerate(nodes[:k]):
        end = start + base + (1 if idx < extra else 0)
        stages.append(Stage(node=n.name, first=start, end=end))
        start = end
    return plan_from_stages(problem, tuple(stages), "even")
