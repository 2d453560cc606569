"""Soak under fire: many HTTP clients, some hostile, while segment servers are SIGKILLed and replaced.

``run_soak_bench`` starts real processes on loopback, as a deployment runs them: a chain of K segment
servers over mutual TLS (``LocalChain(tls=True)``), the gateway as its own process (``segments.gatewayd``,
identity ``gateway``, an API key on ``/v1`` and an admin token on ``/admin``), and one warm spare server per
killable range. For ``minutes``, ``clients`` concurrent HTTP clients call the gateway:

* well-behaved clients send greedy completions and chat completions, streamed and not, with fixed
  prompts; each answer is compared exactly with what the whole model gives (``segments.reference``: the
  token ids, turned into text the way the gateway streams it);
* misbehaving clients (a seeded random share of them) leave mid-stream or mid-request, send malformed
  JSON, hostile parameters (token ids outside the vocabulary, ``max_tokens`` beyond the context, unsupported
  parameters, wrong types), oversized bodies, no API key, or try the admin routes: each must get a 4xx.

Meanwhile ``kills`` servers are SIGKILLed, evenly spread over the run, alternating between the first and
the last hop; each is replaced the way the reconfigure flow does it: a warm spare with the same range
goes into the chain through ``POST /admin/chain`` (mode ``replay``: the dead hop's KV is gone, the gateway
rebuilds every live session from its token history), and a new spare starts in the background. The middle
hop is never killed: it lives through the whole run, so its RSS and session count at the end say whether a
server leaks under the failures of its neighbours (its upstream dies, its next hop dies).

At the end every hop must hold no session and the gateway no live request (within ``grace_s``), and the
RSS of the processes that lived through the run (gateway, middle hop) must not grow past
``RSS_GROWTH_LIMIT`` of what they held once the load had run for a while. The result is one JSON-able dict
with a verdict per goal.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import random
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from segments.auth import Credentials, create_secret
from segments.client import Chain, Hop, control_once
from segments.launch import LocalChain, _die_with_parent
from segments.pki import GATEWAY
from segments.spec import SegmentSpec, split_evenly

DEFAULT_MODEL = "llama-tiny"
PROMPTS = (
    "Edge nodes come and go",
    "The gateway keeps every session",
    "Bandwidth traces show",
    "Segments migrate between nodes when",
)
# The tokens each well-behaved request asks for, by prompt: different lengths so that requests end at
# different times and kills fall at every stage of a generation.
MAX_TOKENS = (12, 20, 28, 36)
WELL_BEHAVED = ("stream", "plain", "chat_stream", "chat_plain")
MISBEHAVING = (
    "disconnect_stream", "disconnect_plain", "malformed_json", "not_an_object", "oov_token_ids",
    "huge_max_tokens", "beyond_context", "unsupported_param", "wrong_types", "bad_messages",
    "unknown_model", "no_api_key", "admin_without_token", "oversized_body",
)  # fmt: skip
# Oversized bodies are drawn a quarter as often as the rest: each costs the gateway a parse of megabytes.
MISBEHAVING_WEIGHTS = tuple(0.25 if kind == "oversized_body" else 1.0 for kind in MISBEHAVING)
# A body this large is refused or fails validation; it must never cost more than a 4xx.
OVERSIZED_BODY_BYTES = 8 * 1024 * 1024
# Growth allowed to a process that lives through the run, against its RSS once the load had run for a
# while (the allocator's first growth under 64 clients is not a leak).
RSS_GROWTH_LIMIT = 0.10
# Warm spares kept per killable range, and threads starting new ones: a kill takes a spare and starts
# another, and a kill that finds none waits (``spare_wait_s``), which delays the kills behind it.
SPARES_PER_RANGE = 2
STARTERS = 2
# A well-behaved request's client waits this long: recovery from a kill takes seconds, not minutes.
REQUEST_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class SoakConfig:
    model: str = DEFAULT_MODEL
    minutes: float = 10.0
    clients: int = 64
    kills: int = 50
    seed: int = 0
    segments: int = 3
    misbehaving_share: float = 0.25  # of the clients
    grace_s: float = 30.0  # for session counts to reach zero once the clients stop
    threads: int = 1  # torch threads per segment server

    def __post_init__(self) -> None:
        if self.minutes <= 0 or self.clients < 1 or self.kills < 0:
            raise ValueError("need minutes > 0, clients >= 1 and kills >= 0")
        if self.segments < 3:
            raise ValueError("the soak needs 3 or more segments: a middle hop that lives through the run")
        if not 0.0 <= self.misbehaving_share <= 1.0:
            raise ValueError(f"misbehaving_share must lie in [0, 1], got {self.misbehaving_share}")


@dataclass(frozen=True)
class Expected:
    """What a well-behaved request must get: the text after each generated token, as the gateway streams
    it (an incomplete UTF-8 sequence is held back), and how the generation ends."""

    kind: str  # "completion" or "chat"
    prompt: str
    max_tokens: int
    token_ids: tuple[int, ...]
    visible: tuple[str, ...]  # visible[k]: the text the client holds after k tokens
    finish_reason: str

    @property
    def text(self) -> str:
        return self.visible[-1]

    def tokens_delivered(self, received: str) -> int:
        """How many of the expected tokens ``received`` carries correctly (the longest prefix whose text
        it starts with)."""
        return max(k for k, text in enumerate(self.visible) if received.startswith(text))


@dataclass(frozen=True)
class Outcome:
    kind: str
    status: int | None  # None: no HTTP status (the client left, or the connection failed)
    error: str | None = None  # a transport error, an error event inside a stream, a malformed answer
    expected_tokens: int = 0
    delivered_tokens: int = 0
    exact: bool = False
    latency_s: float = 0.0


@dataclass(frozen=True)
class Replacement:
    at_s: float  # since the load started
    hop: int
    killed_pid: int
    new_pid: int
    spare_wait_s: float  # waiting for the spare to be ready before the kill (0 when it was warm)
    replace_s: float  # SIGKILL -> the gateway's switch to the new chain answered
    switch: dict[str, Any]  # the gateway's switch report
    attempts: int


@dataclass
class Tally:
    """Everything the run counts, filled by the clients and the killer."""

    outcomes: list[Outcome] = field(default_factory=list)
    replacements: list[Replacement] = field(default_factory=list)
    switch_errors: list[str] = field(default_factory=list)
    rss_samples: list[dict[str, Any]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ expected


def _visible_texts(tokenizer: Any, ids: list[int]) -> tuple[str, ...]:
    """The text a client holds after each token, by the gateway's streaming rule (``Gateway.stream``)."""
    visible, sent = [""], ""
    for k in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:k], skip_special_tokens=True)
        if not text.endswith("\ufffd") and len(text) > len(sent):
            sent = text
        visible.append(sent)
    return tuple(visible)


