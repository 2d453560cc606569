"""``mecsplit demo | deploy | reconfigure | serve | down | prefect ...``: the Prefect pipeline."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import typer

SCENARIO_OPTION = typer.Option(Path("scenarios/default.yaml"), "--scenario", "-s", help="scenario YAML file")

prefect_app = typer.Typer(help="The Prefect server mecsplit uses (its own local one unless PREFECT_API_URL).",
                          no_args_is_help=True)  # fmt: skip


def _use_prefect_server() -> str:
    from flows.prefect_server import ensure_server

    server = ensure_server()
    os.environ.update(server.env())
    return server.ui_url


def demo(
    scenario: Path = SCENARIO_OPTION,
    backend: str = typer.Option(
        "auto", help="auto (testbed where root+Docker+Mininet work), testbed or local"
    ),
    phase_s: float = typer.Option(40.0, help="seconds of generation before the drop and after the change"),
    degraded_bw_mbit: float = typer.Option(0.1, help="bandwidth the source's link drops to (Mbit/s)"),
    max_tokens: int = typer.Option(16, help="tokens per request"),
) -> None:
    """The full demo: deploy the default scenario, generate, drop a link, watch the triggered re-split."""
    from flows.demo import run_demo

    run_demo(
        scenario, backend=backend, phase_s=phase_s, degraded_bw_mbit=degraded_bw_mbit, max_tokens=max_tokens
    )


def deploy(
    scenario: Path = SCENARIO_OPTION,
    backend: str = typer.Option(
        "local", help="local (processes on loopback) or testbed (needs `testbed up`)"
    ),
    policy: str = typer.Option("latency_dp", help="placement policy (see `mecsplit plan --help`)"),
) -> None:
    """First deployment as a Prefect flow run: profile -> optimise -> deploy the segments and the gateway."""
    from flows.reconfigure import deploy_flow
    from flows.state import load_state

    if load_state() is not None:
        typer.echo("a deployment is already running: `mecsplit down` first", err=True)
        raise typer.Exit(1)
    _use_prefect_server()
    result = deploy_flow(scenario=str(scenario), backend=backend, policy=policy)  # type: ignore[arg-type]
    typer.echo(json.dumps(result, indent=2))


def reconfigure(
    scenario: Path = SCENARIO_OPTION,
    policy: str = typer.Option("latency_dp", help="placement policy"),
    reason: str = typer.Option("manual", help="recorded as the run's reason"),
) -> None:
    """Run one reconfiguration now (profile -> optimise -> decide -> deploy)."""
    _use_prefect_server()  # before Prefect is imported: it reads PREFECT_API_URL then
    from flows.reconfigure import reconfigure as reconfigure_flow

    typer.echo(json.dumps(reconfigure_flow(scenario=str(scenario), policy=policy, reason=reason), indent=2))


def serve(
    scenario: Path = SCENARIO_OPTION,
    interval_s: float | None = typer.Option(None, help="also reconfigure every N seconds"),
    cron: str | None = typer.Option(None, help="also reconfigure on this cron schedule"),
    policy: str = typer.Option("latency_dp", help="placement policy the runs re-plan with"),
    failover_only: bool = typer.Option(
        False, "--failover-only", help="re-plan only when the deployed chain is broken (a dead hop)"
    ),
    controller: bool = typer.Option(
        True,
        "--controller/--no-controller",
        help="learn the cost model from live traffic and re-plan on network changes both ways and every "
        "few seconds, starting a run only when a better plan clears its cost (off: every event starts a run)",
    ),
) -> None:
    """Serve the reconfigure deployment (one reconfiguration at a time): on its schedule, on node failures
    (a broken chain is rebuilt), and through the controller, which learns the cost model from live traffic
    and re-plans when a link degrades or recovers, a node is overloaded, recovers or joins, and every few
    seconds (MECSPLIT_FLOWS__EVALUATE_EVERY_S), adopting a plan only when its expected gain over the link
    forecast clears the cost of moving (docs/flows.md). Blocks; Ctrl-C stops it."""
    ui = _use_prefect_server()  # before Prefect is imported: it reads PREFECT_API_URL then
    from flows.serve import serve_forever

    typer.echo(f"serving reconfigure for {scenario}; Prefect UI: {ui}")
    serve_forever(
        str(scenario), interval_s=interval_s, cron=cron, policy=policy, failover_only=failover_only,
        controller=controller,
    )  # fmt: skip


def down() -> None:
    """Stop the deployed segments and gateway (the testbed itself: `mecsplit testbed down`)."""
    from flows import pipeline
    from flows.runtime import backend_for
    from flows.state import clear_state, load_state
    from testbed.scenario import load_scenario

    state = load_state()
    if state is None:
        typer.echo("nothing deployed")
        return
    pipeline.teardown(backend_for(state.backend, load_scenario(Path(state.scenario))), state)
    clear_state()
    typer.echo(f"stopped {len(state.segments)} segments and the gateway")


experiment_app = typer.Typer(help="Experiments: a scenario under several policies, side by side.",
                              no_args_is_help=True)  # fmt: skip


@experiment_app.command("run")
def experiment_run(
    scenario: Path = SCENARIO_OPTION,
    policies: str = typer.Option(
        "adaptive,static", help="comma-separated: adaptive, static, or any `mecsplit plan` policy"
    ),
    backend: str = typer.Option("auto", help="auto, testbed or local (local: no timeline replay)"),
    duration_s: float | None = typer.Option(None, help="workload seconds per policy (default: scenario's)"),
    repeats: int = typer.Option(
        1,
        "--repeats",
        metavar="N",
        help="run every policy N times, interleaved (repeat k runs the policies in the given order rotated "
        "by k-1); figures get their mean with a 95 % interval and the comparison a verdict (adaptive "
        "faster, slower, or no difference resolved). The run takes N times as long",
    ),
    as_json: bool = typer.Option(False, "--json", help="print only the summary JSON"),
) -> None:
    """Run the scenario's workload and timeline under each policy; write results/<run>/ and compare."""
    names = [p.strip() for p in policies.split(",") if p.strip()]
    if not names:
        raise typer.BadParameter("give at least one policy", param_hint="--policies")
    if len(set(names)) != len(names):
        raise typer.BadParameter(f"a policy is named twice: {policies}", param_hint="--policies")
    if repeats < 1:
        raise typer.BadParameter(
            f"must be at least 1 (each repeat runs every policy once), got {repeats}", param_hint="--repeats"
        )
    # Before Prefect is imported: it reads PREFECT_API_URL then, and without it the flow would run on a
    # temporary server, apart from the one the served deployment and the testbed's events use.
    _use_prefect_server()
    from flows.experiment import experiment, nothing_ran

    # With --json stdout carries the summary only: progress lines go to stderr with Prefect's logs.
    with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
        summary = experiment(
            scenario=str(scenario), policies=names, backend=backend, duration_s=duration_s, repeats=repeats
        )
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        from flows.results import policy_table

        typer.echo(policy_table(summary))
    failure = nothing_ran(summary)
    if failure is not None:
        typer.echo(f"error: {failure}", err=True)
        raise typer.Exit(1)


