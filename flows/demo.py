"""The full demo behind ``make demo``.

prepare the model -> Prefect server -> testbed up (or the local backend) -> deploy flow (profile ->
optimise -> deploy) -> serve the reconfigure deployment -> generate through the gateway -> drop a link's
bandwidth -> the event triggers a reconfiguration -> keep generating -> results/<run>/ -> summary -> tear
down (the Prefect server stays up so the runs can be looked at in its UI).
"""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flows import results
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


def _wait_for_reconfigure(since_s: float, timeout_s: float) -> dict[str, Any] | None:
    """The first reconfigure flow run that started after ``since_s`` and completed; None on timeout."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterStartTime,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    deadline = time.monotonic() + timeout_s
    after = datetime.fromtimestamp(since_s, tz=UTC)
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            # Only runs started since: a server that kept many older runs would otherwise fill the page.
            runs = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=["reconfigure"])),
                flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(after_=after)),
                sort=FlowRunSort.START_TIME_DESC,
                limit=20,
            )
            for run in runs:
                if run.start_time is None or run.start_time.timestamp() < since_s or run.state is None:
                    continue
                if run.parameters.get("reason") != "mec.link.degraded":
                    continue  # a run some other event queued; the demo follows the link drop
                if run.state.is_final():
                    result = _result_of(run.state)
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


def _degrade(
    backend: BackendName, scenario: Scenario, server: PrefectServer, bw_mbit: float
) -> tuple[str, str]:
    """Drop the source's first link to ``bw_mbit``; on the testbed the daemon detects it and emits the
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
        event="mec.link.degraded",
        resource={"prefect.resource.id": f"mec.link.{link.a}-{link.b}"},
        payload={"bw_mbit": bw_mbit, "previous_bw_mbit": link.bw_mbit, "changed_at_s": changed_at_s},
    )
    return link.a, link.b


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
    serve_proc = None
    generator: ChatSession | None = None
    timeline: list[dict[str, Any]] = []
    try:
        if chosen == "testbed":
            from testbed.api import start_daemon

            say("bringing up the emulated testbed (Mininet + Docker + tc)")
            start_daemon(scenario_path, env=server.env(), progress=lambda m: say(f"testbed: {m}"))
        from flows.reconfigure import deploy_flow

        say("deploy flow: profile -> optimise -> deploy")
        first = deploy_flow(scenario=str(scenario_path), backend=chosen, model=scenario.model)
        timeline.append({"t_s": time.time(), "event": "deployed", "plan": first["plan"]})
        say(f"plan: {first['plan']}  (predicted {first['predicted_tpot_s'] * 1e3:.0f} ms/token)")
        serve_proc = serve_process(settings, server, scenario_path)
        generator = ChatSession(first["gateway_url"], max_tokens)
        generator.start()
        say(f"generating for {phase_s:.0f} s before the bandwidth drop")
        time.sleep(phase_s)
        drop_s = time.time()
        a, b = _degrade(chosen, scenario, server, degraded_bw_mbit)
        timeline.append(
            {"t_s": drop_s, "event": "link.degraded", "link": f"{a}-{b}", "bw_mbit": degraded_bw_mbit}
        )
        say(f"dropped {a}-{b} to {degraded_bw_mbit} Mbit/s; waiting for the triggered reconfiguration")
        run = _wait_for_reconfigure(drop_s - 1, reaction_timeout_s)
        if run is None:
            say("no reconfiguration finished in time (see the serve log)")
        else:
            timeline.append({"t_s": run["end_s"], "event": "reconfigured", "run": run})
            say(f"reconfigure run {run['name']}: {run['state']} after {run['end_s'] - drop_s:.1f} s")
        say(f"generating for {phase_s:.0f} s after the reconfiguration")
        time.sleep(phase_s)
        generator.stop()
        state = load_state()
        summary = results.summarise(
            scenario=scenario, backend=chosen, samples=generator.samples, errors=generator.errors,
            timeline=timeline, drop_s=drop_s, reconfigured=run, first=first,
            final_plan=None if state is None else state.plan,
        )  # fmt: skip
        reaction = ((run or {}).get("result") or {}).get("reaction")
        summary["reaction"] = None if reaction is None else reaction["steps"]
        out_dir = results.write_run(results_root, scenario_path, summary, generator.samples, timeline)
        say(f"results in {out_dir}")
        print(json.dumps(summary["headline"], indent=2))
        if summary["reaction"] is not None:
            steps = summary["reaction"]
            say("reaction, seconds per step: " + ", ".join(
                f"{k.removesuffix('_s')} {v:.2f}" for k, v in steps.items() if isinstance(v, float)
            ))  # fmt: skip
        say(f"Prefect UI: {server.ui_url} (still running; `mecsplit prefect stop` stops it)")
        return summary
    finally:
        if generator is not None:
            generator.stop()
        stop_process(serve_proc)
        teardown(chosen, scenario)