def expected_answers(store_dir: Path, model: str) -> dict[str, list[Expected]]:
    """The whole model's greedy answers (``ReferenceModel``, one process) for every well-behaved request,
    by kind; the gateway stops at the tokenizer's end-of-sequence token and leaves it out."""
    import torch

    from segments.gateway import chat_ids
    from segments.reference import ReferenceModel, greedy_generate
    from segments.store import load_tokenizer

    # The servers compute with one thread; reductions split over more threads sum in another order.
    torch.set_num_threads(1)
    tokenizer = load_tokenizer(store_dir, model)
    reference = ReferenceModel(store_dir, model)
    eos = tokenizer.eos_token_id
    answers: dict[str, list[Expected]] = {"completion": [], "chat": []}
    for index, (prompt, max_tokens) in enumerate(zip(PROMPTS, MAX_TOKENS, strict=True)):
        for kind in answers:
            if kind == "chat":
                ids = chat_ids(tokenizer, [{"role": "user", "content": prompt}])
            else:
                ids = [int(i) for i in tokenizer.encode(prompt)]
            session = f"expected-{kind}-{index}"
            out, _ = greedy_generate(reference.forward, session, torch.tensor([ids]), max_tokens)
            reference.drop_session(session)
            tokens = [int(t) for t in out[0]]
            finish = "length"
            if eos is not None and eos in tokens:
                tokens, finish = tokens[: tokens.index(eos)], "stop"
            answers[kind].append(
                Expected(kind, prompt, max_tokens, tuple(tokens), _visible_texts(tokenizer, tokens), finish)
            )
    return answers


# ------------------------------------------------------------------------------------------ processes


