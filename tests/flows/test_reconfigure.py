"""The reconfigure flow's steps that need no deployment."""

from __future__ import annotations

from pathlib import Path

from flows.reconfigure import replan_task
from policies import Problem

EXAMPLE = Path(__file__).resolve().parents[2] / "policies" / "examples" / "smollm2_mec.json"


def test_no_plan_fitting_the_nodes_up_is_a_reason_to_wait_not_a_failed_run() -> None:
    """A node the model needs is down and no other set of nodes holds it: the step says why instead of
    failing the run: the deployment waits for the node to come back."""
    problem = Problem.from_json(EXAMPLE.read_text())
    small = problem.model_copy(
        update={"nodes": tuple(n.model_copy(update={"mem_bytes": 10_000_000}) for n in problem.nodes)}
    )
    why = replan_task.fn(small, "latency_dp")
    assert isinstance(why, str) and "memory" in why
