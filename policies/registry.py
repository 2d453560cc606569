"""The policy registry: every solver and baseline behind one call, ``solve(problem, name)``."""

from __future__ import annotations

from collections.abc import Callable

from policies import baselines
from policies.errors import UnknownPolicyError
from policies.milp import milp
from policies.plan import Plan
from policies.problem import Problem
from policies.solvers import heuristic, latency_dp, throughput_dp

Policy = Callable[[Problem], Plan]

POLICIES: dict[str, Policy] = {
    # mecsplit's own: exact latency, exact throughput, exact constrained multi-objective, scalable heuristic
    "latency_dp": latency_dp,
    "throughput_dp": throughput_dp,
    "milp": milp,
    "heuristic": heuristic,
    # baselines
    "all_device": baselines.all_device,
    "all_cloud": baselines.all_cloud,
    "neurosurgeon": baselines.neurosurgeon,
    "exo": baselines.exo,
    "petals": baselines.petals,
    "pipeedge": baselines.pipeedge,
    "edgeshard": baselines.edgeshard,
    "even": baselines.even,
}

EXACT_POLICIES = ("latency_dp", "throughput_dp", "milp")


def solve(problem: Problem, policy: str = "latency_dp") -> Plan:
    try:
        fn = POLICIES[policy]
    except KeyError:
        raise UnknownPolicyError(policy, tuple(POLICIES)) from None
    return fn(problem)