class Fleet:
    """Every process this bench starts, by PID, from starter threads that live as long as the run."""

    def __init__(self, store_dir: Path, secret_file: Path, model: str, threads: int, idle_s: float) -> None:
        self.store_dir = store_dir
        self.secret_file = secret_file
        self.model = model
        self.threads = threads
        self.idle_s = idle_s
        self.groups: list[LocalChain] = []
        self.gateway: subprocess.Popen[bytes] | None = None
        # Starter threads live as long as the run (a child gets SIGTERM when the thread that started it
        # ends). Two of them: on two busy cores one server start takes ~20 s, more than the 12 s between
        # kills, and the starts are mostly waiting for CPU, so two in parallel nearly double the rate.
        self.pool = ThreadPoolExecutor(max_workers=STARTERS, thread_name_prefix="soak-fleet")

    def _start(self, specs: tuple[SegmentSpec, ...]) -> LocalChain:
        group = LocalChain(
            self.store_dir, specs, secret_file=self.secret_file, threads=self.threads, tls=True,
            session_idle_s=self.idle_s,
        )  # fmt: skip
        self.groups.append(group)  # before start: a start cut short still gets stopped
        return group.start()

    def start(self, specs: tuple[SegmentSpec, ...]) -> Future[LocalChain]:
        return self.pool.submit(self._start, specs)

    def spare(self, spec: SegmentSpec) -> Future[Hop]:
        """A server for ``spec`` started in the background: the replacement for the next kill."""
        return self.pool.submit(lambda: self._start((spec,)).hops[0])

    def pid_of(self, hop: Hop) -> int:
        """The running server on ``hop``'s port. A new server may get the port of one killed earlier (port
        0 picks any free one): matching by port alone once SIGKILLed a dead server's zombie instead."""
        return next(
            proc.pid
            for group in reversed(self.groups)
            for proc, port in zip(group.processes, group.ports, strict=False)
            if port == hop.port and proc.poll() is None
        )

    def start_gateway(
        self, chain: Chain, credentials: Credentials, admin_token_file: Path, api_key: str
    ) -> int:
        return self.pool.submit(self._start_gateway, chain, credentials, admin_token_file, api_key).result()

    def _start_gateway(
        self, chain: Chain, credentials: Credentials, admin_token_file: Path, api_key: str
    ) -> int:
        """``segments.gatewayd`` as deployments run it; returns its HTTP port."""
        assert credentials.tls_dir is not None
        cmd = [
            sys.executable, "-m", "segments.gatewayd", "--store", str(self.store_dir), "--model", self.model,
            "--chain-json", json.dumps(chain.to_dict()), "--port", "0", "--tls-dir", str(credentials.tls_dir),
            "--admin-token-file", str(admin_token_file),
        ]  # fmt: skip
        env = {**os.environ, "MECSPLIT_SEGMENTS__API_KEY": api_key}
        self.gateway = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env, preexec_fn=_die_with_parent
        )
        assert self.gateway.stdout is not None
        line = self.gateway.stdout.readline()
        ready = json.loads(line) if line.strip() else {"ready": False, "error": "no ready line"}
        if not ready.get("ready"):
            raise RuntimeError(f"the gateway did not start: {ready.get('error')}")
        return int(ready["port"])

    def close(self) -> list[int]:
        """Stop the gateway, then every server (SIGTERM, SIGKILL after a grace); waits for a start under
        way, so that nothing it launches outlives this. Returns the PIDs of every process it started."""
        if self.gateway is not None and self.gateway.poll() is None:
            self.gateway.send_signal(signal.SIGTERM)
        self.pool.shutdown(wait=True, cancel_futures=True)
        if self.gateway is not None:
            if self.gateway.poll() is None:
                self.gateway.send_signal(signal.SIGTERM)
            try:
                self.gateway.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.gateway.kill()
                self.gateway.wait()
            if self.gateway.stdout is not None:
                self.gateway.stdout.close()
        pids = [self.gateway.pid] if self.gateway is not None else []
        for group in self.groups:
            pids += group.pids
            group.stop()
        return pids


