"""Every policy: feasible plans (or a typed error), optimality against the exact ones, determinism."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policies import POLICIES, InfeasibleError, Plan, Problem, UnknownPolicyError, solve
from policies.analytic import latency_objective, stage_memory_bytes, violations
from policies.generate import random_problem
from policies.problem import Constraints, Node
from policies.tolerance import within
from tests.policies.instances import small_instance

EXAMPLE = Path(__file__).resolve().parents[2] / "policies" / "examples" / "smollm2_mec.json"


def example() -> Problem:
    return Problem.from_json(EXAMPLE.read_text())


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000))
def test_every_policy_plan_is_feasible_or_a_typed_error(seed: int) -> None:
    p = small_instance(seed)
    for name in POLICIES:
        try:
            plan = solve(p, name)
        except InfeasibleError as err:
            assert err.constraint
            continue
        assert violations(p, plan.stages) == [], name
        assert plan.policy == name


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), n_nodes=st.integers(2, 8), n_layers=st.integers(2, 16))
def test_exact_policies_are_never_beaten(seed: int, n_nodes: int, n_layers: int) -> None:
    p = random_problem(seed, n_nodes, n_layers, mem_scale=0.7)
    try:
        best_lat = latency_objective(p, solve(p, "latency_dp").predicted)
        best_bott = solve(p, "throughput_dp").predicted.bottleneck_s
    except InfeasibleError:
        return
    for name in POLICIES:
        try:
            m = solve(p, name).predicted
        except InfeasibleError:
            continue
        assert latency_objective(p, m) >= best_lat * (1 - 1e-9), name
        if name != "pipeedge":  # PipeEdge's bottleneck leaves out the source hops
            assert m.bottleneck_s >= best_bott * (1 - 1e-9), name


def test_plan_json_is_byte_identical_across_runs_and_round_trips() -> None:
    p = example()
    again = Problem.from_json(p.to_json())
    for name in POLICIES:
        try:
            first = solve(p, name).to_json()
        except InfeasibleError:
            continue
        assert solve(again, name).to_json() == first
        assert Plan.from_json(first).to_json() == first


def test_example_problem_has_smollm2_figures() -> None:
    p = example()
    assert p.num_layers == 30
    # 2*576^2 (q, o) + 2*576*192 (k, v) + 3*576*1536 (MLP) + 2*576 (norms) = 3,540,096 params, fp32
    assert p.model.layers[0].weight_bytes == 3_540_096 * 4
    assert p.model.layers[0].kv_bytes_per_token == 2 * 3 * 64 * 4
    assert p.model.layers[0].act_bytes_per_token == 576 * 4
    assert p.model.embed_weight_bytes == 49152 * 576 * 4
    plan = solve(p, "latency_dp")
    assert plan.stages[0].first == 0 and plan.stages[-1].end == 30
    # The trusted prefix (2 layers) stays on trusted nodes.
    assert p.is_trusted(plan.stages[0].node)


def test_unknown_policy_lists_the_known_ones() -> None:
    with pytest.raises(UnknownPolicyError, match="latency_dp"):
        solve(example(), "nope")


def _with(p: Problem, **change: object) -> Problem:
    return p.model_copy(update={"constraints": p.constraints.model_copy(update=change)})


def test_infeasible_memory_is_named() -> None:
    p = example()
    tiny = tuple(n.model_copy(update={"mem_bytes": 50_000_000}) for n in p.nodes)
    with pytest.raises(InfeasibleError) as err:
        solve(p.model_copy(update={"nodes": tiny}), "latency_dp")
    assert err.value.constraint == "memory"


def test_petals_spans_leave_room_for_the_embeddings_and_head() -> None:
    # Every node holds all the blocks' weights and KV but not the embeddings and the head as well (V2X's
    # car): a span there must be cut short rather than make the plan infeasible.
    p = _with(example(), trusted_prefix_layers=0)
    room = stage_memory_bytes(p, 0, p.num_layers) - p.model.head_weight_bytes
    tight = p.model_copy(update={"nodes": tuple(n.model_copy(update={"mem_bytes": room}) for n in p.nodes)})
    plan = solve(tight, "petals")
    assert len(plan.stages) >= 2
    assert violations(tight, plan.stages) == []


def test_infeasible_trust_is_named() -> None:
    p = example()
    # Only untrusted nodes have room, and layers [0, 2) must stay trusted.
    nodes = tuple(
        n.model_copy(update={"mem_bytes": 10_000_000}) if p.is_trusted(n.name) else n for n in p.nodes
    )
    with pytest.raises(InfeasibleError) as err:
        solve(p.model_copy(update={"nodes": nodes}), "latency_dp")
    assert err.value.constraint == "trust"


def test_infeasible_slo_and_throughput_are_named() -> None:
    p = example()
    with pytest.raises(InfeasibleError) as err:
        solve(_with(p, min_throughput_tok_s=1e6), "throughput_dp")
    assert err.value.constraint == "min_throughput"
    with pytest.raises(InfeasibleError) as err:
        solve(_with(p, max_tpot_s=1e-4), "latency_dp")
    assert err.value.constraint == "max_tpot"
    with pytest.raises(InfeasibleError) as err:
        solve(_with(p, max_ttft_s=1e-3), "milp")
    assert err.value.constraint == "max_ttft"


def test_private_depth_keeps_early_activations_on_trusted_routes() -> None:
    p = _with(example(), private_depth=10)
    plan = solve(p, "latency_dp")
    for s in plan.stages:
        if s.first < 10:
            assert p.is_trusted(s.node)
    assert violations(p, plan.stages) == []


def test_slo_constrained_latency_plan_meets_the_slo() -> None:
    p = example()
    free = solve(p, "latency_dp")
    bound = free.predicted.ttft_s * 0.6  # the latency optimum spends TTFT to win TPOT; cap TTFT
    constrained = solve(_with(p, max_ttft_s=bound), "latency_dp")
    assert within(constrained.predicted.ttft_s, bound)
    assert constrained.layout() != free.layout()
    assert constrained.predicted.request_latency_s >= free.predicted.request_latency_s


def test_lexicographic_objective_puts_the_first_metric_first() -> None:
    p = example()
    lex = p.model_copy(
        update={
            "objective": p.objective.model_copy(
                update={"mode": "lexicographic", "order": ("privacy", "tpot")}
            )
        }
    )
    plan = solve(lex, "milp")
    assert plan.predicted.privacy_exposure == 0.0
    # Among zero-exposure plans it is the fastest per token: all on trusted nodes.
    assert all(lex.is_trusted(s.node) for s in plan.stages)


def test_problem_rejects_inconsistent_input() -> None:
    p = example()
    with pytest.raises(ValueError, match="source"):
        Problem.model_validate({**p.model_dump(), "source": "nowhere"})
    dup = (*p.nodes, Node(name="phone", tier="device", speed_flops=1e9, mem_bytes=1))
    with pytest.raises(ValueError, match="unique"):
        Problem.model_validate({**p.model_dump(), "nodes": [n.model_dump() for n in dup]})
    with pytest.raises(ValueError):
        Constraints(max_ttft_s=-1)


def test_policies_package_stays_pure() -> None:
    """No Prefect, Docker, torch, HTTP clients or other mecsplit packages behind ``import policies``."""
    import subprocess
    import sys

    code = (
        "import sys, policies, policies.bench;"
        "bad = [m for m in ('prefect', 'docker', 'torch', 'httpx', 'mecsplit', 'flows', 'testbed',"
        " 'segments') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
