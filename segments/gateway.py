"""OpenAI-compatible HTTP gateway in front of a segment chain.

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (chat template from
the tokenizer), both with ``stream: true`` as server-sent events (``data: {...}\\n\\n`` ... ``data: [DONE]``),
usage counts, and errors in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.

Admin: ``GET /admin/chain`` shows the chain, the live sessions and the failure recoveries so far (the
latest ``segments.client.RECOVERIES_KEPT``, with the count and the longest of all);
``POST /admin/chain {"chain": {...}, "mode": "kv"|"push"|"replay", "recompute_hops": k}`` moves every live
session to a new chain between two tokens (``Gateway.switch`` from Python) and answers with the
:class:`~segments.client.SwitchReport`. A request whose chain breaks is held until a new chain arrives
(``recover_timeout_s``) and goes on there, so it loses no token.
``POST /admin/limits {"max_live_sessions": N}`` sets admission control: while N sessions generate, a new
request gets 429 in OpenAI's shape (``type`` "requests", ``code`` "rate_limit_exceeded") with a
``Retry-After`` header (``Gateway.admit``), and the sessions admitted keep their pace.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

# FastAPI resolves handler annotations (``Request``) from this module's globals, so import it here.
from fastapi import FastAPI, Request

from segments.auth import Credentials
from segments.client import AsyncChainClient, Chain, ChainError, RemoteError, Session, SwitchMode
from segments.errors import SegmentError
from segments.sampling import SamplingError, SamplingParams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def chat_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]]) -> list[int]:
    """Token ids of ``messages`` through the tokenizer's chat template, ready for the assistant's turn."""
    ids: Any = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return [int(i) for i in ids]


# A request admitted whose response body never ran (its client left before the stream began) holds its
# place this long at most.
ADMIT_GRACE_S = 10.0
# Weight of the newest token gap in the pace the Retry-After estimate uses.
PACE_WEIGHT = 0.1
# Finished requests kept for the admission limit's measure: a few windows of them at the rates served.
SERVED_KEPT = 512


class GatewayRequestError(Exception):
    """A request the gateway refuses (HTTP 400)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class Gateway:
    """Tokenises, drives generation over an :class:`AsyncChainClient`, tracks live sessions for switching."""

    def __init__(
        self,
        chain: Chain,
        auth: bytes | Credentials,
        tokenizer: PreTrainedTokenizerBase,
        model: str,
        *,
        recover_timeout_s: float = 60.0,
        abandon_after_s: float = 0.1,
        vocab_size: int | None = None,
        context_tokens: int | None = None,
        max_live_sessions: int | None = None,
        prefill_chunk_tokens: int = 0,
    ) -> None:
        """``vocab_size``: token ids a prompt may hold (default: the tokenizer's); ``context_tokens``: the
        most positions a session may reach, prompt plus generated (None: unchecked);
        ``max_live_sessions``: the most sessions generating at once, beyond which a request is refused
        (``admit``; None: no limit here, the segment servers' ``max_sessions`` still holds);
        ``prefill_chunk_tokens``: a longer prompt is prefilled in chunks (``AsyncChainClient.generate``)."""
        self.client = AsyncChainClient(
            chain, auth, recover_timeout_s=recover_timeout_s, prefill_chunk_tokens=prefill_chunk_tokens
        )
        self.abandon_after_s = abandon_after_s
        self.tokenizer = tokenizer
        self.model = model
        self.vocab_size = len(tokenizer) if vocab_size is None else vocab_size
        self.context_tokens = context_tokens
        self.live: dict[str, Session] = {}
        self.max_live_sessions = max_live_sessions
        self.refused = 0  # requests refused by admission control
        self._admitted: dict[str, float] = {}  # admitted, not yet generating: ticket -> when (monotonic)
        self._left: dict[str, int] = {}  # live session -> tokens it may still generate
        self._pace_s: float | None = None  # recent time between a session's tokens
        # The requests served lately, as their users saw them (``served_since``): what the admission
        # limit is measured against (``policies.capacity.measured_limit``).
        self._served: deque[dict[str, float | int | None]] = deque(maxlen=SERVED_KEPT)
        self._served_count = 0
        self._drops: set[asyncio.Task[None]] = set()
        eos = tokenizer.eos_token_id
        self.stop_ids: tuple[int, ...] = () if eos is None else (int(eos),)

    @classmethod
    def from_store(
        cls, chain: Chain, auth: bytes | Credentials, store_dir: Path, model: str, **options: Any
    ) -> Gateway:
        """A gateway whose limits are the prepared model's: its vocabulary and its context length."""
        from segments.store import load_config, load_tokenizer, read_manifest

        manifest = read_manifest(store_dir, model)
        config = load_config(store_dir, manifest)
        context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        return cls(
            chain, auth, load_tokenizer(store_dir, model), model, vocab_size=manifest.info.vocab_size,
            context_tokens=int(context) if context else None, **options,
        )  # fmt: skip

    async def start(self) -> None:
        await self.client.connect()

    async def close(self) -> None:
        await self.client.close()

    async def switch(
        self, chain: Chain, mode: SwitchMode = "kv", recompute_hops: int = 0, timeout_s: float | None = None
    ) -> dict[str, Any]:
        """Move every live session to ``chain``; ``timeout_s`` bounds the switch (past it the old chain
        stays, ``AsyncChainClient.switch``)."""
        t0 = time.perf_counter()
        if self.client.broken is not None:
            mode = "replay"  # a dead hop's KV is gone: the history is all that is left to rebuild from
        # Replay rebuilds everything from the history, so a step still running on the old chain can as
        # well be retried on the new one; a KV move needs every step finished.
        abandon = self.abandon_after_s if mode == "replay" else None
        # The live view: a session that starts while the new chain is prefilled moves too.
        report = await self.client.switch(
            self.live.values(), chain, mode, recompute_hops=recompute_hops, abandon_after_s=abandon,
            timeout_s=timeout_s,
        )  # fmt: skip
        return {**report.to_dict(), "t_s": round(time.perf_counter() - t0, 4)}

    async def prepare(
        self, chain: Chain, mode: SwitchMode = "replay", recompute_hops: int = 0
    ) -> dict[str, Any]:
        """Open ``chain`` and prefill the live sessions' histories on it in the background, ahead of a
        switch to it with the same mode (``AsyncChainClient.prepare``); returns at once."""
        await self.client.prepare(self.live.values(), chain, mode, recompute_hops)
        return {"preparing": self.client.preparing(chain), "live_sessions": len(self.live)}

    def admit(self) -> str | None:
        """A ticket for one request to generate (``stream``), or None when the sessions generating and
        those admitted before them fill ``max_live_sessions``. Admission and counting happen with no
        await between them, so concurrent requests cannot pass the limit together."""
        now = time.monotonic()
        for ticket, at in list(self._admitted.items()):
            if now - at > ADMIT_GRACE_S:
                del self._admitted[ticket]
        limit = self.max_live_sessions
        if limit is not None and len(self.live) + len(self._admitted) >= limit:
            self.refused += 1
            return None
        ticket = secrets.token_hex(8)
        self._admitted[ticket] = now
        return ticket

    def _serve_ended(self, started: float, first: float, last: float, tokens: int, met: int) -> None:
        """Keep what a request that ended normally got: its time to first token (from when it began to
        generate), its mean token gap and the live sessions it met on average."""
        self._served_count += 1
        self._served.append({
            "n": self._served_count, "ended_at_s": round(time.time(), 3), "ttft_s": round(first - started, 4),
            "tpot_s": round((last - first) / (tokens - 1), 4) if tokens > 1 else None,
            "live": round(met / tokens, 2),
        })  # fmt: skip

    def served_since(self, n: int) -> list[dict[str, float | int | None]]:
        """The requests served after the ``n``-th (at most the last ``SERVED_KEPT``)."""
        return [r for r in self._served if int(r["n"] or 0) > n]

    def retry_after_s(self) -> int:
        """Whole seconds until a place is likely to free: the live session nearest its token limit at
        the recent pace (at least 1; 1 before any token was timed)."""
        left = min(self._left.values(), default=0)
        return max(1, math.ceil(left * (self._pace_s or 0.0)))

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        if not messages or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise GatewayRequestError("messages must be a non-empty list of {role, content}", "messages")
        try:
            return chat_ids(self.tokenizer, messages)
        except Exception as exc:  # template errors (a bad role, no template) are the caller's to fix
            raise GatewayRequestError(f"cannot apply the chat template: {exc}", "messages") from None

    def encode_prompt(self, prompt: Any) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, list) and prompt and all(_is_int(i) for i in prompt):
            ids = prompt
        else:
            raise GatewayRequestError("prompt must be a string or a list of token ids (one prompt)", "prompt")
        if not ids:
            raise GatewayRequestError("the prompt is empty", "prompt")
        if not all(0 <= i < self.vocab_size for i in ids):
            raise GatewayRequestError(f"token ids must lie in [0, {self.vocab_size})", "prompt")
        return [int(i) for i in ids]

    def check_context(self, prompt_ids: list[int], max_tokens: int) -> None:
        """Refuse a request whose prompt plus ``max_tokens`` would run past the model's context."""
        if self.context_tokens is not None and len(prompt_ids) + max_tokens > self.context_tokens:
            raise GatewayRequestError(
                f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) exceed the model's "
                f"context of {self.context_tokens} tokens",
                "max_tokens",
            )

    async def stream(
        self,
        prompt_ids: list[int],
        max_tokens: int,
        sampling: SamplingParams,
        stop: list[str],
        usage: dict[str, int],
        ticket: str | None = None,
    ) -> AsyncIterator[tuple[str, str | None]]:
        """Yield (text delta, finish reason or None); the last item carries the finish reason. ``usage`` is
        filled with the token counts (per call, so concurrent requests never mix them); ``ticket``: this
        request's from ``admit``, whose place the session now takes."""
        session = Session(tokens=list(prompt_ids))
        self._admitted.pop(ticket or "", None)
        self.live[session.id] = session
        self._left[session.id] = max_tokens
        generated: list[int] = []
        sent = ""
        finish = "length"
        started = time.monotonic()
        first = last = None
        timed = met = 0  # tokens that came, and the live sessions each of them met (summed)
        try:
            async for token in self.client.generate(session, max_tokens, sampling, self.stop_ids):
                now = time.monotonic()
                timed, met = timed + 1, met + len(self.live)
                if last is not None:
                    gap = now - last
                    self._pace_s = (
                        gap if self._pace_s is None else self._pace_s + PACE_WEIGHT * (gap - self._pace_s)
                    )
                first = now if first is None else first
                last = now
                self._left[session.id] -= 1
                if token in self.stop_ids:
                    finish = "stop"
                    break
                generated.append(token)
                text = self.tokenizer.decode(generated, skip_special_tokens=True)
                hit = next((s for s in stop if s and s in text), None)
                if hit is not None:
                    text = text[: text.index(hit)]
                    finish = "stop"
                # Hold back an incomplete UTF-8 sequence until the next token completes it.
                if hit is None and text.endswith("\ufffd"):
                    continue
                if len(text) > len(sent):
                    yield text[len(sent) :], None
                    sent = text
                if hit is not None:
                    break
            if first is not None and last is not None:
                self._serve_ended(started, first, last, timed, met)
            yield "", finish
        finally:
            self.live.pop(session.id, None)
            self._left.pop(session.id, None)
            usage.update(
                prompt_tokens=len(prompt_ids),
                completion_tokens=len(generated),
                total_tokens=len(prompt_ids) + len(generated),
            )
            # A client that leaves cancels this generator; the drop must still reach every hop (cancelled
            # midway it freed hop 0 and left the session on the others until max_sessions filled up).
            drop = asyncio.ensure_future(self.client.drop(session))
            self._drops.add(drop)
            drop.add_done_callback(self._drops.discard)
            await asyncio.shield(drop)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_or_none(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1e6:
        raise ValueError(f"{name} must be a number of seconds in (0, 1e6), got {value!r}")
    return float(value)


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


def _error(
    status: int,
    message: str,
    etype: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> Any:
    from fastapi.responses import JSONResponse

    body = {"error": {"message": message, "type": etype, "param": param, "code": code}}
    return JSONResponse(status_code=status, content=body, headers=headers)


def _sampling(body: dict[str, Any]) -> SamplingParams:
    temperature = body.get("temperature")
    top_p = body.get("top_p")
    seed = body.get("seed")
    if seed is not None and not (_is_int(seed) and -(2**63) <= seed < 2**63):
        raise GatewayRequestError("seed must be an integer in [-2^63, 2^63)", "seed")
    return SamplingParams(
        temperature=1.0 if temperature is None else float(temperature),
        top_p=1.0 if top_p is None else float(top_p),
        seed=secrets.randbelow(2**31) if seed is None else seed,
    )


# OpenAI parameters this gateway does not implement, with the values that ask for nothing: any other
# value is refused, not ignored (a client asking for logprobs must not get a reply without them).
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "logprobs": (False,),
    "top_logprobs": (),
    "echo": (False,),
    "best_of": (1,),
    "suffix": (),
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "logit_bias": ({},),
    "tools": ([],),
    "tool_choice": ("none",),
    "functions": ([],),
    "function_call": ("none",),
    "response_format": ({"type": "text"},),
    "n": (1,),
}


def _refuse_unsupported(body: dict[str, Any]) -> None:
    for name, accepted in UNSUPPORTED.items():
        value = body.get(name)
        if value is not None and not any(type(value) is type(a) and value == a for a in accepted):
            raise GatewayRequestError(f"{name}={value!r} is not supported by this gateway", name)


def _stop_list(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return stop
    raise GatewayRequestError("stop must be a string or a list of strings", "stop")


def _max_tokens(body: dict[str, Any], default: int) -> int:
    value = body.get("max_completion_tokens")
    value = body.get("max_tokens") if value is None else value
    value = default if value is None else value
    if not _is_int(value) or value < 1 or value > 32_768:
        raise GatewayRequestError("max_tokens must be an integer in 1..32768", "max_tokens")
    return value


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


class _Guard:
    """The gateway's access rules, as a plain ASGI middleware (Starlette's ``BaseHTTPMiddleware`` hid the
    client's disconnect from the endpoint, so a plain request whose client left generated on, or hung,
    with its session live on every hop). ``wanted``: prefix -> (expected ``Authorization`` value, what
    the key is called); ``admin_host``: the local address the admin routes exist on (None: every one)."""

    def __init__(self, app: Any, wanted: dict[str, tuple[bytes, str]], admin_host: str | None) -> None:
        self.app = app
        self.wanted = wanted
        self.admin_host = admin_host

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            refusal = self._refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, scope: Any) -> Any:
        path = scope["path"]
        if self.admin_host is not None and _under(path, "/admin"):
            arrived_at = (scope.get("server") or ("", 0))[0]
            if arrived_at != self.admin_host:  # as if there were no such route here
                return _error(404, f"no route {path}", etype="not_found_error", code="not_found")
        for prefix, (expected, what) in self.wanted.items():
            if _under(path, prefix):
                given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
                if not secrets.compare_digest(given, expected):
                    return _error(401, f"a valid {what} is needed: Authorization: Bearer <key>",
                                  code=f"invalid_{what.lower().replace(' ', '_')}")  # fmt: skip
        return None


def create_app(
    gateway: Gateway,
    api_key: str | None = None,
    admin_token: str | None = None,
    admin_host: str | None = None,
) -> FastAPI:
    """The HTTP app; with ``api_key`` every ``/v1`` route wants ``Authorization: Bearer <api_key>``, with
    ``admin_token`` every ``/admin`` route wants ``Authorization: Bearer <admin_token>`` (the users of
    the API may not switch its chain), and with ``admin_host`` the admin routes exist only for
    connections that arrived at that local address (the management network's)."""
    from contextlib import asynccontextmanager

    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        yield
        await gateway.close()

    app = FastAPI(title="mecsplit gateway", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> Any:
        return _error(400, str(exc))

    wanted = {
        prefix: (f"Bearer {key}".encode(), what)
        for prefix, key, what in (("/v1", api_key, "API key"), ("/admin", admin_token, "admin token"))
        if key is not None
    }
    if wanted or admin_host is not None:
        app.add_middleware(_Guard, wanted=wanted, admin_host=admin_host)

    @app.exception_handler(GatewayRequestError)
    async def _refused(_: Request, exc: GatewayRequestError) -> Any:
        return _error(400, str(exc), param=exc.param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> Any:
        etype = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(exc.status_code, str(exc.detail), etype)

    async def _json_object(request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise GatewayRequestError("the request body must be JSON") from None
        if not isinstance(body, dict):
            raise GatewayRequestError("the request body must be a JSON object")
        return body

    async def _body(request: Request) -> dict[str, Any]:
        body = await _json_object(request)
        model = body.get("model")
        if model not in (None, gateway.model):
            raise GatewayRequestError(f"model {model!r} is not served here; use {gateway.model!r}", "model")
        return body

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": gateway.model, "object": "model", "created": 0, "owned_by": "mecsplit"}],
        }

    @app.get("/admin/chain")
    async def get_chain() -> dict[str, Any]:
        return {
            "chain": gateway.client.chain.to_dict(),
            "live_sessions": len(gateway.live),
            "broken": gateway.client.broken,
            "recoveries": [r.to_dict() for r in gateway.client.recoveries],
            "recovered_steps": gateway.client.recovered_steps,
            "recovery_max_s": round(gateway.client.recovery_max_s, 4),
            "max_live_sessions": gateway.max_live_sessions,
            "refused": gateway.refused,
        }

    @app.post("/admin/limits")
    async def set_limits(request: Request) -> Any:
        """``{"max_live_sessions": N or null}``: the admission limit from now on (sessions already
        generating finish either way)."""
        body = await _json_object(request)
        limit = body.get("max_live_sessions")
        if "max_live_sessions" not in body or not (limit is None or (_is_int(limit) and limit > 0)):
            return _error(400, f"max_live_sessions must be a positive integer or null, got {limit!r}",
                          param="max_live_sessions")  # fmt: skip
        gateway.max_live_sessions = limit
        return {"max_live_sessions": limit}

    @app.get("/admin/telemetry")
    async def get_telemetry(since: int = 0, served_since: int = 0) -> dict[str, Any]:
        """Traced steps after ``since`` (segments.telemetry), the gateway's CPU time and token count, and
        the requests served after the ``served_since``-th (``Gateway.served_since``)."""
        return {
            **gateway.client.telemetry.snapshot(since),
            "served": gateway.served_since(served_since),
            "chain": gateway.client.chain.to_dict(),
            "generation": gateway.client.generation,
            "live_sessions": len(gateway.live),
        }

    @app.post("/admin/chain")
    async def set_chain(request: Request) -> Any:
        body = await _json_object(request)
        try:
            chain = Chain.from_dict(body["chain"])
            timeout_s = _positive_or_none(body.get("timeout_s"), "timeout_s")
            return await gateway.switch(
                chain, body.get("mode", "kv"), int(body.get("recompute_hops", 0)), timeout_s
            )
        except (KeyError, TypeError, ValueError, SegmentError) as exc:
            return _error(400, f"bad chain: {exc}", param="chain")
        except (ChainError, RemoteError) as exc:
            return _error(503, f"switch failed, the old chain stays: {exc}", "server_error")

    @app.post("/admin/prepare")
    async def prepare_chain(request: Request) -> Any:
        body = await _json_object(request)
        try:
            chain = Chain.from_dict(body["chain"])
            mode, recompute = body.get("mode", "replay"), int(body.get("recompute_hops", 0))
            return await gateway.prepare(chain, mode, recompute)
        except (KeyError, TypeError, ValueError, SegmentError) as exc:
            return _error(400, f"bad chain: {exc}", param="chain")
        except ChainError as exc:
            return _error(409, f"cannot prepare: {exc}", "server_error")

    async def _run(request: Request, chat: bool) -> Any:
        try:
            body = await _body(request)
            if chat:
                prompt_ids = gateway.encode_chat(body.get("messages"))
            else:
                prompt_ids = gateway.encode_prompt(body.get("prompt"))
            _refuse_unsupported(body)
            params = _sampling(body)
            max_tokens = _max_tokens(body, 256 if chat else 16)
            gateway.check_context(prompt_ids, max_tokens)
            stop = _stop_list(body)
        except (GatewayRequestError, SamplingError, ValueError, TypeError) as exc:
            return _error(400, str(exc), param=getattr(exc, "param", None))
        ticket = gateway.admit()
        if ticket is None:
            wait_s = gateway.retry_after_s()
            return _error(
                429,
                f"the gateway serves at most {gateway.max_live_sessions} sessions at once (the most its "
                f"chain serves within the latency SLO) and all are taken; retry after {wait_s} s",
                "requests", code="rate_limit_exceeded", headers={"Retry-After": str(wait_s)},
            )  # fmt: skip
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(
                _stream(
                    rid, created, kind, chat, prompt_ids, max_tokens, params, stop, include_usage, ticket
                ),
                media_type="text/event-stream",
            )
        usage: dict[str, int] = {}
        try:
            text, finish = "", "length"
            tokens = gateway.stream(prompt_ids, max_tokens, params, stop, usage, ticket)
            async with contextlib.aclosing(tokens):
                async for delta, reason in tokens:
                    text += delta
                    finish = reason or finish
                    if await request.is_disconnected():  # nobody waits for the rest: free the hops now
                        return _error(499, "the client closed the request", code="client_closed")
        except (ChainError, RemoteError, SegmentError) as exc:
            return _error(503, f"the segment chain failed: {exc}", "server_error")
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {
            "id": rid,
            "object": kind,
            "created": created,
            "model": gateway.model,
            "choices": [choice],
            "usage": usage,
        }

    async def _stream(
        rid: str,
        created: int,
        kind: str,
        chat: bool,
        prompt_ids: list[int],
        max_tokens: int,
        params: SamplingParams,
        stop: list[str],
        include_usage: bool,
        ticket: str,
    ) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if chat else kind
        base = {"id": rid, "object": obj, "created": created, "model": gateway.model}

        def chunk(delta: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
            if chat:
                d: dict[str, Any] = {}
                if role:
                    d["role"] = "assistant"
                if delta:
                    d["content"] = delta
                c = {"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}
            else:
                c = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
            return {**base, "choices": [c]}

        usage: dict[str, int] = {}
        try:
            if chat:
                yield _sse(chunk(None, None, role=True))
            tokens = gateway.stream(prompt_ids, max_tokens, params, stop, usage, ticket)
            async with contextlib.aclosing(tokens):
                async for delta, reason in tokens:
                    if delta or reason:
                        yield _sse(chunk(delta, reason))
            if include_usage:
                yield _sse({**base, "choices": [], "usage": usage})
        except (ChainError, RemoteError, SegmentError) as exc:
            yield _sse(
                {
                    "error": {
                        "message": f"the segment chain failed: {exc}",
                        "type": "server_error",
                        "param": None,
                        "code": None,
                    }
                }
            )
        yield "data: [DONE]\n\n"

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await _run(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await _run(request, chat=True)

    return app
