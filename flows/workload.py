"""What the demo and the experiments share: progress output, backend choice, the model, the served
reconfigure deployment, chat sessions that stream through the gateway, and a clean teardown."""

from __future__ import annotations

import itertools
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from flows.arrivals import Request, lengths, poisson_arrivals, prompt_text, think_s
from flows.measure import StreamSample, gateway_headers, sse_chunks
from flows.prefect_server import PrefectServer
from flows.runtime import backend_for, clear_local_links, stop_local_processes
from flows.state import BackendName, clear_state, load_state
from mecsplit.process import stop_pid
from mecsplit.settings import Settings, get_settings
from testbed.scenario import Scenario, Workload


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


@dataclass(frozen=True)
class RequestRecord:
    """One chat request as its user saw it, failed or not: what it asked for and what it got."""

    started_at_s: float  # wall clock (time.time) at request start
    asked: int  # max_tokens
    ttft_s: float | None  # None: not even a first token arrived
    token_gaps_s: tuple[float, ...]  # gap before each streamed token after the first
    received: int  # tokens generated (the gateway's usage count; streamed chunks where it sent none)
    finish: str | None  # "length" or "stop" (end of sequence) when the stream ended normally
    error: str | None = None
    failed_after_s: float | None = None  # request start -> the failure, for a failed request
    refused: bool = False  # the gateway's admission control answered 429: not served, nothing lost
    retry_after_s: float | None = None  # a refusal's Retry-After: when the gateway expects a free place

    @property
    def duration_s(self) -> float:
        """From sending the request to its failure, or to its last token."""
        if self.failed_after_s is not None:
            return self.failed_after_s
        return (self.ttft_s or 0.0) + sum(self.token_gaps_s)

    @property
    def waited_before_failure_s(self) -> float:
        """How long a failed request waited after its last token (or from its start) before failing."""
        if self.failed_after_s is None:
            return 0.0
        got = (self.ttft_s or 0.0) + sum(self.token_gaps_s)
        return max(0.0, self.failed_after_s - got)

    @property
    def lost(self) -> int:
        """Tokens asked for and never delivered: none when the model ended the answer itself (``stop``)
        or admission control refused the request (it was never taken on)."""
        if self.refused or (self.error is None and self.finish == "stop"):
            return 0
        return max(0, self.asked - self.received)

    def within_slo(self, slo_ttft_s: float | None, slo_tpot_s: float | None) -> bool:
        """Served (admitted, ended normally) inside the TTFT bound and, on average, the TPOT bound."""
        if self.error is not None or self.refused or self.ttft_s is None:
            return False
        if slo_ttft_s is not None and self.ttft_s > slo_ttft_s:
            return False
        gaps = self.token_gaps_s
        return slo_tpot_s is None or not gaps or sum(gaps) / len(gaps) <= slo_tpot_s

    def sample(self) -> StreamSample | None:
        if self.ttft_s is None:
            return None
        return StreamSample(
            ttft_s=self.ttft_s, token_gaps_s=self.token_gaps_s, tokens=len(self.token_gaps_s) + 1, text="",
            started_at_s=self.started_at_s,
        )  # fmt: skip


