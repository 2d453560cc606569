"""``mecsplit plan`` (solve one placement problem) and ``mecsplit bench policies``.

The lead wires ``--scenario`` through ``plan_problem(problem, policy, as_json)``, which takes a
``policies.problem.Problem`` built from any source.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer


def plan_problem(problem: object, policy: str, as_json: bool) -> str:
    """Solve ``problem`` (a ``policies.problem.Problem``) with ``policy``; the JSON form is the plan's
    deterministic ``to_json()``, the other a rich table. Raises ``policies.PolicyError``."""
    from policies import Problem, solve

    if not isinstance(problem, Problem):
        raise TypeError("plan_problem needs a policies.problem.Problem")
    plan = solve(problem, policy)
    if as_json:
        return plan.to_json()
    return _table(problem, plan)


def _table(problem: object, plan: object) -> str:
    from rich.console import Console
    from rich.table import Table

    from policies import Plan, Problem
    from policies.analytic import stage_memory_bytes

    assert isinstance(problem, Problem) and isinstance(plan, Plan)
    table = Table(title=f"plan by {plan.policy} for {problem.model.name} from {problem.source}")
    for col in ("stage", "node", "tier", "layers", "memory MB", "trusted"):
        table.add_column(col)
    for k, s in enumerate(plan.stages):
        node = problem.node(s.node)
        mem_mb = stage_memory_bytes(problem, s.first, s.end) / 1e6
        table.add_row(
            str(k),
            s.node,
            node.tier,
            f"[{s.first}, {s.end})",
            f"{mem_mb:.1f} / {node.mem_bytes / 1e6:.0f}",
            "yes" if problem.is_trusted(s.node) else "no",
        )
    m = plan.predicted
    console = Console(record=True, width=100)
    with console.capture() as cap:
        console.print(table)
        console.print(
            f"TTFT {m.ttft_s * 1e3:.1f} ms | TPOT {m.tpot_s * 1e3:.2f} ms"
            f" | throughput {m.throughput_tok_s:.1f} tok/s"
            f" | request {m.request_latency_s:.3f} s | privacy exposure {m.privacy_exposure:.3f}"
        )
    return cap.get()


def load_problem(path: Path) -> object:
    from policies import Problem

    return Problem.from_json(path.read_text())


def register(app: typer.Typer, bench: typer.Typer) -> None:
    @app.command("plan")
    def plan_cmd(
        problem: Path = typer.Option(..., "--problem", exists=True, dir_okay=False, help="problem JSON file"),
        policy: str = typer.Option(
            "", "--policy", help="a name from policies.POLICIES (default: settings policies.default_policy)"
        ),
        as_json: bool = typer.Option(False, "--json", help="print the plan as JSON"),
    ) -> None:
        """Solve a placement-partitioning problem and print the plan."""
        from pydantic import ValidationError

        from mecsplit.settings import get_settings
        from policies import PolicyError

        try:
            out = plan_problem(
                load_problem(problem), policy or get_settings().policies.default_policy, as_json
            )
        except (PolicyError, ValidationError) as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None
        typer.echo(out)

    @bench.command("policies")
    def bench_policies(
        as_json: bool = typer.Option(True, "--json/--no-json", help="print JSON (the only format)"),
        seeds: int = typer.Option(5, help="instances per size"),
        quality_instances: int = typer.Option(8, help="instances of the policy-quality suite"),
    ) -> None:
        """Median solve times at 5-200 nodes x 32/80 layers, heuristic gap, policy quality (JSON)."""
        from policies import bench as policy_bench

        result = policy_bench.run(seeds=seeds, quality_instances=quality_instances)
        typer.echo(json.dumps(result, indent=2 if as_json else None, sort_keys=True))
