"""Typed errors of the optimiser; each message says what to change."""

from __future__ import annotations


class PolicyError(Exception):
    """Base class of every error raised by ``policies``."""


class ProblemError(PolicyError, ValueError):
    """The problem description is inconsistent (unknown node, wrong lengths, ...)."""


class UnknownPolicyError(PolicyError, KeyError):
    """A policy name that is not in ``policies.POLICIES``."""

    def __init__(self, name: str, known: tuple[str, ...]) -> None:
        super().__init__(f"unknown policy {name!r}; choose one of: {', '.join(known)}")
        self.name = name

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class InfeasibleError(PolicyError):
    """No plan satisfies the constraints; ``constraint`` names the binding one.

    ``constraint`` is one of ``memory``, ``trust``, ``private_depth``, ``trusted_head``,
    ``min_throughput``, ``max_ttft``, ``max_tpot``, ``connectivity``, ``tier`` or ``combination``.
    """

    def __init__(self, constraint: str, detail: str) -> None:
        super().__init__(f"infeasible: constraint '{constraint}' binds: {detail}")
        self.constraint = constraint
        self.detail = detail


class SearchLimitError(PolicyError):
    """An exact search exceeded its state budget; use the 'heuristic' policy for this size."""


class SolverError(PolicyError):
    """A solver's answer contradicts the exact model (its plan fails the analytic check, or its optimum is
    not its plan's value): a numerical failure, not a property of the problem."""
