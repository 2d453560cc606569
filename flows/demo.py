"""The full demo behind ``make demo``.

prepare the model -> Prefect server -> testbed up (or the local backend) -> deploy flow (profile ->
optimise -> deploy) -> serve the reconfigure deployment with its controller -> generate through the
gateway while the controller calibrates the cost model -> drop the source link's bandwidth -> the
controller re-plans -> keep generating -> restore the link -> the controller re-plans back -> keep
generating -> results/<run>/ -> summary (plans, per-token latency per phase, predicted against measured
per plan, reactions) -> tear down (the Prefect server stays up so the runs can be looked at in its UI).
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flows import results
from flows.predictions import clear_decision_record, clear_run_learning, load_predictions
from flows.prefect_server import PrefectServer, ensure_server
from flows.runtime import RuntimeFailure, clear_local_links, set_local_link
from flows.state import BackendName, load_state
from flows.workload import (
    ChatSession,
    choose_backend,
    prepare_model,
    say,
    serve_process,
    stop_process,
    teardown,
)
from mecsplit.settings import get_settings
from testbed.scenario import Scenario, load_scenario


def _wait_for_reconfigure(
    since_s: float, timeout_s: float, check: Callable[[], None] = lambda: None
) -> dict[str, Any] | None:
    """The first reconfigure flow run started after ``since_s`` that completed and adopted a plan (the
    controller starts one only for a plan it adopts; a triggered run may keep the plan); None on timeout.
    ``check()`` runs every second and raises when what the wait depends on has died."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterStartTime,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    check()
    deadline = time.monotonic() + timeout_s
    after = datetime.fromtimestamp(since_s, tz=UTC)
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            check()
            # Only runs started since: a server that kept many older runs would otherwise fill the page.
            runs = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=["reconfigure"])),
                flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(after_=after)),
                sort=FlowRunSort.START_TIME_ASC,
                limit=20,
            )
            for run in runs:
                if run.start_time is None or run.start_time.timestamp() < since_s or run.state is None:
                    continue
                if not run.state.is_final():
                    break  # the next adopted run cannot start before this one ends
                result = _result_of(run.state)
                if not (result or {}).get("adopted"):
                    continue
                return {"id": str(run.id), "name": run.name, "state": run.state.name,
                        "parameters": run.parameters, "result": result,
                        "start_s": run.start_time.timestamp(),
                        "created_s": run.created.timestamp() if run.created else None,
                        "end_s": run.end_time.timestamp() if run.end_time else None}  # fmt: skip
            time.sleep(1.0)
    return None


def _result_of(state: Any) -> Any:
    """The run's return value where it was persisted; None where it was not (the state file still says
    what is deployed)."""
    from prefect.exceptions import MissingResult

    if not state.is_completed():
        return None
    try:
        return state.result(raise_on_failure=False)
    except MissingResult:
        return None


def _set_source_link(
    backend: BackendName, scenario: Scenario, server: PrefectServer, bw_mbit: float
) -> tuple[str, str]:
    """Set the source's first link to ``bw_mbit``; on the testbed the daemon measures it and emits the
    event; the local backend has no daemon, so the demo emits the same event itself."""
    link = next(lk for lk in scenario.links if scenario.source in (lk.a, lk.b))
    if backend == "testbed":
        from testbed.api import TestbedClient

        with TestbedClient() as client:
            client.set_link(link.a, link.b, bw_mbit=bw_mbit)
        return link.a, link.b
    from prefect.events import emit_event

    set_local_link(get_settings(), link.a, link.b, bw_mbit)
    changed_at_s = time.time()
    os.environ.update(server.env())
    emit_event(
        event="mec.link.recovered" if bw_mbit >= link.bw_mbit else "mec.link.degraded",
        resource={"prefect.resource.id": f"mec.link.{link.a}-{link.b}"},
        payload={"bw_mbit": bw_mbit, "nominal_bw_mbit": link.bw_mbit, "changed_at_s": changed_at_s},
    )
    return link.a, link.b


def _change_and_follow(
    name: str, bw_mbit: float, chosen: BackendName, scenario: Scenario, server: PrefectServer,
    timeout_s: float, check: Callable[[], None],
) -> dict[str, Any]:  # fmt: skip
    """One change of the demo's timeline: set the source's link, wait for the reconfiguration it leads
    to, and say what happened."""
    changed_s = time.time()
    a, b = _set_source_link(chosen, scenario, server, bw_mbit)
    say(f"{name}: {a}-{b} set to {bw_mbit:g} Mbit/s; waiting for the controller's reconfiguration")
    run = _wait_for_reconfigure(changed_s - 1, timeout_s, check)
    if run is None:
        say(f"{name}: no reconfiguration adopted within {timeout_s:.0f} s (see the serve log)")
    else:
        after = (run.get("result") or {}).get("after")
        say(f"{name}: reconfigure run {run['name']} moved to {after}, {run['end_s'] - changed_s:.1f} s after")
    return {"name": name, "link": f"{a}-{b}", "bw_mbit": bw_mbit, "changed_s": changed_s, "run": run}