def rss_bytes_of(pid: int) -> int | None:
    """Resident set size from /proc (None once the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


# --------------------------------------------------------------------------------------------- clients


@dataclass(frozen=True)
class Gate:
    """How to reach the gateway."""

    base_url: str
    api_key: str
    admin_token: str

    def v1(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}


def _request_body(expected: Expected, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"max_tokens": expected.max_tokens, "temperature": 0, "stream": stream}
    if expected.kind == "chat":
        body["messages"] = [{"role": "user", "content": expected.prompt}]
    else:
        body["prompt"] = expected.prompt
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def _path(expected: Expected) -> str:
    return "/v1/chat/completions" if expected.kind == "chat" else "/v1/completions"


async def _read_stream(
    response: httpx.Response, chat: bool
) -> tuple[str, str | None, int | None, str | None]:
    """(text, finish reason, completion tokens from usage, error) of an SSE answer."""
    text, finish, usage, error, done = "", None, None, None, False
    async for line in response.aiter_lines():
        if not line.startswith("data: "):
            continue
        data = line[len("data: ") :]
        if data == "[DONE]":
            done = True
            break
        chunk = json.loads(data)
        if "error" in chunk:
            error = f"error event: {chunk['error'].get('message')}"
            continue
        if chunk.get("usage"):
            usage = int(chunk["usage"]["completion_tokens"])
        for choice in chunk.get("choices", []):
            piece = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
            text += piece or ""
            finish = choice.get("finish_reason") or finish
    if not done and error is None:
        error = "the stream ended without [DONE]"
    return text, finish, usage, error


async def well_behaved(http: httpx.AsyncClient, gate: Gate, kind: str, expected: Expected) -> Outcome:
    stream = kind.endswith("stream")
    chat = expected.kind == "chat"
    body = _request_body(expected, stream)
    t0 = time.perf_counter()
    want = len(expected.token_ids)
    text, finish, usage, error, status = "", None, None, None, None
    try:
        if stream:
            async with http.stream(
                "POST",
                gate.base_url + _path(expected),
                json=body,
                headers=gate.v1(),
                timeout=REQUEST_TIMEOUT_S,
            ) as response:
                status = response.status_code
                if status == 200:
                    text, finish, usage, error = await _read_stream(response, chat)
                else:
                    error = f"HTTP {status}: {(await response.aread())[:300].decode(errors='replace')}"
        else:
            response = await http.post(
                gate.base_url + _path(expected), json=body, headers=gate.v1(), timeout=REQUEST_TIMEOUT_S
            )
            status = response.status_code
            if status != 200:
                error = f"HTTP {status}: {response.text[:300]}"
            else:
                answer = response.json()
                choice = answer["choices"][0]
                text = choice["message"]["content"] if chat else choice["text"]
                finish, usage = choice["finish_reason"], int(answer["usage"]["completion_tokens"])
    except (httpx.HTTPError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    if status is not None and status != 200 and error is None:
        error = f"HTTP {status}"
    delivered = expected.tokens_delivered(text)
    exact = (
        status == 200 and error is None and text == expected.text and finish == expected.finish_reason
        and usage == want
    )  # fmt: skip
    if status == 200 and error is None and not exact:
        error = f"mismatch: got {text!r} ({usage} tokens, {finish}), want {expected.text!r} ({want}, "
        error += f"{expected.finish_reason})"
    return Outcome(kind, status, error, want, delivered, exact, time.perf_counter() - t0)


@functools.cache
def _oversized_body() -> bytes:
    """A prompt of token ids that fills the body: valid JSON, refused as beyond the context."""
    return b'{"prompt": [' + b"5, " * (OVERSIZED_BODY_BYTES // 3) + b'5], "max_tokens": 4}'


def _hostile_request(kind: str, vocab_size: int, context_tokens: int) -> tuple[str, dict[str, Any]]:
    """(path, httpx keyword arguments) of a request that must be refused with a 4xx."""
    content_type = {"content-type": "application/json"}
    bodies: dict[str, dict[str, Any]] = {
        "malformed_json": {"content": b'{"prompt": "Edge nodes", "max_tokens": ', "headers": content_type},
        "not_an_object": {"content": b'["Edge nodes", 4]', "headers": content_type},
        "oov_token_ids": {"json": {"prompt": [5, vocab_size + 7], "max_tokens": 4}},
        "huge_max_tokens": {"json": {"prompt": "Edge nodes", "max_tokens": 10**9}},
        "beyond_context": {"json": {"prompt": [5] * (context_tokens - 4), "max_tokens": 64}},
        "unsupported_param": {"json": {"prompt": "Edge nodes", "max_tokens": 4, "logprobs": 5, "n": 3}},
        "wrong_types": {"json": {"prompt": {"text": "Edge"}, "max_tokens": "16", "temperature": "hot"}},
        "unknown_model": {"json": {"model": "no-such-model", "prompt": "Edge nodes", "max_tokens": 4}},
        "no_api_key": {"json": {"prompt": "Edge nodes", "max_tokens": 4}, "headers": {}},
        "oversized_body": {"content": _oversized_body(), "headers": content_type},
    }
    if kind == "bad_messages":
        return "/v1/chat/completions", {"json": {"messages": "hello", "max_tokens": 4}}
    if kind == "admin_without_token":
        return "/admin/chain", {"json": {"chain": {"model": "x", "hops": []}, "mode": "replay"}}
    return "/v1/completions", bodies[kind]


async def misbehaving(
    http: httpx.AsyncClient, gate: Gate, kind: str, rng: random.Random, vocab_size: int, context_tokens: int
) -> Outcome:
    t0 = time.perf_counter()
    long_body = {"prompt": "Edge nodes", "max_tokens": 400, "temperature": 0}
    try:
        if kind == "disconnect_stream":
            # Read a few chunks, then leave: the gateway must end the generation and free the session.
            async with http.stream(
                "POST", gate.base_url + "/v1/completions", json={**long_body, "stream": True},
                headers=gate.v1(), timeout=REQUEST_TIMEOUT_S,
            ) as response:  # fmt: skip
                chunks = rng.randint(1, 6)
                async for _ in response.aiter_lines():
                    chunks -= 1
                    if chunks <= 0:
                        break
                return Outcome(kind, response.status_code, latency_s=time.perf_counter() - t0)
        if kind == "disconnect_plain":
            # Give up on a plain request before it can finish: the gateway notices between two tokens.
            with contextlib.suppress(httpx.TimeoutException):
                await http.post(
                    gate.base_url + "/v1/completions", json=long_body, headers=gate.v1(),
                    timeout=rng.uniform(0.05, 0.5),
                )  # fmt: skip
            return Outcome(kind, None, latency_s=time.perf_counter() - t0)
        path, request = _hostile_request(kind, vocab_size, context_tokens)
        headers = {**(gate.v1() if kind != "no_api_key" else {}), **request.pop("headers", {})}
        response = await http.post(
            gate.base_url + path, headers=headers, timeout=REQUEST_TIMEOUT_S, **request
        )
        error = None if 400 <= response.status_code < 500 else f"HTTP {response.status_code}: {response.text}"
        return Outcome(kind, response.status_code, error, latency_s=time.perf_counter() - t0)
    except httpx.HTTPError as exc:
        return Outcome(kind, None, f"{type(exc).__name__}: {exc}", latency_s=time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------- killer


async def _switch(
    http: httpx.AsyncClient, gate: Gate, chain: Chain, tally: Tally
) -> tuple[dict[str, Any], int]:
    """POST the new chain (replay) until the gateway takes it; a refusal is recorded and retried."""
    for attempt in range(1, 11):
        try:
            response = await http.post(
                gate.base_url + "/admin/chain", json={"chain": chain.to_dict(), "mode": "replay"},
                headers=gate.admin(), timeout=REQUEST_TIMEOUT_S,
            )  # fmt: skip
            if response.status_code == 200:
                return response.json(), attempt
            tally.switch_errors.append(f"HTTP {response.status_code}: {response.text[:300]}")
        except httpx.HTTPError as exc:
            tally.switch_errors.append(f"{type(exc).__name__}: {exc}")
        await asyncio.sleep(0.5)
    raise RuntimeError(f"the gateway refused the replacement chain 10 times: {tally.switch_errors[-3:]}")


class Killer:
    """SIGKILLs a server of the chain at fixed times and puts a warm spare with its range in its place."""

    def __init__(self, fleet: Fleet, chain: Chain, spares: dict[int, list[Hop]]) -> None:
        """``spares``: warm servers per killable hop index, with that hop's range."""
        self.fleet = fleet
        self.chain = chain
        self.killable = tuple(sorted(spares))
        self.spares: dict[int, list[Future[Hop]]] = {index: [] for index in spares}
        for index, hops in spares.items():
            for hop in hops:
                ready: Future[Hop] = Future()
                ready.set_result(hop)
                self.spares[index].append(ready)

    def _spec(self, hop: int) -> SegmentSpec:
        h = self.chain.hops[hop]
        return SegmentSpec(self.chain.model, h.first, h.end)

    async def run(
        self, http: httpx.AsyncClient, gate: Gate, kills: int, duration_s: float, t_start: float,
        tally: Tally, progress: Callable[[str], None],
    ) -> None:  # fmt: skip
        for i in range(kills):
            at = t_start + (i + 0.5) * duration_s / kills
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            hop = self.killable[i % len(self.killable)]
            t_wait = time.monotonic()
            spare = await asyncio.wrap_future(self.spares[hop].pop(0))
            spare_wait_s = time.monotonic() - t_wait
            victim = self.fleet.pid_of(self.chain.hops[hop])
            os.kill(victim, signal.SIGKILL)  # a server this bench started, by PID
            t_kill = time.monotonic()
            self.spares[hop].append(self.fleet.spare(self._spec(hop)))
            hops = list(self.chain.hops)
            hops[hop] = spare
            new_chain = Chain(self.chain.model, tuple(hops))
            try:
                report, attempts = await _switch(http, gate, new_chain, tally)
            except RuntimeError as exc:  # the gateway will not take a chain: no use killing more
                progress(f"kill {i + 1}/{kills}: {exc}; no more kills")
                return
            self.chain = new_chain
            replacement = Replacement(
                at_s=round(t_kill - t_start, 3), hop=hop, killed_pid=victim, new_pid=self.fleet.pid_of(spare),
                spare_wait_s=round(spare_wait_s, 3), replace_s=round(time.monotonic() - t_kill, 4),
                switch=report, attempts=attempts,
            )  # fmt: skip
            tally.replacements.append(replacement)
            progress(
                f"kill {i + 1}/{kills}: hop {hop} pid {victim} -> pid {replacement.new_pid}, replaced in "
                f"{replacement.replace_s:.2f} s ({report.get('sessions')} sessions replayed)"
            )


