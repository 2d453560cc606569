"""What the demo and the experiments share: progress output, backend choice, the model, the served
reconfigure deployment, chat sessions that stream through the gateway, and a clean teardown."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from flows.measure import StreamSample, stream_completion
from flows.prefect_server import PrefectServer
from flows.runtime import backend_for, clear_local_links, stop_local_processes
from flows.state import BackendName, clear_state, load_state
from mecsplit.process import stop_pid
from mecsplit.settings import Settings, get_settings
from testbed.scenario import Scenario

PROMPTS = (
    "Explain in two sentences why edge computing lowers latency.",
    "Write a short haiku about a city at night.",
    "List three uses of a bandwidth trace.",
)


def say(message: str) -> None:
    print(f"[mecsplit {time.strftime('%H:%M:%S')}] {message}", flush=True)


def choose_backend(requested: str) -> BackendName:
    """The testbed where this machine can run it; otherwise the local backend, saying why."""
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


def prepare_model(model: str, settings: Settings) -> None:
    from segments import store

    if store.is_prepared(settings.store_dir, model):
        return
    say(f"preparing {model} into the segment store (once)")
    store.prepare(model, settings.store_dir, progress=True)


@dataclass
class ChatSession:
    """One user: streams chat completions one after another through the gateway, recording every
    token's latency; a request that fails is recorded, never retried silently."""

    gateway_url: str
    max_tokens: int
    first_prompt: int = 0
    samples: list[StreamSample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mecsplit-chat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        i = self.first_prompt
        while not self._stop.is_set():
            try:
                self.samples.append(
                    stream_completion(self.gateway_url, PROMPTS[i % len(PROMPTS)], self.max_tokens)
                )
            except Exception as exc:  # recorded and reported: a lost request is a finding
                self.errors.append(f"{time.time():.3f} {type(exc).__name__}: {exc}")
                time.sleep(0.5)
            i += 1

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=300)


def serve_process(
    settings: Settings, server: PrefectServer, scenario_path: Path, log_name: str = "serve.log"
) -> subprocess.Popen[bytes]:
    """`mecsplit serve` in its own process (Prefect runs each triggered flow run as a subprocess of it)."""
    log = (settings.run_dir / log_name).open("wb")
    env = {**os.environ, **server.env(), "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "mecsplit.cli", "serve", "--scenario", str(scenario_path)],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
    )  # fmt: skip


def stop_process(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None:
        stop_pid(proc.pid)


def teardown(backend: BackendName, scenario: Scenario) -> None:
    """Stop the deployment (segments, gateway) and, on the testbed, the emulated network."""
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
        from testbed.errors import TestbedNotRunningError

        say("tearing the testbed down")
        try:
            with TestbedClient() as client:
                client.down()
        except TestbedNotRunningError:
            pass
    clear_local_links(get_settings())
    stop_local_processes(get_settings())
    shutil.rmtree(get_settings().run_dir / "local", ignore_errors=True)
