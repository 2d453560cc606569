"""``mecsplit testbed ...``: scenario files, machine checks, and (added by the runtime) the daemon.

Everything the testbed offers on the command line hangs off :data:`testbed_app`; the scenario and
machine-check commands live here, the daemon commands (up, status, set-link, ...) are added to the same
group by the testbed runtime.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

testbed_app = typer.Typer(
    help="The emulated MEC testbed: scenario files, machine checks, the network daemon.",
    no_args_is_help=True,
)


@testbed_app.command("schema")
def schema_cmd() -> None:
    """Print the JSON schema of scenario files."""
    from testbed.scenario import scenario_json_schema

    typer.echo(json.dumps(scenario_json_schema(), indent=2))


@testbed_app.command("validate")
def validate_cmd(
    files: list[Path] = typer.Argument(..., help="scenario YAML files"),
    as_json: bool = typer.Option(False, "--json", help="print the parsed scenarios (or problems) as JSON"),
) -> None:
    """Validate scenario files; on error name each field and its line, and exit 1."""
    from testbed.scenario import ScenarioError, load_scenario

    failed = False
    for path in files:
        try:
            scenario = load_scenario(path)
        except ScenarioError as exc:
            failed = True
            if as_json:
                problems = [{"field": p.field, "line": p.line, "message": p.message} for p in exc.problems]
                typer.echo(json.dumps({"file": str(path), "ok": False, "problems": problems}))
            else:
                typer.echo(str(exc), err=True)
            continue
        if as_json:
            dumped = scenario.model_dump(mode="json")
            typer.echo(json.dumps({"file": str(path), "ok": True, "scenario": dumped}))
        else:
            typer.echo(
                f"{path}: ok ({scenario.name}: {len(scenario.nodes)} nodes, {len(scenario.links)} links, "
                f"{len(scenario.events())} timeline events)"
            )
    if failed:
        raise typer.Exit(1)


@testbed_app.command("doctor")
def doctor_cmd(
    as_json: bool = typer.Option(False, "--json", help="print the checks as JSON"),
) -> None:
    """Check what the emulated testbed needs on this machine, and say how to fix what is missing."""
    from testbed.doctor import run_checks

    checks = run_checks()
    if as_json:
        typer.echo(json.dumps([c.model_dump() for c in checks], indent=2))
    else:
        for check in checks:
            mark = "ok  " if check.ok else ("warn" if not check.required else "FAIL")
            typer.echo(f"[{mark}] {check.name}: {check.detail}")
            if not check.ok and check.fix:
                typer.echo(f"       fix: {check.fix}")
    if not all(c.ok for c in checks if c.required):
        raise typer.Exit(1)


def register(app: typer.Typer, bench: typer.Typer) -> None:
    app.add_typer(testbed_app, name="testbed")