# ------------------------------------------------------------------------------------------------- run


async def _client(
    index: int, bad: bool, http: httpx.AsyncClient, gate: Gate, answers: dict[str, list[Expected]],
    deadline: float, seed: int, tally: Tally, limits: tuple[int, int],
) -> None:  # fmt: skip
    rng = random.Random(seed * 1_000_003 + index)
    while time.monotonic() < deadline:
        if bad:
            kind = rng.choices(MISBEHAVING, weights=MISBEHAVING_WEIGHTS)[0]
            tally.outcomes.append(await misbehaving(http, gate, kind, rng, *limits))
            await asyncio.sleep(rng.uniform(0.5, 2.0))  # hostile requests are cheap; keep them a share
        else:
            kind = rng.choice(WELL_BEHAVED)
            expected = rng.choice(answers["chat" if kind.startswith("chat") else "completion"])
            tally.outcomes.append(await well_behaved(http, gate, kind, expected))
            await asyncio.sleep(rng.uniform(0.0, 0.3))


async def _gateway_view(http: httpx.AsyncClient, gate: Gate) -> dict[str, Any]:
    response = await http.get(gate.base_url + "/admin/chain", headers=gate.admin(), timeout=30)
    response.raise_for_status()
    return response.json()


async def _hop_sessions(chain: Chain, auth: Credentials) -> list[dict[str, Any]]:
    """Each hop's sessions (the ``sessions`` op, the orchestrator's) and its ``stats`` count."""
    out = []
    for index, hop in enumerate(chain.hops):
        listed = await control_once(hop.host, hop.port, auth, "sessions", 10.0)
        stats = await control_once(hop.host, hop.port, auth, "stats", 10.0)
        out.append({
            "hop": index, "range": [hop.first, hop.end], "pid": stats["pid"],
            "sessions": len(listed["sessions"]), "stats_sessions": stats["sessions"],
            "kv_bytes": stats["kv_bytes"],
        })  # fmt: skip
    return out