def _check_serve(proc: Any, log: Path) -> None:
    """The serve process must be alive: a demo whose controller died would wait out every timeout."""
    if proc is not None and proc.poll() is not None:
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise RuntimeFailure(f"`mecsplit serve` exited with {proc.returncode}; its log {log}:\n{tail}")


def run_demo(
    scenario_path: Path,
    *,
    backend: str = "auto",
    phase_s: float = 40.0,
    degraded_bw_mbit: float = 0.1,
    max_tokens: int = 16,
    reaction_timeout_s: float = 240.0,
    results_root: Path = Path("results"),
) -> dict[str, Any]:
    settings = get_settings()
    scenario = load_scenario(scenario_path)
    say(f"scenario {scenario.name}: {len(scenario.nodes)} nodes, model {scenario.model}")
    prepare_model(scenario.model, settings)
    server = ensure_server(settings)
    os.environ.update(server.env())
    say(f"Prefect API {server.api_url} (UI {server.ui_url})")
    chosen = choose_backend(backend)
    if load_state() is not None:
        raise RuntimeFailure("a deployment is already running: `mecsplit down` first")
    clear_local_links(settings)
    clear_run_learning(settings)
    clear_decision_record(settings)
    serve_proc = None
    sessions: list[ChatSession] = []
    timeline: list[dict[str, Any]] = []
    nominal = next(lk.bw_mbit for lk in scenario.links if scenario.source in (lk.a, lk.b))
    try:
        if chosen == "testbed":
            from testbed.api import start_daemon

            say("bringing up the emulated testbed (Mininet + Docker + tc)")
            start_daemon(scenario_path, env=server.env(), progress=lambda m: say(f"testbed: {m}"))
        from flows.reconfigure import deploy_flow

        say("deploy flow: profile -> optimise -> deploy")
        first = deploy_flow(scenario=str(scenario_path), backend=chosen, model=scenario.model)
        timeline.append({"t_s": time.time(), "event": "deployed", "plan": first["plan"]})
        say(
            f"plan: {first['plan']}  (predicted {first['predicted_tpot_s'] * 1e3:.0f} ms/token, uncalibrated)"
        )
        serve_proc = serve_process(settings, server, scenario_path)
        # The scenario's workload: its concurrent sessions, each streaming requests back to back.
        sessions = [
            ChatSession(first["gateway_url"], max_tokens, first_prompt=i)
            for i in range(scenario.workload.sessions)
        ]
        for session in sessions:
            session.start()
        say(f"{len(sessions)} sessions generating for {phase_s:.0f} s (the controller calibrates the model)")
        time.sleep(phase_s)
        changes = []
        serving = functools.partial(_check_serve, serve_proc, settings.run_dir / "serve.log")
        for name, bw in (("drop", degraded_bw_mbit), ("recovery", nominal)):
            serving()
            change = _change_and_follow(name, bw, chosen, scenario, server, reaction_timeout_s, serving)
            changes.append(change)
            timeline.append({"t_s": change["changed_s"], "event": f"link.{name}", "link": change["link"],
                             "bw_mbit": bw})  # fmt: skip
            if change["run"] is not None:
                timeline.append(
                    {"t_s": change["run"]["end_s"], "event": "reconfigured", "run": change["run"]}
                )
            say(f"generating for {phase_s:.0f} s")
            time.sleep(phase_s)
        for session in sessions:
            session.stop()
        samples = [x for session in sessions for x in session.samples]
        state = load_state()
        summary = results.summarise(
            scenario=scenario, backend=chosen, samples=samples,
            errors=[e for session in sessions for e in session.errors],
            timeline=timeline, changes=changes, first=first, final_plan=None if state is None else state.plan,
            predictions=load_predictions(settings),
        )  # fmt: skip
        out_dir = results.write_run(results_root, scenario_path, summary, samples, timeline)
        say(f"results in {out_dir}")
        print(json.dumps(summary["headline"], indent=2))
        for row in summary["headline"]["prediction_check"]:
            ratio = row.get("measured_over_predicted")
            say(f"prediction: {row['plan']} predicted {row['predicted_tpot_ms']} ms/token ({row['kind']}), "
                f"measured {row.get('measured_tpot_ms')} ms until {_window_end(row)}: x{ratio} "
                f"(all its steps: {row.get('measured_tpot_ms_whole')} ms)")  # fmt: skip
        for name, steps in summary["headline"]["reactions"].items():
            if steps is not None:
                say(f"reaction to the {name}, seconds per step: " + ", ".join(
                    f"{k.removesuffix('_s')} {v:.2f}" for k, v in steps.items() if isinstance(v, float)
                ))  # fmt: skip
        say(f"Prefect UI: {server.ui_url} (still running; `mecsplit prefect stop` stops it)")
        return summary
    finally:
        for session in sessions:
            session.stop()
        stop_process(serve_proc)
        teardown(chosen, scenario)


def _window_end(row: dict[str, Any]) -> str:
    """What ended a prediction's measuring window (PredictionLog)."""
    if row.get("move_started_at_s") is not None:
        return "the next move started"
    return "the network changed" if row.get("network_changed_at_s") is not None else "the end"
