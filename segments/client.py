"""Client side of the segment chain: connections, sessions, generation, switching a session between chains.

* :class:`Chain` names the hops (``host:port`` and layer range) in order.
* :class:`AsyncChainClient` holds one authenticated connection per hop. It sends each step to the first hop
  with the remaining route; the last hop pushes the RESULT on a channel this client subscribed on its
  connection to the last hop, and errors come back along the chain to the first hop's connection.
* :class:`Session` keeps the token history (the activations at boundary 0), so a session can always be
  rebuilt on new segments; :meth:`AsyncChainClient.switch` moves sessions to a new chain between two tokens:
  the first ``recompute_hops`` new hops recompute their KV from that history in one prefill, the others
  get the KV of their layers moved from the old hops (through the client, or server to server).
* With ``recover_timeout_s > 0`` a step that fails because a hop died is not lost: the session waits for
  a new chain (a :meth:`~AsyncChainClient.switch`, which rebuilds it from its history) and the step is
  retried there, so no token is lost or repeated.
* :class:`ChainClient` is a synchronous facade with a private event loop, for commands and tests.

``python -m segments.client health --host H --port P --secret-file FILE`` exits 0 when healthy and prints
the server's stats as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import secrets
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from segments.auth import AuthError, Credentials, SecretConfigError, client_handshake, open_connection
from segments.errors import (
    ERRORS_BY_CODE,
    LayerRangeError,
    PositionMismatchError,
    SegmentError,
    error_for_code,
)
from segments.pki import PkiError
from segments.protocol import (
    ConnectionClosedError,
    Frame,
    FrameType,
    ProtocolError,
    read_frame,
    write_frame,
)
from segments.sampling import SamplingParams
from segments.telemetry import StepTrace, Telemetry

T = TypeVar("T")

if TYPE_CHECKING:
    import torch

SwitchMode = Literal["kv", "push", "replay"]
DEFAULT_TIMEOUT_S = 120.0


class RemoteError(Exception):
    """A segment server refused or failed a request; ``code`` is the wire error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message


class ChainError(Exception):
    """The chain is unusable (a hop is unreachable or closed its connection)."""


class StepAbandonedError(ChainError):
    """A step in flight was given up because its chain is being replaced; it is retried on the new one."""


def remote_error(header: dict[str, Any]) -> Exception:
    code = str(header.get("code", "unknown"))
    message = str(header.get("message", ""))
    if code in ERRORS_BY_CODE:
        return error_for_code(code, message)
    return RemoteError(code, message)


@dataclass(frozen=True)
class Hop:
    host: str
    port: int
    first: int
    end: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def to_dict(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "first": self.first, "end": self.end}


@dataclass(frozen=True)
class Chain:
    """Hops in layer order; their ranges must tile ``[0, num_layers)``."""

    model: str
    hops: tuple[Hop, ...]

    def __post_init__(self) -> None:
        if not self.hops:
            raise LayerRangeError("a chain needs at least one hop")
        expected = 0
        for hop in self.hops:
            if hop.first != expected or hop.end <= hop.first:
                raise LayerRangeError(
                    f"hop {hop.address} serves [{hop.first}, {hop.end}) but the chain needs a range "
                    f"starting at {expected}"
                )
            expected = hop.end

    @property
    def num_layers(self) -> int:
        return self.hops[-1].end

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "hops": [h.to_dict() for h in self.hops]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Chain:
        return cls(data["model"], tuple(Hop(**h) for h in data["hops"]))


@dataclass
class Session:
    """A generation session: its id, the full token history and how much of it the chain holds as KV."""

    id: str = field(default_factory=lambda: secrets.token_hex(8))
    tokens: list[int] = field(default_factory=list)
    kv_length: int = 0

    @property
    def pending(self) -> list[int]:
        """Tokens the chain has not yet seen (the prompt, or the last sampled token)."""
        return self.tokens[self.kv_length :]


@dataclass(frozen=True)
class SwitchReport:
    """What one switch did and what it cost (``stall_s`` is what the sessions waited between two tokens)."""

    mode: SwitchMode
    recompute_hops: int
    hops: int
    sessions: int
    kv_bytes_moved: int
    tokens_recomputed: int
    abandoned_steps: int
    wait_s: float  # for the steps in flight to finish (or be abandoned)
    connect_s: float  # opening the new chain
    move_s: float  # moving or recomputing every session's KV
    stall_s: float
    # Tokens of history recomputed on the new chain before the gate closed, while the sessions still ran
    # on the old one (``prefill_s``): the stall then recomputes only the tokens added since.
    tokens_prefilled: int = 0
    prefill_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in self.__dict__.items()}


# Recoveries a client keeps for its admin view (the latest; the count and the longest cover all): a
# 10-minute soak with 50 failures recovered about 2,300 steps.
RECOVERIES_KEPT = 1000


@dataclass(frozen=True)
class Recovery:
    """A step that failed on a broken chain and succeeded on its replacement."""

    session: str
    position: int
    error: str
    recovery_s: float  # from the failure to the retried step's answer

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "recovery_s": round(self.recovery_s, 4)}


def recoverable(exc: BaseException) -> bool:
    """A failure that a new chain cures: a hop died, hung, or could not reach the next hop."""
    return isinstance(exc, ChainError) or (isinstance(exc, RemoteError) and exc.code == "unreachable")