async def _settle(
    http: httpx.AsyncClient, gate: Gate, chain: Chain, auth: Credentials, grace_s: float
) -> tuple[int, list[dict[str, Any]], float]:
    """Wait (up to ``grace_s``) for the gateway and every hop to hold no session; the last reading."""
    t0 = time.monotonic()
    while True:
        live = int((await _gateway_view(http, gate))["live_sessions"])
        hops = await _hop_sessions(chain, auth)
        clear = live == 0 and all(h["sessions"] == 0 and h["stats_sessions"] == 0 for h in hops)
        if clear or time.monotonic() - t0 > grace_s:
            return live, hops, time.monotonic() - t0
        await asyncio.sleep(0.5)


async def _sample_rss(
    pids: dict[str, int], t_start: float, deadline: float, tally: Tally, progress: Callable[[str], None],
    every_s: float,
) -> None:  # fmt: skip
    """RSS of the long-lived processes every ``every_s``, with a progress line."""
    while time.monotonic() < deadline:
        await asyncio.sleep(min(every_s, max(0.0, deadline - time.monotonic())))
        sample = {"t_s": round(time.monotonic() - t_start, 1)}
        sample.update({name: rss_bytes_of(pid) for name, pid in pids.items()})
        tally.rss_samples.append(sample)
        counts = Counter("exact" if o.exact else ("4xx" if o.status and 400 <= o.status < 500 else "other")
                         for o in tally.outcomes)  # fmt: skip
        progress(
            f"[{sample['t_s']:.0f} s] requests {len(tally.outcomes)} ({dict(counts)}), "
            f"kills {len(tally.replacements)}, RSS MB "
            + ", ".join(f"{k} {v / 2**20:.0f}" for k, v in sample.items() if k != "t_s" and v)
        )


async def _soak(
    config: SoakConfig, killer: Killer, gate: Gate, answers: dict[str, list[Expected]],
    auth: Credentials, limits: tuple[int, int], long_lived: dict[str, int], tally: Tally,
    progress: Callable[[str], None],
) -> dict[str, Any]:  # fmt: skip
    duration_s = config.minutes * 60
    rng = random.Random(config.seed)
    n_bad = round(config.misbehaving_share * config.clients)
    if config.misbehaving_share > 0 and config.clients > 1:
        n_bad = max(1, n_bad)
    bad = set(rng.sample(range(config.clients), n_bad))
    limits_http = httpx.Limits(max_connections=config.clients + 16, max_keepalive_connections=config.clients)
    async with httpx.AsyncClient(limits=limits_http) as http:
        undisturbed = [
            await well_behaved(http, gate, kind, answers[kind_of][0])
            for kind, kind_of in (("plain", "completion"), ("chat_plain", "chat"))
        ]
        start_rss = {name: rss_bytes_of(pid) for name, pid in long_lived.items()}
        t_start = time.monotonic()
        deadline = t_start + duration_s
        progress(
            f"load: {config.clients} clients ({n_bad} misbehaving), {config.kills} kills, {duration_s:.0f} s"
        )
        clients = [
            asyncio.create_task(
                _client(i, i in bad, http, gate, answers, deadline, config.seed, tally, limits)
            )
            for i in range(config.clients)
        ]
        killing = asyncio.create_task(
            killer.run(http, gate, config.kills, duration_s, t_start, tally, progress)
        )
        sampling = asyncio.create_task(
            _sample_rss(long_lived, t_start, deadline, tally, progress, max(2.0, min(30.0, duration_s / 20)))
        )
        try:
            await killing  # behind schedule it may kill after the clients stopped: counted apart
            await asyncio.gather(*clients)
            await sampling
        finally:
            for task in (*clients, killing, sampling):
                task.cancel()
            await asyncio.gather(*clients, killing, sampling, return_exceptions=True)
        load_s = time.monotonic() - t_start
        live, hops, settle_s = await _settle(http, gate, killer.chain, auth, config.grace_s)
        view = await _gateway_view(http, gate)
    end_rss = {name: rss_bytes_of(pid) for name, pid in long_lived.items()}
    return {
        "undisturbed": undisturbed, "start_rss": start_rss, "end_rss": end_rss, "load_s": load_s,
        "live_sessions": live, "hops": hops, "settle_s": settle_s, "recoveries": view["recoveries"],
        "recovered_steps": view["recovered_steps"], "recovery_max_s": view["recovery_max_s"],
        "bad_clients": len(bad),
    }  # fmt: skip


