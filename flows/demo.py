"""The full demo behind ``make demo``.

prepare the model -> Prefect server -> testbed up (or the local backend) -> deploy flow (profile ->
optimise -> deploy) -> serve the reconfigure deployment -> generate through the gateway -> drop a link's
bandwidth -> the event triggers a reconfiguration -> keep generating -> results/<run>/ -> summary -> tear
down (the Prefect server stays up so the runs can be looked at in its UI).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows import results
from flows.measure import StreamSample, stream_completion
from flows.prefect_server import PrefectServer, ensure_server
from flows.runtime import RuntimeFailure, backend_for, clear_local_links, set_local_link, stop_pid
from flows.state import BackendName, clear_state, load_state
from mecsplit.settings import Settings, get_settings
from testbed.scenario import Scenario, load_scenario

PROMPTS = (
    "Explain in two sentences why edge computing lowers latency.",
    "Write a short haiku about a city at night.",
    "List three uses of a bandwidth trace.",
)


def say(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


def choose_backend(requested: str) -> BackendName:
    from testbed.doctor import run_checks

    if requested in ("local", "testbed"):
        return requested  # type: ignore[return-value]
    missing = [c.name for c in run_checks() if c.required and not c.ok]
    if missing:
        say(
            f"this machine lacks {', '.join(missing)}: running the root-free local backend instead "
            "(segments as processes on loopback, links not shaped; `mecsplit testbed doctor` tells more)"
        )
        return "local"
    return "testbed"


@dataclass
class Generator:
    """Streams completions one after another through the gateway, recording every token's latency."""

    gateway_url: str
    max_tokens: int
    samples: list[StreamSample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="demo-generator", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            try:
                self.samples.append(
                    stream_completion(self.gateway_url, PROMPTS[i % len(PROMPTS)], self.max_tokens)
                )
            except Exception as exc:  # recorded and shown in the summary: a lost request is a finding
                self.errors.append(f"{time.time():.3f} {type(exc).__name__}: {exc}")
                time.sleep(0.5)
            i += 1

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=300)


def _serve_process(settings: Settings, server: PrefectServer, scenario_path: Path) -> subprocess.Popen[bytes]:
    log = (settings.run_dir / "serve.log").open("wb")
    env = {**os.environ, **server.env(), "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "mecsplit.cli", "serve", "--scenario", str(scenario_path)],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
    )  # fmt: skip


def _wait_for_reconfigure(since_s: float, timeout_s: float) -> dict[str, Any] | None:
    """The first reconfigure flow run that started after ``since_s`` and completed; None on timeout."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=["reconfigure"])),
                flow_run_filter=FlowRunFilter(),
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
    os.environ.update(server.env())
    emit_event(
        event="mec.link.degraded",
        resource={"prefect.resource.id": f"mec.link.{link.a}-{link.b}"},
        payload={"bw_mbit": bw_mbit, "previous_bw_mbit": link.bw_mbit},
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
    _prepare_model(scenario.model, settings)
    server = ensure_server(settings)
    os.environ.update(server.env())
    say(f"Prefect API {server.api_url} (UI {server.ui_url})")
    chosen = choose_backend(backend)
    if load_state() is not None:
        raise RuntimeFailure("a deployment is already running: `mecsplit down` first")
    clear_local_links(settings)
    serve_proc: subprocess.Popen[bytes] | None = None
    generator: Generator | None = None
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
        serve_proc = _serve_process(settings, server, scenario_path)
        generator = Generator(first["gateway_url"], max_tokens)
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
        out_dir = results.write_run(results_root, scenario_path, summary, generator.samples, timeline)
        say(f"results in {out_dir}")
        print(json.dumps(summary["headline"], indent=2))
        say(f"Prefect UI: {server.ui_url} (still running; `mecsplit prefect stop` stops it)")
        return summary
    finally:
        if generator is not None:
            generator.stop()
        if serve_proc is not None:
            stop_pid(serve_proc.pid)
        _teardown(chosen, scenario)


def _prepare_model(model: str, settings: Settings) -> None:
    from segments import store

    if store.is_prepared(settings.store_dir, model):
        return
    say(f"preparing {model} into the segment store (once)")
    store.prepare(model, settings.store_dir, progress=True)


def _teardown(backend: BackendName, scenario: Scenario) -> None:
    from flows import pipeline

    state = load_state()
    if state is not None:
        say("stopping segments and the gateway")
        try:
            pipeline.teardown(backend_for(state.backend, scenario), state)
        finally:
            clear_state()
    if backend == "testbed":
        from testbed.api import TestbedClient

        say("tearing the testbed down")
        with TestbedClient() as client:
            client.down()
    clear_local_links(get_settings())
    shutil.rmtree(get_settings().run_dir / "local", ignore_errors=True)