def stream_request(
    gateway_url: str,
    prompt: str,
    max_tokens: int,
    *,
    timeout_s: float = 300.0,
    client: httpx.Client | None = None,
) -> RequestRecord:
    """One greedy streamed chat completion, recorded whatever happens (never raises): a request that fails
    midway keeps the tokens it got, so the tokens it lost can be counted. ``client``: one shared by many
    requests (a client of its own per request costs milliseconds of CPU: its TLS context)."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    started_wall = time.time()
    started = time.perf_counter()
    stamps: list[float] = []
    finish: str | None = None
    usage: int | None = None
    error: str | None = None
    failed_after_s: float | None = None
    refused = False
    retry_after_s: float | None = None
    try:
        url = f"{gateway_url}/v1/chat/completions"
        stream = httpx.stream if client is None else client.stream
        with stream("POST", url, json=body, timeout=timeout_s, headers=gateway_headers()) as resp:
            for chunk in sse_chunks(resp, gateway_url):
                if chunk.get("usage"):
                    usage = int(chunk["usage"]["completion_tokens"])
                for choice in chunk.get("choices") or ():
                    if choice["delta"].get("content"):
                        stamps.append(time.perf_counter())
                    finish = choice.get("finish_reason") or finish
        if finish is None:
            raise RuntimeError("the stream ended without a finish reason")
    except httpx.HTTPStatusError as exc:
        refused = exc.response.status_code == 429
        retry_after_s = _seconds(exc.response.headers.get("Retry-After")) if refused else None
        error = None if refused else f"{started_wall:.3f} {type(exc).__name__}: {exc}"
        failed_after_s = None if refused else time.perf_counter() - started
    except Exception as exc:  # recorded and reported: a failed request is a finding
        error = f"{started_wall:.3f} {type(exc).__name__}: {exc}"
        failed_after_s = time.perf_counter() - started
        finish = None
    return RequestRecord(
        started_at_s=started_wall, asked=max_tokens, ttft_s=stamps[0] - started if stamps else None,
        token_gaps_s=tuple(b - a for a, b in itertools.pairwise(stamps)),
        received=len(stamps) if usage is None or error is not None else usage, finish=finish, error=error,
        failed_after_s=failed_after_s, refused=refused, retry_after_s=retry_after_s,
    )  # fmt: skip


def _seconds(header: str | None) -> float | None:
    """A Retry-After given in seconds (the gateway's form; an HTTP date is not waited on)."""
    try:
        return max(0.0, float(header)) if header is not None else None
    except ValueError:
        return None


class _Recorded:
    """What every client kept of its requests."""

    records: list[RequestRecord]

    @property
    def samples(self) -> list[StreamSample]:
        return [s for r in self.records if (s := r.sample()) is not None]

    @property
    def errors(self) -> list[str]:
        return [r.error for r in self.records if r.error is not None]


@dataclass
class ChatSession(_Recorded):
    """One user: streams chat completions one after another through the gateway, recording every
    token's latency; a request that fails is recorded, never retried silently. ``stop`` lets the request
    in flight finish, so the last one is complete and none is cut short by the experiment itself."""

    gateway_url: str
    max_tokens: int
    first_prompt: int = 0
    workload: Workload | None = None  # its think time and lengths (None: back to back, PROMPTS in turn)
    records: list[RequestRecord] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mecsplit-chat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        i = self.first_prompt
        rng = random.Random(self.first_prompt)
        while not self._stop.is_set():
            words, tokens = (0, self.max_tokens) if self.workload is None else lengths(self.workload, rng)
            record = stream_request(self.gateway_url, prompt_text(words, i), tokens)
            self.records.append(record)
            self._stop.wait(self._pause_s(record, rng))
            i += 1

    def _pause_s(self, record: RequestRecord, rng: random.Random) -> float:
        """Before the next request: the user's think time; after a refusal at least the gateway's
        Retry-After (a user who comes straight back only adds to the overload), after a failure 0.5 s."""
        pause = think_s(self.workload, rng) if self.workload is not None else 0.0
        if record.refused:
            return max(pause, record.retry_after_s if record.retry_after_s is not None else 0.5)
        return max(pause, 0.5 if record.error is not None else 0.0)

    def halt(self) -> None:
        """Send no further request (the one in flight goes on); ``stop`` waits for it."""
        self._stop.set()

    def stop(self, timeout_s: float = 300.0) -> bool:
        """Stop after the request in flight; False when it has not ended within ``timeout_s``."""
        self.halt()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
        return self._thread is None or not self._thread.is_alive()


@dataclass
class OpenLoopClients(_Recorded):
    """Requests sent as they arrive (``flows.arrivals.poisson_arrivals``), whatever the service: each
    in a thread of its own, at most the workload's ``sessions`` at once; an arrival that finds that many
    in flight is counted in ``not_sent``. ``stop`` stops the arrivals and lets those in flight finish."""

    gateway_url: str
    workload: Workload
    seed: int = 0
    records: list[RequestRecord] = field(default_factory=list)
    not_sent: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _flying: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _http: httpx.Client = field(
        default_factory=lambda: httpx.Client(limits=httpx.Limits(max_connections=None))
    )

    def start(self) -> None:
        self._thread = threading.Thread(target=self._arrive, name="mecsplit-arrivals", daemon=True)
        self._thread.start()

    def _arrive(self) -> None:
        t0 = time.monotonic()
        for i, request in enumerate(poisson_arrivals(self.workload, self.seed)):
            if self._stop.wait(max(0.0, t0 + request.at_s - time.monotonic())):
                return
            self._flying = [t for t in self._flying if t.is_alive()]
            if len(self._flying) >= self.workload.sessions:
                self.not_sent += 1
                continue
            thread = threading.Thread(
                target=self._send, args=(request, i), name="mecsplit-request", daemon=True
            )
            self._flying.append(thread)
            thread.start()

    def _send(self, request: Request, index: int) -> None:
        prompt = prompt_text(request.prompt_words, index)
        record = stream_request(self.gateway_url, prompt, request.max_tokens, client=self._http)
        with self._lock:
            self.records.append(record)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        for thread in self._flying:
            thread.join(timeout=300)
        self._http.close()


Client = ChatSession | OpenLoopClients


def users(gateway_url: str, workload: Workload, seed: int = 0) -> list[Client]:
    """The clients of ``workload``: its ``sessions`` closed-loop users, or one open-loop arrival process."""
    if workload.arrivals == "poisson":
        return [OpenLoopClients(gateway_url, workload, seed=seed)]
    return [
        ChatSession(gateway_url, workload.max_new_tokens, first_prompt=seed + i, workload=workload)
        for i in range(workload.sessions)
    ]


@dataclass(frozen=True)
class BenchStart:
    """What every bench starts from: the settings, the scenario, the Prefect server and the backend."""

    settings: Settings
    scenario: Scenario
    server: PrefectServer
    backend: BackendName


def start_bench(scenario_path: Path, backend: str) -> BenchStart:
    """Prepare the model, start (or find) the Prefect server and export its address, choose the backend;
    refuse while a deployment runs (a bench deploys its own and tears it down)."""
    from flows.prefect_server import ensure_server
    from flows.runtime import RuntimeFailure
    from testbed.scenario import load_scenario

    settings = get_settings()
    scenario = load_scenario(scenario_path)
    prepare_model(scenario.model, settings)
    server = ensure_server(settings)
    os.environ.update(server.env())
    chosen = choose_backend(backend)
    if load_state() is not None:
        raise RuntimeFailure("a deployment is already running: `mecsplit down` first")
    return BenchStart(settings, scenario, server, chosen)


def testbed_up(start: BenchStart, scenario_path: Path, progress: Callable[[str], None]) -> None:
    """Bring the emulated testbed up when the bench runs on it (the local backend needs nothing)."""
    if start.backend != "testbed":
        return
    from testbed.api import start_daemon

    progress("testbed up")
    start_daemon(scenario_path, env=start.server.env(), progress=lambda m: progress(f"testbed: {m}"))


def serve_process(
    settings: Settings,
    server: PrefectServer,
    scenario_path: Path,
    log_name: str = "serve.log",
    *,
    policy: str = "latency_dp",
    failover_only: bool = False,
) -> subprocess.Popen[bytes]:
    """`mecsplit serve` in its own process (Prefect runs each triggered flow run as a subprocess of it)."""
    log = (settings.run_dir / log_name).open("wb")
    env = {**os.environ, **server.env(), "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    args = ["serve", "--scenario", str(scenario_path), "--policy", policy]
    return subprocess.Popen(
        [sys.executable, "-m", "mecsplit.cli", *args, *(["--failover-only"] if failover_only else [])],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
    )  # fmt: skip


def stop_process(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None:
        stop_pid(proc.pid, group=True)  # with the flow runs it started


def stop_deployment(scenario: Scenario) -> None:
    """Stop the deployment's segments and gateway, if one runs, and forget it."""
    from flows import pipeline

    state = load_state()
    if state is not None:
        say("stopping segments and the gateway")
        try:
            pipeline.teardown(backend_for(state.backend, scenario), state)
        finally:
            clear_state()


def teardown(backend: BackendName, scenario: Scenario) -> None:
    """Stop the deployment (segments, gateway) and, on the testbed, the emulated network."""
    stop_deployment(scenario)
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
