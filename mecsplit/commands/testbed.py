"""``mecsplit testbed ...``: scenario files, machine checks, and (added by the runtime) the daemon.

Everything the testbed offers on the command line hangs off :data:`testbed_app`; the scenario and
machine-check commands live here, the daemon commands (up, status, set-link, ...) are added to the same
group by the testbed runtime.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

testbed_app = typer.Typer(
    help="The emulated MEC testbed: scenario files, machine checks, the network daemon.",
    no_args_is_help=True,
)


@testbed_app.callback()
def _cleans_up_on_signals() -> None:
    # `up` stops the daemon it started, `down` finishes its teardown, when the command is killed.
    from mecsplit.process import exit_cleanly_on_signals

    exit_cleanly_on_signals()


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


# ------------------------------------------------------------------------------------------- daemon commands
def _client() -> Any:
    from testbed.api import TestbedClient
    from testbed.errors import TestbedError

    try:
        return TestbedClient()
    except TestbedError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None


def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    from testbed.errors import TestbedError

    try:
        return fn(*args, **kwargs)
    except TestbedError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None


def _echo_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2))


@testbed_app.command("up")
def up_cmd(
    scenario: Path = typer.Option(..., "--scenario", "-s", help="scenario YAML file"),
    timeout_s: float = typer.Option(None, help="how long to wait for the network (default: settings)"),
) -> None:
    """Start the testbed daemon for a scenario (detached); it owns the network until `down`."""
    from mecsplit.settings import Settings
    from testbed.api import start_daemon
    from testbed.errors import TestbedError
    from testbed.scenario import ScenarioError

    settings = Settings()
    try:
        state = start_daemon(
            scenario, timeout_s=timeout_s or settings.testbed.start_timeout_s,
            progress=lambda msg: typer.echo(f"  {msg}"),
        )  # fmt: skip
    except ScenarioError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    except TestbedError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    typer.echo(f"testbed {state['scenario']} up (daemon pid {state['pid']}, API 127.0.0.1:{state['port']})")


@testbed_app.command("status")
def status_cmd(as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """Nodes, links (set and measured), segments and recent events of the running testbed."""
    client = _client()
    status = _call(client.status)
    if as_json:
        _echo_json(status)
        return
    typer.echo(f"scenario {status['scenario']} (prefix {status['prefix']}, source {status['source']})")
    for n in status["nodes"]:
        state = "FAILED" if n["failed"] else n["state"]
        typer.echo(
            f"  node {n['name']:<7} {state:<8} {n['cpus']} cpus  load {n['load_pct']}%  "
            f"cpu {n.get('cpu_pct', '-')}%  {n['address']} (mgmt {n['mgmt_address']})  "
            f"segments {','.join(n['segments']) or '-'}"
        )
    for lk in status["links"]:
        typer.echo(
            f"  link {lk['link']:<14} {lk.get('bw_mbit')} Mbit/s {lk.get('delay_ms')} ms "
            f"{lk.get('loss_pct')} %  measured {lk.get('measured_observed_mbit', '-')} Mbit/s"
        )
    for e in status["recent_events"][-5:]:
        typer.echo(f"  event {e['event']} {e['resource_id']} {json.dumps(e['payload'])}")


@testbed_app.command("set-link")
def set_link_cmd(
    a: str,
    b: str,
    bw_mbit: float = typer.Option(None, "--bw-mbit"),
    delay_ms: float = typer.Option(None, "--delay-ms"),
    loss_pct: float = typer.Option(None, "--loss-pct"),
) -> None:
    """Change a link in place (unset values keep theirs)."""
    _echo_json(_call(_client().set_link, a, b, bw_mbit, delay_ms, loss_pct))


@testbed_app.command("set-load")
def set_load_cmd(node: str, pct: float) -> None:
    """Background CPU load on a node, PCT % of its CPU share (0 stops it)."""
    _echo_json(_call(_client().set_load, node, pct))


@testbed_app.command("fail")
def fail_cmd(node: str) -> None:
    """Fail a node: pause its containers and take its links down."""
    _echo_json(_call(_client().fail, node))


@testbed_app.command("restore")
def restore_cmd(node: str) -> None:
    """Restore a failed node."""
    _echo_json(_call(_client().restore, node))


@testbed_app.command("replay")
def replay_cmd(action: str = typer.Argument("start", help="start | stop")) -> None:
    """Play (or stop) the scenario's timeline: traces, load, failures, joins."""
    client = _client()
    if action not in ("start", "stop"):
        typer.echo("action must be start or stop", err=True)
        raise typer.Exit(2)
    _echo_json(_call(client.replay_start if action == "start" else client.replay_stop))


@testbed_app.command("deploy-segment")
def deploy_segment_cmd(
    node: str,
    name: str,
    command: list[str] = typer.Argument(..., help="argv to run in the container (after --)"),
    port: int = typer.Option(None, help="the port the command listens on (echoed back)"),
) -> None:
    """Start a container on NODE (its netns, CPU and memory) running COMMAND."""
    _echo_json(_call(_client().deploy_segment, node, name, command, port=port))


@testbed_app.command("stop-segment")
def stop_segment_cmd(node: str, name: str) -> None:
    """Stop and remove a segment container (SIGTERM first)."""
    _echo_json(_call(_client().stop_segment, node, name))


@testbed_app.command("down")
def down_cmd(
    force: bool = typer.Option(False, "--force", help="clean up by prefix even without a daemon"),
) -> None:
    """Tear the testbed down; --force also after the daemon was killed."""
    from mecsplit.settings import Settings
    from testbed import cleanup
    from testbed.api import TestbedClient
    from testbed.errors import TestbedError

    settings = Settings()
    try:
        with TestbedClient() as client:
            client.down()
        typer.echo("testbed down")
    except TestbedError as exc:
        if not force:
            typer.echo(f"{exc}\n(use --force to clean up by prefix)", err=True)
            raise typer.Exit(1) from None
    if force:
        left = cleanup.teardown(settings.testbed.prefix, run_dir=settings.run_dir)
        if not left.empty():
            typer.echo(f"left over: {json.dumps(left.as_dict())}", err=True)
            raise typer.Exit(1)
        typer.echo(f"nothing with prefix {settings.testbed.prefix!r} is left")


def bench_links_cmd(
    as_json: bool = typer.Option(True, "--json/--no-json"),
    rates: str = typer.Option("1,5,20,100", help="Mbit/s, comma-separated"),
    delays: str = typer.Option("5,20,50", help="one-way ms, comma-separated"),
    seconds: float = typer.Option(3.0, help="goodput window per point"),
) -> None:
    """Goodput and RTT across a shaped testbed link between two node containers, change latency, and what
    a prefill-sized burst pays after the rate rises (segment links' congestion control, host default)."""
    from segments.auth import CONGESTION_CONTROL
    from testbed.bench import run_link_bench

    result = run_link_bench(
        [float(x) for x in rates.split(",")],
        [float(x) for x in delays.split(",")],
        seconds,
        progress=lambda m: typer.echo(m, err=True),
        pinned_congestion=CONGESTION_CONTROL.decode(),
    )
    typer.echo(json.dumps(result, indent=2 if as_json else None))


def register(app: typer.Typer, bench: typer.Typer) -> None:
    app.add_typer(testbed_app, name="testbed")
    bench.command("links")(bench_links_cmd)
