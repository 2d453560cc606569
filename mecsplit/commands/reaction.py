"""``mecsplit bench reaction`` (a bandwidth drop to the new plan serving, per step), ``bench controller``
(what the serve controller costs with the network unchanged), ``bench model`` (how well the calibrated
cost model predicts plans before they serve), ``bench throughput`` (one chain's servers batching or
not, under many sessions) and ``bench overload`` (admission control at several times capacity), as JSON."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import typer


def bench_reaction_cmd(
    scenario: Path = typer.Option(Path("scenarios/default.yaml"), "--scenario", "-s", help="scenario YAML"),
    runs: int = typer.Option(3, min=1, help="link drops (restored and re-planned back in between)"),
    backend: str = typer.Option("auto", help="auto, testbed or local"),
    degraded_bw_mbit: float = typer.Option(0.1, help="rate the source's link drops to (Mbit/s)"),
    sessions: int = typer.Option(1, min=0, help="chat sessions generating through the gateway meanwhile"),
    as_json: bool = typer.Option(False, "--json", help="print only the JSON (progress goes to stderr)"),
) -> None:
    """Bring up the scenario, deploy, serve, drop the source's link N times and print the median time of
    each reaction step (detection, event -> run, profile, optimise, deploy, switch, first token) and end
    to end."""
    from flows.prefect_server import ensure_server
    from flows.reaction import run_reaction_bench

    ensure_server()
    # Progress and teardown messages go to stderr: stdout carries only the JSON.
    with contextlib.redirect_stdout(sys.stderr):
        summary = run_reaction_bench(
            scenario, runs=runs, backend=backend, degraded_bw_mbit=degraded_bw_mbit, sessions=sessions
        )
    typer.echo(json.dumps(summary, indent=None if as_json else 2))


def bench_controller_cmd(
    scenario: Path = typer.Option(Path("scenarios/default.yaml"), "--scenario", "-s", help="scenario YAML"),
    seconds: float = typer.Option(60.0, min=10.0, help="measured seconds (after a 30 s warm-up)"),
    backend: str = typer.Option("auto", help="auto, testbed or local"),
    as_json: bool = typer.Option(False, "--json", help="print only the JSON (progress goes to stderr)"),
) -> None:
    """Bring up the scenario, deploy, serve and generate with the network unchanged, and print what the
    serve controller costs meanwhile: its CPU share of one core (goal: under 1 %), its ticks and
    evaluations, and the reconfigure runs it started (goal: none)."""
    from flows.controller_bench import run_controller_bench
    from flows.prefect_server import ensure_server

    ensure_server()
    with contextlib.redirect_stdout(sys.stderr):
        summary = run_controller_bench(scenario, seconds=seconds, backend=backend)
    typer.echo(json.dumps(summary, indent=None if as_json else 2))


def bench_model_cmd(
    scenario: Path = typer.Option(Path("scenarios/default.yaml"), "--scenario", "-s", help="scenario YAML"),
    plans: str = typer.Option(
        "",
        help='plans as JSON, e.g. \'[[["device",0,2],["edge",2,30]], [["device",0,30]]]\'; empty: '
        "the deployed plan and up to three plans other policies choose",
    ),
    sessions: str = typer.Option("1,2", help="concurrent sessions per window, comma-separated"),
    seconds: float = typer.Option(30.0, min=5.0, help="measured seconds per window (after 10 s settling)"),
    backend: str = typer.Option("auto", help="auto, testbed or local"),
    as_json: bool = typer.Option(False, "--json", help="print only the JSON (progress goes to stderr)"),
) -> None:
    """Serve each plan in turn with 1, 2, ... sessions; calibrate the cost model on the first window only and
    print, per window, measured over predicted per-token latency (the prediction a decision would rest on),
    beside a model calibrated on the window itself."""
    from flows.model_bench import run_model_bench
    from flows.prefect_server import ensure_server

    try:
        layouts = json.loads(plans) if plans else None
    except ValueError as exc:
        raise typer.BadParameter(f"--plans must be JSON: {exc}") from None
    counts = _session_counts(sessions)
    ensure_server()
    with contextlib.redirect_stdout(sys.stderr):
        summary = run_model_bench(scenario, layouts, sessions=counts, seconds=seconds, backend=backend)
    typer.echo(json.dumps(summary, indent=None if as_json else 2))


def bench_throughput_cmd(
    scenario: Path = typer.Option(Path("scenarios/default.yaml"), "--scenario", "-s", help="scenario YAML"),
    sessions: str = typer.Option("1,4,16,32", help="concurrent sessions, comma-separated"),
    seconds: float = typer.Option(20.0, min=5.0, help="length of one measured window"),
    runs: int = typer.Option(3, min=1, help="measured windows per concurrency and mode (median)"),
    max_batch: int = typer.Option(16, min=2, help="decode steps a batching server runs at once"),
    backend: str = typer.Option("auto", help="auto, testbed or local"),
    as_json: bool = typer.Option(False, "--json", help="print only the JSON (progress goes to stderr)"),
) -> None:
    """Deploy the scenario's plan with batching segment servers, then the same plan with servers that
    run each step alone, and print per concurrency each one's aggregate tokens/s, TTFT and TPOT p50/p95
    and the ratio of the two, measured in the same run."""
    from flows.prefect_server import ensure_server
    from flows.throughput_bench import run_throughput_bench

    counts = _session_counts(sessions)
    ensure_server()
    with contextlib.redirect_stdout(sys.stderr):
        summary = run_throughput_bench(
            scenario, counts, seconds=seconds, runs=runs, max_batch=max_batch, backend=backend
        )
    typer.echo(json.dumps(summary, indent=None if as_json else 2))


def bench_overload_cmd(
    scenario: Path = typer.Option(Path("scenarios/default.yaml"), "--scenario", "-s", help="scenario YAML"),
    factor: float = typer.Option(4.0, min=1.0, help="users per place the admission limit allows"),
    seconds: float = typer.Option(20.0, min=5.0, help="length of one measured window"),
    runs: int = typer.Option(3, min=1, help="measured windows per phase"),
    warmup_s: float = typer.Option(
        30.0, "--warmup", min=10.0, help="seconds of two sessions generating before the limit is read"
    ),
    most_users: int = typer.Option(128, min=1, help="the most users started, whatever the limit"),
    max_batch: int = typer.Option(
        0, min=0, help="decode steps a server runs at once (0: the setting, MECSPLIT_SEGMENTS__MAX_BATCH)"
    ),
    backend: str = typer.Option("auto", help="auto, testbed or local"),
    as_json: bool = typer.Option(False, "--json", help="print only the JSON (progress goes to stderr)"),
) -> None:
    """Deploy the scenario's plan, let the serve controller learn it and set the gateway's admission
    limit (the most sessions within the SLO), then run FACTOR times that many users with the limit and
    again without it. Prints per phase the requests admitted, refused and failed, tokens/s, TTFT and TPOT
    p50/p95, the share within the SLO, goodput, hung users and each node's peak RSS."""
    from flows.overload_bench import run_overload_bench
    from flows.prefect_server import ensure_server

    ensure_server()
    with contextlib.redirect_stdout(sys.stderr):
        summary = run_overload_bench(
            scenario, factor=factor, seconds=seconds, runs=runs, warmup_s=warmup_s, most_users=most_users,
            max_batch=max_batch or None, backend=backend,
        )  # fmt: skip
    typer.echo(json.dumps(summary, indent=None if as_json else 2))


def _session_counts(sessions: str) -> list[int]:
    """``--sessions`` as counts: comma-separated integers, each at least 1."""
    try:
        counts = [int(x) for x in sessions.split(",") if x.strip()]
    except ValueError as exc:
        raise typer.BadParameter(f"--sessions takes integers: {exc}") from None
    if not counts or min(counts) < 1:
        raise typer.BadParameter("--sessions needs at least one count of 1 or more")
    return counts


def register(app: typer.Typer, bench: typer.Typer) -> None:
    del app
    bench.command("reaction")(bench_reaction_cmd)
    bench.command("controller")(bench_controller_cmd)
    bench.command("model")(bench_model_cmd)
    bench.command("throughput")(bench_throughput_cmd)
    bench.command("overload")(bench_overload_cmd)