@dataclass(frozen=True)
class StepResult:
    tokens: list[int] | None
    logits: torch.Tensor | None
    hidden: torch.Tensor | None
    latency_s: float
    trace: StepTrace | None = None  # where the step's time went, hop by hop (segments.telemetry)


class Link:
    """One authenticated connection to a segment server."""

    def __init__(self, hop: Hop, client: AsyncChainClient) -> None:
        self.hop = hop
        self.client = client
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.identity: dict[str, Any] = {}
        self.closing = False
        self._task: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        timeout_s = self.client.timeout_s
        try:
            self.reader, self.writer = await asyncio.wait_for(
                open_connection(self.hop.host, self.hop.port, self.client.credentials, limit=1 << 20),
                timeout_s,
            )
        except (OSError, TimeoutError) as exc:
            raise ChainError(f"cannot connect to segment server {self.hop.address}: {exc}") from None
        try:
            credentials = self.client.credentials
            self.identity = await client_handshake(self.reader, self.writer, credentials, timeout_s)
        except (ConnectionClosedError, ProtocolError, OSError) as exc:
            self.writer.close()
            raise ChainError(
                f"segment server {self.hop.address} ended the handshake ({exc}); does it expect the other "
                "mode (TLS credentials or a shared secret)?"
            ) from None
        served = (self.identity.get("first"), self.identity.get("end"))
        if served != (self.hop.first, self.hop.end):
            raise ChainError(
                f"{self.hop.address} serves [{served[0]}, {served[1]}), the chain expects "
                f"[{self.hop.first}, {self.hop.end})"
            )
        self._task = asyncio.create_task(self._read_loop())

    async def _read_loop(self) -> None:
        assert self.reader is not None
        error: Exception = ChainError(f"connection to {self.hop.address} closed")
        try:
            while True:
                frame = await read_frame(self.reader, self.client.max_frame_bytes, 3600.0)
                self.client._dispatch(frame)
        except (ConnectionClosedError, ProtocolError, OSError) as exc:
            error = ChainError(f"connection to {self.hop.address} lost: {exc}")
        finally:
            # A link closed on purpose (old chain after a switch) must not fail the new chain's requests.
            if not self.closing:
                self.client._fail_link(self, error)
                # Later sends fail at once instead of waiting for an answer that cannot come.
                if self.writer is not None:
                    self.writer.close()

    def send(self, ftype: FrameType, header: dict[str, Any], tensors: dict[str, torch.Tensor] | None) -> int:
        """Queue one frame; returns its size on the wire."""
        if self.writer is None or self.writer.is_closing():
            raise ChainError(f"connection to {self.hop.address} is closed; reconnect the client")
        return write_frame(self.writer, ftype, header, tensors)

    async def drain(self) -> None:
        assert self.writer is not None
        await self.writer.drain()

    async def close(self) -> None:
        self.closing = True
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.writer.wait_closed(), 2.0)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


# A preparation older than this is not used: the switch it was for did not come (the flow run failed or
# another decision came first), and the sessions' histories on its hops are stale.
AHEAD_TTL_S = 10.0


@dataclass(frozen=True)
class _Pending:
    future: asyncio.Future[Frame]
    links: tuple[Link, ...]


@dataclass
class _Ahead:
    """A chain opened and prefilled ahead of a switch (``AsyncChainClient.prepare``)."""

    chain: Chain
    recompute: int
    at_s: float  # time.monotonic() of the preparation
    links: list[Link] = field(default_factory=list)
    prefilled: dict[str, int] = field(default_factory=dict)  # session id -> tokens of KV on the prefix
    task: asyncio.Task[None] | None = None


GREEDY = SamplingParams()


