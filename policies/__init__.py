"""The joint placement-partitioning optimiser: pure (no I/O) and deterministic.

``solve(problem, policy)`` returns a ``Plan``; ``predict`` prices any stage list; ``decide`` says whether a
new plan is worth its migration cost. See docs/policies.md.
"""

from policies.analytic import predict
from policies.errors import (
    InfeasibleError,
    PolicyError,
    ProblemError,
    SearchLimitError,
    SolverError,
    UnknownPolicyError,
)
from policies.plan import Metrics, Plan, Stage
from policies.problem import Constraints, Layer, Link, ModelSpec, Node, NodeCost, Objective, Problem, Workload
from policies.registry import EXACT_POLICIES, POLICIES, solve
from policies.replan import Decision, MigrationCost, decide

__all__ = [
    "EXACT_POLICIES",
    "POLICIES",
    "Constraints",
    "Decision",
    "InfeasibleError",
    "Layer",
    "Link",
    "Metrics",
    "MigrationCost",
    "ModelSpec",
    "Node",
    "NodeCost",
    "Objective",
    "Plan",
    "PolicyError",
    "Problem",
    "ProblemError",
    "SearchLimitError",
    "SolverError",
    "Stage",
    "UnknownPolicyError",
    "Workload",
    "decide",
    "predict",
    "solve",
]