@experiment_app.command("summarise")
def experiment_summarise(
    run_dir: Path = typer.Argument(..., help="a results/<run>/ folder of `experiment run`"),
    as_json: bool = typer.Option(False, "--json", help="print only the summary JSON"),
) -> None:
    """Recompute a finished run's figures and plots from its kept requests (no testbed needed)."""
    from flows.experiment import summarise_run
    from flows.results import policy_table

    summary = summarise_run(run_dir)
    typer.echo(json.dumps(summary, indent=2) if as_json else policy_table(summary))


@prefect_app.command("up")
def prefect_up() -> None:
    """Start (or find) the Prefect server and print its UI address."""
    typer.echo(_use_prefect_server())


@prefect_app.command("stop")
def prefect_stop() -> None:
    """Stop the local Prefect server mecsplit started (never a server it did not start)."""
    from flows.prefect_server import stop_server

    typer.echo("stopped" if stop_server() else "no mecsplit-started Prefect server is running")


def register(app: typer.Typer, bench: typer.Typer) -> None:
    del bench
    app.command("demo")(demo)
    app.command("deploy")(deploy)
    app.command("reconfigure")(reconfigure)
    app.command("serve")(serve)
    app.command("down")(down)
    app.add_typer(prefect_app, name="prefect")
    app.add_typer(experiment_app, name="experiment")