def run_soak_bench(
    store_dir: Path, config: SoakConfig, progress: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run the soak (see the module's doc) and return its figures and verdict."""
    from segments.store import load_config, read_manifest

    t0 = time.monotonic()
    manifest = read_manifest(store_dir, config.model)
    model_config = load_config(store_dir, manifest)
    context = getattr(model_config, "max_position_embeddings", None) or model_config.n_positions
    limits = (manifest.info.vocab_size, int(context))
    specs = split_evenly(config.model, manifest.info.num_layers, config.segments)
    middle = config.segments // 2
    killable = tuple(i for i in range(config.segments) if i != middle)
    tally = Tally()
    with tempfile.TemporaryDirectory(prefix="mecsplit-soak-") as tmp:
        secret_file = create_secret(Path(tmp) / "secret")
        token_file = Path(tmp) / "admin-token"
        admin_token = secrets.token_urlsafe(24)
        token_file.write_text(admin_token)
        token_file.chmod(0o600)
        # Sessions idle longer than the run are the only ones a server may evict by itself: a leaked
        # session must still be there at the end, where the bench counts it.
        idle_s = config.minutes * 60 + 10 * config.grace_s + 600
        fleet = Fleet(store_dir, secret_file, config.model, config.threads, idle_s)
        try:
            n_spares = SPARES_PER_RANGE * len(killable)
            progress(f"starting {config.segments} segment servers (TLS), {n_spares} spares, the gateway")
            # The chain and its first spares in one launch, so that they load in parallel; the reference
            # answers are computed meanwhile.
            group = fleet.start(specs + tuple(specs[i] for i in killable for _ in range(SPARES_PER_RANGE)))
            progress(f"reference answers for {config.model} ...")
            answers = expected_answers(store_dir, config.model)
            first = group.result()
            chain = Chain(config.model, first.hops[: config.segments])
            auth = first.auth()
            assert isinstance(auth, Credentials)
            gateway_credentials = first.auth(GATEWAY)
            assert isinstance(gateway_credentials, Credentials)
            api_key = secrets.token_urlsafe(24)
            port = fleet.start_gateway(chain, gateway_credentials, token_file, api_key)
            assert fleet.gateway is not None
            spare_hops = iter(first.hops[config.segments :])
            spares = {i: [next(spare_hops) for _ in range(SPARES_PER_RANGE)] for i in killable}
            killer = Killer(fleet, chain, spares)
            gate = Gate(f"http://127.0.0.1:{port}", api_key, admin_token)
            long_lived = {"gateway": fleet.gateway.pid, f"hop{middle}": first.pids[middle]}
            initial_rss = {
                f"hop{i}": rss_bytes_of(pid) for i, pid in enumerate(first.pids[: config.segments])
            }
            progress(f"ready after {time.monotonic() - t0:.1f} s")
            run = asyncio.run(_soak(config, killer, gate, answers, auth, limits, long_lived, tally, progress))
            final_rss = {f"hop{i}": rss_bytes_of(fleet.pid_of(h)) for i, h in enumerate(killer.chain.hops)}
        finally:
            pids = fleet.close()
    result = _summary(config, tally, run, initial_rss, final_rss, time.monotonic() - t0)
    return {**result, "pids_started": pids}


# ------------------------------------------------------------------------------------------- summary


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 4) if values else None


def _summary(
    config: SoakConfig, tally: Tally, run: dict[str, Any], initial_rss: dict[str, int | None],
    final_rss: dict[str, int | None], wall_s: float,
) -> dict[str, Any]:  # fmt: skip
    good = [o for o in tally.outcomes if o.kind in WELL_BEHAVED]
    bad = [o for o in tally.outcomes if o.kind in MISBEHAVING]
    refused = [o for o in bad if not o.kind.startswith("disconnect_")]
    statuses = Counter(str(o.status) if o.status is not None else "none" for o in tally.outcomes)
    good_5xx = sum(1 for o in good if o.status is not None and o.status >= 500)
    bad_5xx = sum(1 for o in bad if o.status is not None and o.status >= 500)
    tokens_lost = sum(o.expected_tokens - o.delivered_tokens for o in good if not o.exact)
    mismatched = sum(1 for o in good if o.error is not None and o.error.startswith("mismatch"))
    # Completed: a whole answer came back (right or wrong); the rest failed or broke off.
    completed = sum(1 for o in good if o.exact or (o.error or "").startswith("mismatch"))
    other_errors = [o.error for o in good if o.error is not None and not o.error.startswith("mismatch")]
    # Samples taken once the load had run for a tenth of the time: the baseline of "flat".
    samples = tally.rss_samples
    loaded = next((s for s in samples if s["t_s"] >= config.minutes * 6), samples[0] if samples else None)
    rss: dict[str, Any] = {}
    for name in run["start_rss"]:
        base = loaded.get(name) if loaded else None
        end = run["end_rss"].get(name)
        rss[name] = {
            "start_bytes": run["start_rss"][name], "loaded_bytes": base, "end_bytes": end,
            "growth_vs_loaded": round(end / base - 1, 4) if end and base else None,
        }  # fmt: skip
    replace_s = [r.replace_s for r in tally.replacements]
    recoveries = [float(r["recovery_s"]) for r in run["recoveries"]]
    verdict = {
        "every_well_behaved_request_exact": bool(good) and all(o.exact for o in good),
        "tokens_lost_zero": tokens_lost == 0,
        "no_5xx_for_valid_requests": good_5xx == 0 and not other_errors,
        "misbehaving_requests_all_4xx": all(o.status is not None and 400 <= o.status < 500 for o in refused),
        "undisturbed_run_exact": all(o.exact for o in run["undisturbed"]),
        # Kills the killer made after the clients stopped (waiting for spares) hit no traffic.
        "kills_done": len(tally.replacements) == config.kills
        and all(r.at_s < config.minutes * 60 for r in tally.replacements),
        "sessions_zero_at_end": run["live_sessions"] == 0
        and all(h["sessions"] == 0 and h["stats_sessions"] == 0 for h in run["hops"]),
        "rss_flat": all(
            v["growth_vs_loaded"] is not None and v["growth_vs_loaded"] <= RSS_GROWTH_LIMIT
            for v in rss.values()
        ),
    }
    return {
        "bench": "soak",
        "config": asdict(config),
        "wall_s": round(wall_s, 1),
        "load_s": round(run["load_s"], 1),
        "clients_misbehaving": run["bad_clients"],
        "requests": len(tally.outcomes),
        "requests_by_kind": dict(sorted(Counter(o.kind for o in tally.outcomes).items())),
        "status_by_kind": {
            kind: dict(Counter(str(o.status) for o in tally.outcomes if o.kind == kind))
            for kind in sorted({o.kind for o in tally.outcomes})
        },
        "well_behaved": {
            "requests": len(good),
            "completed": completed,
            "exact": sum(o.exact for o in good),
            "mismatched": mismatched,
            "status_5xx": good_5xx,
            "other_errors": len(other_errors),
            "tokens_expected": sum(o.expected_tokens for o in good),
            "tokens_lost": tokens_lost,
            "latency_s_median": _median([o.latency_s for o in good]),
            "latency_s_max": round(max((o.latency_s for o in good), default=0.0), 3),
            "first_errors": other_errors[:5]
            + [o.error for o in good if o.error and o.error.startswith("mismatch")][:5],
        },
        "misbehaving": {
            "requests": len(bad),
            "refused_4xx": sum(1 for o in refused if o.status and 400 <= o.status < 500),
            "should_be_refused": len(refused),
            "status_5xx": bad_5xx,
            "disconnects": len(bad) - len(refused),
            # A refusal that takes long is a denial of service even when its status is right.
            "latency_s_max_by_kind": {
                kind: round(max(o.latency_s for o in bad if o.kind == kind), 3)
                for kind in sorted({o.kind for o in bad})
            },
            "first_errors": [f"{o.kind}: {o.error}" for o in refused if o.error][:5],
        },
        "status_counts": dict(sorted(statuses.items())),
        "kills": {
            "requested": config.kills,
            "done": len(tally.replacements),
            "done_under_load": sum(1 for r in tally.replacements if r.at_s < config.minutes * 60),
            "last_kill_at_s": max((r.at_s for r in tally.replacements), default=None),
            "replace_s_median": _median(replace_s),
            "replace_s_max": max(replace_s, default=None),
            "switch_stall_s_median": _median([float(r.switch.get("stall_s", 0)) for r in tally.replacements]),
            "sessions_replayed_median": _median(
                [float(r.switch.get("sessions", 0)) for r in tally.replacements]
            ),
            "spare_wait_s_max": max((r.spare_wait_s for r in tally.replacements), default=None),
            "switch_errors": tally.switch_errors[:5],
            "switch_errors_total": len(tally.switch_errors),
            "step_recoveries": run["recovered_steps"],
            "recovery_s_median": _median(recoveries),  # of the latest RECOVERIES_KEPT
            "recovery_s_max": round(run["recovery_max_s"], 3) if run["recovered_steps"] else None,
        },
        "end": {
            "gateway_live_sessions": run["live_sessions"],
            "hops": run["hops"],
            "settle_s": round(run["settle_s"], 2),
        },
        "rss": {
            "long_lived": rss,
            "servers_first_chain_bytes": initial_rss,
            "servers_last_chain_bytes": final_rss,
            "samples": tally.rss_samples,
        },
        "verdict": {**verdict, "pass": all(verdict.values())},
    }
