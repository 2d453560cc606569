"""The one relative tolerance of every constraint check, shared by the solvers and the analytic model.

A plan meets a bound when its value is within ``REL_TOL`` of it (``ttft_s <= max_ttft_s * (1 + REL_TOL)``).
The compiled arrays and the reference model add the same numbers in a different order (errors ~1e-15),
and the MILP's rows hold only up to HiGHS's feasibility and integrality tolerances (1e-6 on rows scaled to
magnitude 1, see policies.milp): the slack must exceed both, or a solver picks a plan the check rejects.
1e-5 of an SLO is far below anything a measurement resolves (0.1 us of a 10 ms TTFT bound).
"""

from __future__ import annotations

REL_TOL = 1e-5


def within(value: float, bound: float) -> bool:
    """``value`` meets the upper ``bound`` up to the shared relative slack."""
    return value <= bound * (1.0 + REL_TOL)