class AsyncChainClient:
    def __init__(
        self,
        chain: Chain,
        auth: bytes | Credentials,
        *,
        max_frame_bytes: int = 64 * 1024 * 1024,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        wire_dtype: str = "f32",
        recover_timeout_s: float = 0.0,
        prefill_chunk_tokens: int = 0,
    ) -> None:
        """``prefill_chunk_tokens``: a prompt longer than this is fed in steps of at most this many
        tokens (0: in one step), see ``generate``."""
        self.chain = chain
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.credentials = Credentials.of(auth)
        self.max_frame_bytes = max_frame_bytes
        self.timeout_s = timeout_s
        self.wire_dtype = wire_dtype
        self.channel = secrets.token_hex(8)
        self.links: list[Link] = []
        # Requests awaiting an answer, each with the links its answer depends on: a link that dies fails
        # only those (a switch in progress on other links goes on; the dead hop's chain is marked broken).
        self._pending: dict[str, _Pending] = {}
        self._ids = itertools.count()
        self._prefix = secrets.token_hex(4)
        # Steps in flight, and a gate a switch closes so that it runs between two tokens of every session.
        self._inflight = 0
        self._idle: asyncio.Event | None = None
        self._open_gate: asyncio.Event | None = None
        # Failure recovery: how long a failed step waits for a new chain, and what broke the current one.
        self.recover_timeout_s = recover_timeout_s
        self.broken: str | None = None
        self.generation = 0
        self._switched: asyncio.Event | None = None
        # The latest recoveries (a long-lived gateway must not keep every one), how many there were and
        # the longest.
        self.recoveries: deque[Recovery] = deque(maxlen=RECOVERIES_KEPT)
        self.recovered_steps = 0
        self.recovery_max_s = 0.0
        # Old chains still freeing the moved sessions' KV after a switch (see ``_retire``).
        self._retiring: set[asyncio.Task[None]] = set()
        # A chain opened and prefilled ahead of a switch to it (see ``prepare``).
        self._ahead: _Ahead | None = None
        # Every generated token's step, traced hop by hop (read by the gateway's /admin/telemetry).
        self.telemetry = Telemetry()

    # ------------------------------------------------------------------------------- connections

    async def connect(self) -> AsyncChainClient:
        self._idle = asyncio.Event()
        self._idle.set()
        self._open_gate = asyncio.Event()
        self._open_gate.set()
        self._switched = asyncio.Event()
        self.links = await self._open(self.chain)
        return self

    async def _open(self, chain: Chain) -> list[Link]:
        links = [Link(hop, self) for hop in chain.hops]
        try:
            for link in links:
                await link.connect()
            # Every hop, not just the last, may end a route: a recompute prefill stops at the last
            # recomputing hop and answers from there.
            for link in links:
                await self._control_link(link, "subscribe", channel=self.channel)
            if self.credentials.tls_dir is not None:  # with a shared secret every peer is trusted alike
                for before, link in itertools.pairwise(links):
                    await self._control_link(link, "allow_upstream", identities=[before.identity["peer"]])
        except BaseException:
            for link in links:
                await link.close()
            raise
        return links

    async def close(self) -> None:
        if self._retiring:  # let old chains finish dropping moved sessions, briefly
            _, late = await asyncio.wait(list(self._retiring), timeout=5.0)
            for task in late:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._ahead is not None:
            await self._discard(self._ahead)
            self._ahead = None
        for link in self.links:
            await link.close()
        self.links = []

    async def __aenter__(self) -> AsyncChainClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _dispatch(self, frame: Frame) -> None:
        rid = frame.header.get("request_id")
        pending = self._pending.pop(rid, None) if isinstance(rid, str) else None
        if pending is not None and not pending.future.done():
            pending.future.set_result(frame)

    def _fail_link(self, link: Link, error: Exception) -> None:
        """``link`` died: fail the requests that needed it; a hop of the current chain breaks the chain."""
        if link in self.links:
            self.broken = str(error)
        self._fail_requests({link}, error)

    def _fail_requests(self, links: set[Link], error: Exception) -> None:
        for rid, pending in list(self._pending.items()):
            if links.intersection(pending.links):
                del self._pending[rid]
                if not pending.future.done():
                    pending.future.set_exception(error)

    def _new_request(self, links: Sequence[Link]) -> tuple[str, asyncio.Future[Frame]]:
        """A request whose answer needs every link of ``links`` (one for a control op, the route for a
        forward)."""
        rid = f"{self._prefix}-{next(self._ids)}"
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._pending[rid] = _Pending(future, tuple(links))
        return rid, future

    async def _await(self, rid: str, future: asyncio.Future[Frame]) -> Frame:
        try:
            frame = await asyncio.wait_for(future, self.timeout_s)
        except TimeoutError:
            self._pending.pop(rid, None)
            raise ChainError(f"no answer to request {rid} within {self.timeout_s} s") from None
        if frame.type == FrameType.ERROR:
            raise remote_error(frame.header)
        return frame

    async def _send(
        self, link: Link, rid: str, ftype: FrameType, header: dict[str, Any],
        tensors: dict[str, torch.Tensor] | None,
    ) -> int:  # fmt: skip
        """Send request ``rid``'s frame; on failure forget the request, whose answer can never come (left
        in ``_pending``, each step tried on a dead link stayed there until the next failure of the chain,
        which then set an exception nobody awaited)."""
        try:
            sent = link.send(ftype, header, tensors)
            await link.drain()
        except BaseException:
            self._pending.pop(rid, None)
            raise
        return sent

    # ----------------------------------------------------------------------------------- control

    async def _control_link(
        self, link: Link, op: str, tensors: dict[str, torch.Tensor] | None = None, **args: Any
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        rid, future = self._new_request([link])
        await self._send(link, rid, FrameType.CONTROL, {"op": op, "request_id": rid, **args}, tensors)
        frame = await self._await(rid, future)
        return frame.header.get("result", {}), frame.tensors

    async def control(
        self, hop_index: int, op: str, tensors: dict[str, torch.Tensor] | None = None, **args: Any
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return await self._control_link(self.links[hop_index], op, tensors, **args)

    async def stats(self) -> list[dict[str, Any]]:
        return [(await self.control(i, "stats"))[0] for i in range(len(self.links))]

    # ----------------------------------------------------------------------------------- forward

    async def step(
        self,
        session_id: str,
        inputs: torch.Tensor,
        position: int,
        *,
        attention_mask: torch.Tensor | None = None,
        sampling: SamplingParams | None = None,
        logits: str = "none",
    ) -> StepResult:
        """One forward through the whole chain; the last hop answers with tokens / logits / hidden."""
        assert self._open_gate is not None and self._idle is not None, "connect() first"
        while not self._open_gate.is_set():
            await self._open_gate.wait()
        self._inflight += 1
        self._idle.clear()
        try:
            return await self._forward(
                self.links, session_id, inputs, position, attention_mask, sampling, logits
            )
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()

    async def _forward(
        self,
        links: list[Link],
        session_id: str,
        inputs: torch.Tensor,
        position: int,
        attention_mask: torch.Tensor | None,
        sampling: SamplingParams | None,
        logits: str,
        discard_output: bool = False,
    ) -> StepResult:
        """One forward through ``links``; the last of them answers (with nothing if ``discard_output``)."""
        t0 = time.perf_counter()
        sent_s = time.time()
        rid, future = self._new_request(links)
        route = [link.hop.address for link in links[1:]]
        header = {
            "session": session_id,
            "request_id": rid,
            "position": position,
            "layer": 0,
            "route": route,
            "channel": self.channel,
            "wire_dtype": self.wire_dtype,
            "logits": logits,
            "sampling": None if sampling is None else sampling.to_dict(),
            "discard_output": discard_output,
            "t0": sent_s,
        }
        tensors = {"x": inputs}
        if attention_mask is not None:
            tensors["mask"] = attention_mask
        sent_bytes = await self._send(links[0], rid, FrameType.FORWARD, header, tensors)
        frame = await self._await(rid, future)
        received_s = time.time()
        trace = StepTrace.from_wire(
            positions=int(inputs.shape[1]) if inputs.dim() > 1 else 1, t0=sent_s, received_s=received_s,
            sent_bytes=sent_bytes, result_bytes=frame.wire_bytes, entries=frame.header.get("trace", ()),
            hops=[(link.hop.address, link.hop.first, link.hop.end) for link in links],
        )  # fmt: skip
        return StepResult(
            tokens=frame.header.get("tokens"),
            logits=frame.tensors.get("logits"),
            hidden=frame.tensors.get("hidden"),
            latency_s=time.perf_counter() - t0,
            trace=trace,
        )

    async def generate(
        self,
        session: Session,
        max_new_tokens: int,
        sampling: SamplingParams | None = None,
        stop_ids: Sequence[int] = (),
    ) -> AsyncIterator[int]:
        """Stream new tokens of ``session`` (whose ``tokens`` hold the prompt or the history so far).

        A prompt longer than ``prefill_chunk_tokens`` is fed in chunks of that many tokens first, each its
        own step: a segment server runs steps in turn, so other sessions' decode steps run between two
        chunks instead of waiting for a whole long prefill. The chunks' own choices are greedy and
        dropped (the random stream is per position, so the token finally sampled is the same)."""
        import torch

        params = sampling or SamplingParams()
        chunk = self.prefill_chunk_tokens
        while max_new_tokens > 0 and chunk > 0 and len(session.pending) > chunk:
            part = session.pending[:chunk]
            idle_s = self.telemetry.step_started(session.id)
            result = await self._step_recovering(session, torch.tensor([part], dtype=torch.int64), GREEDY)
            self.telemetry.record(session.id, self.generation, idle_s, result.trace)
            session.kv_length += len(part)
        for _ in range(max_new_tokens):
            pending = session.pending
            if not pending:
                raise ChainError("the session has no pending token to feed; give it a prompt")
            inputs = torch.tensor([pending], dtype=torch.int64)
            idle_s = self.telemetry.step_started(session.id)
            result = await self._step_recovering(session, inputs, params)
            self.telemetry.record(session.id, self.generation, idle_s, result.trace)
            assert result.tokens is not None
            session.kv_length += len(pending)
            token = result.tokens[0]
            session.tokens.append(token)
            yield token
            if token in stop_ids:
                return

    async def _step_recovering(
        self, session: Session, inputs: torch.Tensor, sampling: SamplingParams
    ) -> StepResult:
        """A step that, when its chain breaks, waits for the next chain and runs again there.

        The session's ``kv_length`` only advances once a step succeeds, so the switch that brings the new
        chain rebuilds exactly the history before this step, and the retry feeds the same tokens."""
        failed_at: float | None = None
        realign_left = len(self.links)
        while True:
            generation = self.generation
            try:
                result = await self.step(session.id, inputs, session.kv_length, sampling=sampling)
            except PositionMismatchError:
                # A hop ahead of kv_length holds a step this client gave up on (abandoned in a switch and
                # landed after the switch rebuilt the session there, or timed out here and finished there):
                # it never sends a position beyond kv_length. The client's count is the truth: cut every
                # hop back to it and step again, once per hop the stale step can reach. A hop behind
                # cannot be cut forward: the retry fails the same way, and that is raised.
                if realign_left <= 0:
                    raise
                realign_left -= 1
                await self._truncate_everywhere(session)
                continue
            except (ChainError, RemoteError) as exc:
                if self.recover_timeout_s <= 0 or not recoverable(exc):
                    raise
                if failed_at is None:
                    failed_at, first_error = time.perf_counter(), str(exc)
                # A chain that breaks again is waited for again, within the one recovery time budget.
                await self._await_new_chain(generation, exc, failed_at + self.recover_timeout_s)
                continue
            if failed_at is not None:
                elapsed = time.perf_counter() - failed_at
                self.record_recovery(Recovery(session.id, session.kv_length, first_error, elapsed))
            return result

    def record_recovery(self, recovery: Recovery) -> None:
        self.recoveries.append(recovery)
        self.recovered_steps += 1
        self.recovery_max_s = max(self.recovery_max_s, recovery.recovery_s)

    async def _truncate_everywhere(self, session: Session) -> None:
        for link in self.links:
            # A hop without the session (or holding less) refuses, a dead one cannot answer: nothing to
            # cut there (the retry then fails as it must, a dead hop recoverably).
            with contextlib.suppress(SegmentError, RemoteError, ChainError, TimeoutError):
                await self._control_link(link, "truncate", session=session.id, length=session.kv_length)

    async def _await_new_chain(self, generation: int, cause: Exception, deadline: float) -> None:
        assert self._switched is not None
        while self.generation == generation:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                raise ChainError(
                    f"the chain broke ({cause}) and no new chain came within {self.recover_timeout_s} s"
                ) from cause
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._switched.wait(), remaining)

    # ------------------------------------------------------------------------------------ moving

    async def drop(self, session: Session) -> None:
        """Free the session's KV on every hop (errors ignored: a hop may never have seen it)."""
        self.telemetry.forget(session.id)
        # A switch in progress may be moving this session: drop it where the switch leaves it. Dropped
        # on the old chain during the stall, it was rebuilt on the new one and held there for good.
        while self._open_gate is not None and not self._open_gate.is_set():
            await self._open_gate.wait()
        await self._drop_on(self.links, session)

    async def _drop_on(self, links: list[Link], session: Session, timeout_s: float | None = None) -> None:
        for link in links:
            with contextlib.suppress(SegmentError, RemoteError, ChainError, TimeoutError):
                await asyncio.wait_for(
                    self._control_link(link, "drop", session=session.id), timeout_s or self.timeout_s
                )

    async def switch(
        self,
        sessions: Session | Iterable[Session],
        new_chain: Chain,
        mode: SwitchMode = "kv",
        drop_old: bool = True,
        *,
        recompute_hops: int = 0,
        abandon_after_s: float | None = None,
        timeout_s: float | None = None,
    ) -> SwitchReport:
        """Move ``sessions`` to ``new_chain`` between two tokens; later steps go to the new chain.

        ``timeout_s`` bounds the switch's own work (the prefill, and the move while the gate is closed):
        past it the switch fails with ChainError and the sessions go on on the old chain, whose KV a move
        only copies. A move whose KV crosses a link that collapsed meanwhile would otherwise stall every
        session for minutes.

        The first ``recompute_hops`` hops of the new chain rebuild their KV from each session's token history
        (one prefill through just those hops); every other hop gets the KV of its layers moved from the old
        hops that hold them: ``kv`` exports and imports through this client, ``push`` has the old hops send
        it straight to the new ones. ``replay`` recomputes on every hop (what a broken chain needs).

        Steps in flight finish first; those still running after ``abandon_after_s`` (or at once, when the old
        chain is broken) are abandoned and, with failure recovery on, retried on the new chain.

        Where no recomputed hop belongs to the old chain, the history each session has so far is prefilled
        on the new chain before the gate closes, while the sessions still step on the old one: the stall
        then recomputes only the tokens added since (on a collapsed link the old chain's steps take
        seconds, and a whole-model prefill of the history on a small device most of a second).
        ``sessions`` may be a live view (a dict's values): it is read again when the gate has closed, so a
        session that started meanwhile moves too.
        """
        recompute = self._recomputed_hops(new_chain, mode, recompute_hops)
        assert self._open_gate is not None and self._idle is not None, "connect() first"

        def current() -> list[Session]:
            return [sessions] if isinstance(sessions, Session) else list(sessions)

        # An earlier switch's old chain must have dropped its copies before sessions move again: a session
        # moving back there would otherwise be dropped after its import.
        for task in list(self._retiring):
            with contextlib.suppress(Exception):
                await task
        t_open = time.perf_counter()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        early = self._prefills(new_chain, recompute)
        ahead = await self._take_ahead(new_chain, recompute, early)
        new_links = ahead.links if ahead is not None else await self._open(new_chain)
        prefilled = ahead.prefilled if ahead is not None else {}
        t_prefill = time.perf_counter()
        try:
            if early:  # what the sessions added since the preparation, or all of it
                await _bounded(
                    self._prefill(current(), new_links[:recompute], prefilled), deadline, "prefill"
                )
        except BaseException:
            await self._forget_moved(current(), self.links, new_links)
            for link in new_links:
                await link.close()
            raise
        t0 = time.perf_counter()
        # Close the gate, let the steps in flight finish: every session now sits between two tokens.
        self._open_gate.clear()
        try:
            abandoned = await self._settle(abandon_after_s)
            t_wait = time.perf_counter()
            moving = current()
            old_links = self.links
            moved_bytes = recomputed = 0
            try:
                for session in moving:
                    nbytes, ntokens = await _bounded(
                        self._move(
                            session, mode, recompute, old_links, new_links, prefilled.get(session.id, 0)
                        ),
                        deadline,
                        "move",
                    )
                    moved_bytes += nbytes
                    recomputed += ntokens
            except BaseException:
                await self._forget_moved(moving, old_links, new_links)
                for link in new_links:
                    await link.close()
                raise
            t_moved = time.perf_counter()
            for link in old_links:
                link.closing = True  # an old hop that dies from now on must not fail the new chain's steps
            self.links, self.chain = new_links, new_chain
            self.broken, broken = None, self.broken
        finally:
            self._announce_switch()
            self._open_gate.set()
        stall_s = time.perf_counter() - t0
        # The sessions already run on the new chain: freeing their KV on the old hops (round trips over
        # what may be a degraded link) goes on in the background, neither stalling them nor the caller.
        leaving = [link for link in old_links if link.hop not in new_chain.hops]
        # A session that ended while it was prefilled left its KV on the new hops.
        ended = [Session(id=sid) for sid in prefilled.keys() - {x.id for x in moving}]
        retire = asyncio.create_task(
            self._retire(old_links, leaving, moving if drop_old else [], broken, new_links[:recompute], ended)
        )
        self._retiring.add(retire)
        retire.add_done_callback(self._retiring.discard)
        return SwitchReport(
            mode=mode,
            recompute_hops=recompute,
            hops=len(new_chain.hops),
            sessions=len(moving),
            kv_bytes_moved=moved_bytes,
            tokens_recomputed=recomputed,
            abandoned_steps=abandoned,
            wait_s=t_wait - t0,
            connect_s=t_prefill - t_open,
            move_s=t_moved - t_wait,
            stall_s=stall_s,
            tokens_prefilled=sum(prefilled.values()),
            prefill_s=t0 - t_prefill,
        )

    async def _forget_moved(
        self, sessions: list[Session], old_links: list[Link], new_links: list[Link]
    ) -> None:
        """After a switch failed midway (prefilling or moving): drop what it already rebuilt of ``sessions``
        on the new hops that the old chain does not use. Left there, a retry of the same switch recomputed
        from position 0 onto that KV and failed with a position mismatch, again and again, until the
        session ended."""
        kept = {link.hop for link in old_links}
        fresh = [link for link in new_links if link.hop not in kept]
        await asyncio.gather(
            *(self._drop_on(fresh, session, 2.0) for session in sessions), return_exceptions=True
        )

    def _recomputed_hops(self, new_chain: Chain, mode: SwitchMode, recompute_hops: int) -> int:
        if new_chain.num_layers != self.chain.num_layers:
            raise LayerRangeError(
                f"the new chain covers {new_chain.num_layers} layers, the old {self.chain.num_layers}"
            )
        if mode not in ("kv", "push", "replay"):
            raise ValueError(f"unknown switch mode {mode!r}; use kv, push or replay")
        hops = len(new_chain.hops)
        recompute = hops if mode == "replay" else recompute_hops
        if not 0 <= recompute <= hops:
            raise ValueError(f"recompute_hops must lie in 0..{hops}, got {recompute_hops}")
        if self.broken is not None and recompute < hops:
            raise ChainError(f"the old chain is broken ({self.broken}): its KV is lost, switch by replay")
        return recompute

    def _prefills(self, new_chain: Chain, recompute: int) -> bool:
        """Whether the sessions' history can be recomputed on the new chain before the gate closes: only
        on hops the old chain does not use (a shared one holds the session's KV, which the old chain's
        steps still extend), and not off a broken chain (its steps stall until the switch anyway)."""
        old_hops = {link.hop for link in self.links}
        return recompute > 0 and self.broken is None and not old_hops & set(new_chain.hops[:recompute])

    async def _prefill(self, sessions: list[Session], links: list[Link], done: dict[str, int]) -> None:
        """Recompute each session's history so far on ``links`` (the new chain's recomputed prefix, which
        the old chain does not use) while the old chain serves on; ``done`` holds, and is updated with,
        how many tokens each session's KV there covers."""
        for session in sessions:
            # Recorded before the forward: a preparation cancelled during it still drops what it reached.
            start = done.setdefault(session.id, 0)
            done[session.id] = start + await self._recompute(session, links, start)

    async def prepare(
        self,
        sessions: Iterable[Session],
        new_chain: Chain,
        mode: SwitchMode = "replay",
        recompute_hops: int = 0,
    ) -> None:
        """Get ready for a ``switch(sessions, new_chain, mode, recompute_hops=...)`` that is coming: open
        the new chain and prefill each session's history so far on its recomputed hops, in the background,
        while the sessions step on the old chain. The switch then only tops the history up (on the demo's
        collapsed link the controller prepares when it decides, and the flow run that deploys the plan
        switches about half a second later). Preparing another chain discards this one; a preparation
        unused after ``AHEAD_TTL_S`` is discarded by the next switch."""
        recompute = self._recomputed_hops(new_chain, mode, recompute_hops)
        if self._ahead is not None:
            stale, self._ahead = self._ahead, None
            await self._discard(stale)
        if not self._prefills(new_chain, recompute):
            return
        ahead = _Ahead(new_chain, recompute, time.monotonic())
        ahead.task = asyncio.create_task(self._fill(ahead, list(sessions)))
        self._ahead = ahead

    def preparing(self, chain: Chain) -> bool:
        """Whether a preparation for ``chain`` is held (running or done)."""
        return self._ahead is not None and self._ahead.chain == chain

    async def _fill(self, ahead: _Ahead, sessions: list[Session]) -> None:
        ahead.links = await self._open(ahead.chain)
        await self._prefill(sessions, ahead.links[: ahead.recompute], ahead.prefilled)

    async def _take_ahead(self, new_chain: Chain, recompute: int, usable: bool) -> _Ahead | None:
        """The preparation for this switch, finished; None (and any other discarded) where there is none,
        it is for another chain, too old, failed, or not ``usable`` (the old chain now shares a hop with
        the recomputed prefix)."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return None
        fits = usable and ahead.chain == new_chain and ahead.recompute == recompute
        if fits and time.monotonic() - ahead.at_s <= AHEAD_TTL_S:
            assert ahead.task is not None
            with contextlib.suppress(Exception):
                await ahead.task
                return ahead
        await self._discard(ahead)
        return None

    async def _discard(self, ahead: _Ahead) -> None:
        """Forget a preparation: its prefilled sessions dropped on its hops, its links closed. Waited for,
        not left to the background: the switch that follows may prefill the same sessions on the same
        servers, and a late drop would erase them there."""
        assert ahead.task is not None
        ahead.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await ahead.task
        try:
            for sid in ahead.prefilled:
                await self._drop_on(ahead.links, Session(id=sid), 2.0)
        finally:
            for link in ahead.links:
                await link.close()

    async def _retire(
        self,
        old_links: list[Link],
        leaving: list[Link],
        sessions: list[Session],
        broken: str | None,
        new_links: Sequence[Link] = (),
        ended: Sequence[Session] = (),
    ) -> None:
        """Drop the moved sessions on the old hops that leave (a hop both chains share keeps them), and the
        ``ended`` ones on ``new_links``, then close the old links. A broken chain's hops may hang: they get
        little time."""
        try:
            for session in ended:
                await self._drop_on(list(new_links), session, 10.0)
            for session in sessions:
                await self._drop_on(leaving, session, 2.0 if broken else 10.0)
        finally:
            for link in old_links:
                await link.close()

    async def _settle(self, abandon_after_s: float | None) -> int:
        """Wait for the steps in flight; abandon them (they fail with :class:`StepAbandonedError`) when the
        chain is broken or they outlast ``abandon_after_s``. Returns how many were abandoned."""
        assert self._idle is not None
        if self.broken is None:
            if abandon_after_s is None:
                await self._idle.wait()
                return 0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), abandon_after_s)
        abandoned = self._inflight
        if abandoned:
            replaced = StepAbandonedError("the chain is being replaced; the step runs on the new one")
            self._fail_requests(set(self.links), replaced)
            await self._idle.wait()
        return abandoned

    def _announce_switch(self) -> None:
        assert self._switched is not None
        self.generation += 1
        done, self._switched = self._switched, asyncio.Event()
        done.set()

    async def _move(
        self,
        session: Session,
        mode: SwitchMode,
        recompute: int,
        old: list[Link],
        new: list[Link],
        prefilled: int = 0,
    ) -> tuple[int, int]:
        """Bring one session onto ``new``; returns (KV bytes moved, tokens recomputed).

        A hop the old chain has too (same server, same range) already holds the session's KV: it moves
        nothing, unless it lies in the recomputed prefix, where it forgets the session and recomputes too.
        It forgets it even when the client counts no tokens yet: an abandoned or failed first step may
        have reached that hop, which then holds the prompt's KV that the client never saw confirmed.
        ``prefilled``: the tokens of history the recomputed prefix already holds (``_prefill``).
        """
        kept = {link.hop for link in old}
        recomputed = 0
        if recompute:
            for link in new[:recompute]:
                if link.hop in kept or prefilled > session.kv_length:
                    await self._control_link(link, "drop", session=session.id)
            prefilled = 0 if prefilled > session.kv_length else prefilled
            recomputed = await self._recompute(session, new[:recompute], prefilled)
        rest = [link for link in new[recompute:] if link.hop not in kept]
        if not rest or session.kv_length == 0:
            return 0, recomputed
        if mode == "kv":
            return await self._move_kv_via_client(session, old, rest), recomputed
        return await self._move_kv_push(session, old, rest), recomputed

    async def _move_kv_via_client(self, session: Session, old: list[Link], new: list[Link]) -> int:
        moved = 0
        for target in new:
            tensors: dict[str, torch.Tensor] = {}
            for source in old:
                first = max(source.hop.first, target.hop.first)
                end = min(source.hop.end, target.hop.end)
                if first >= end:
                    continue
                result, part = await self._control_link(
                    source, "export_kv", session=session.id, first=first, end=end
                )
                if result["length"] != session.kv_length:
                    raise ChainError(
                        f"{source.hop.address} holds {result['length']} tokens of KV for session "
                        f"{session.id}, the client expected {session.kv_length}"
                    )
                tensors.update(part)
            moved += sum(t.numel() * t.element_size() for t in tensors.values())
            await self._control_link(
                target, "import_kv", tensors, session=session.id, length=session.kv_length
            )
        return moved

    async def _move_kv_push(self, session: Session, old: list[Link], new: list[Link]) -> int:
        moved = 0
        for target in new:
            for source in old:
                first = max(source.hop.first, target.hop.first)
                end = min(source.hop.end, target.hop.end)
                if first < end:
                    result, _ = await self._control_link(
                        source, "push_kv", session=session.id, first=first, end=end, target=target.hop.address
                    )
                    if result["length"] != session.kv_length:
                        raise ChainError(
                            f"{source.hop.address} pushed {result['length']} tokens of KV for session "
                            f"{session.id}, the client expected {session.kv_length}"
                        )
                    moved += int(result.get("bytes", 0))
        return moved

    async def _recompute(self, session: Session, links: list[Link], start: int = 0) -> int:
        """Prefill the session's history from ``start`` through ``links`` (a prefix of the new chain, which
        holds its first ``start`` tokens already) to rebuild their KV; returns the tokens recomputed."""
        import torch

        end = session.kv_length
        if end <= start:
            return 0
        history = torch.tensor([session.tokens[start:end]], dtype=torch.int64)
        await self._forward(links, session.id, history, start, None, None, "none", discard_output=True)
        return end - start


async def _bounded(work: Awaitable[T], deadline: float | None, what: str) -> T:
    """``work`` within the monotonic ``deadline`` (None: unbounded); ChainError past it."""
    if deadline is None:
        return await work
    try:
        return await asyncio.wait_for(work, max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        raise ChainError(f"the switch's {what} ran past its time budget; the old chain stays") from None


class ChainClient:
    """Synchronous facade over :class:`AsyncChainClient` with its own event loop."""

    def __init__(self, chain: Chain, auth: bytes | Credentials, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self.inner = AsyncChainClient(chain, auth, **kwargs)
        self._loop.run_until_complete(self.inner.connect())

    @property
    def chain(self) -> Chain:
        return self.inner.chain

    def reconnect(self, chain: Chain) -> None:
        """Close the connections and open new ones to ``chain`` (e.g. after ``load_range`` on its hops)."""
        self._loop.run_until_complete(self.inner.close())
        self.inner = AsyncChainClient(
            chain,
            self.inner.credentials,
            max_frame_bytes=self.inner.max_frame_bytes,
            timeout_s=self.inner.timeout_s,
            wire_dtype=self.inner.wire_dtype,
        )
        self._loop.run_until_complete(self.inner.connect())

    def step(self, session_id: str, inputs: torch.Tensor, position: int, **kwargs: Any) -> StepResult:
        return self._loop.run_until_complete(self.inner.step(session_id, inputs, position, **kwargs))

    def control(
        self, hop_index: int, op: str, tensors: dict[str, torch.Tensor] | None = None, **args: Any
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return self._loop.run_until_complete(self.inner.control(hop_index, op, tensors, **args))

    def stats(self) -> list[dict[str, Any]]:
        return self._loop.run_until_complete(self.inner.stats())

    def generate(
        self,
        session: Session,
        max_new_tokens: int,
        sampling: SamplingParams | None = None,
        stop_ids: Sequence[int] = (),
    ) -> Iterator[int]:
        agen = self.inner.generate(session, max_new_tokens, sampling, stop_ids)
        while True:
            try:
                yield self._loop.run_until_complete(agen.__anext__())
            except StopAsyncIteration:
                return

    def switch(
        self,
        sessions: Session | Sequence[Session],
        new_chain: Chain,
        mode: SwitchMode = "kv",
        drop_old: bool = True,
        **kwargs: Any,
    ) -> SwitchReport:
        return self._loop.run_until_complete(self.inner.switch(sessions, new_chain, mode, drop_old, **kwargs))

    def drop(self, session: Session) -> None:
        self._loop.run_until_complete(self.inner.drop(session))

    def close(self) -> None:
        if not self._loop.is_closed():
            self._loop.run_until_complete(self.inner.close())
            self._loop.close()

    def __enter__(self) -> ChainClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def control_once(
    host: str, port: int, auth: bytes | Credentials, op: str, timeout_s: float, **args: Any
) -> dict[str, Any]:
    """One control op on its own short-lived connection (health checks, reconfiguring a server)."""
    reader, writer = await asyncio.wait_for(open_connection(host, port, auth), timeout_s)
    try:
        await client_handshake(reader, writer, auth, timeout_s)
        write_frame(writer, FrameType.CONTROL, {"op": op, "request_id": op, **args})
        await writer.drain()
        frame = await asyncio.wait_for(read_frame(reader, 1 << 26, timeout_s), timeout_s)
        if frame.type == FrameType.ERROR:
            raise remote_error(frame.header)
        return frame.header.get("result", {})
    finally:
        writer.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m segments.client")
    sub = parser.add_subparsers(dest="cmd", required=True)
    health = sub.add_parser("health", help="exit 0 and print stats JSON when the segment server is healthy")
    health.add_argument("--host", default="127.0.0.1")
    health.add_argument("--port", type=int, required=True)
    health.add_argument("--tls-dir", type=Path, default=None, help="TLS credentials folder (segments.pki)")
    health.add_argument("--secret-file", type=Path, default=None)
    health.add_argument("--timeout-s", type=float, default=5.0)
    args = parser.parse_args(argv)
    try:
        credentials = Credentials.load(args.tls_dir, args.secret_file)
        result = asyncio.run(control_once(args.host, args.port, credentials, "health", args.timeout_s))
    except (
        SecretConfigError,
        PkiError,
        AuthError,
        RemoteError,
        ProtocolError,
        ConnectionClosedError,
        OSError,
        TimeoutError,
    ) as exc:
        print(json.dumps({"healthy": False, "error": f"{type(exc).__name__}: {exc}"}))
        return 1
    print(json.dumps(result))
    return 0 if result.get("healthy") else 1


if __name__ == "__main__":
    sys.exit(main())
