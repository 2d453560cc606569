"""Client side of the segment chain: connections, sessions, generation, switching a session between chains.

* :class:`Chain` names the hops (``host:port`` and layer range) in order.
* :class:`AsyncChainClient` holds one authenticated connection per hop. It sends each step to the first hop
  with the remaining route; the last hop pushes the RESULT on a channel this client subscribed on its
  connection to the last hop, and errors come back along the chain to the first hop's connection.
* :class:`Session` keeps the token history, so a session can always be rebuilt on new segments (replay);
  :meth:`AsyncChainClient.switch` moves a session to a new chain between two tokens by KV export/import
  (through the client or server to server) or by replay.
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
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from segments.auth import AuthError, SecretConfigError, client_handshake, load_secret
from segments.errors import ERRORS_BY_CODE, LayerRangeError, SegmentError, error_for_code
from segments.protocol import (
    ConnectionClosedError,
    Frame,
    FrameType,
    ProtocolError,
    read_frame,
    write_frame,
)
from segments.sampling import SamplingParams

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
class StepResult:
    tokens: list[int] | None
    logits: torch.Tensor | None
    hidden: torch.Tensor | None
    latency_s: float


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
                asyncio.open_connection(self.hop.host, self.hop.port, limit=1 << 20), timeout_s
            )
        except (OSError, TimeoutError) as exc:
            raise ChainError(f"cannot connect to segment server {self.hop.address}: {exc}") from None
        self.identity = await client_handshake(self.reader, self.writer, self.client.secret, timeout_s)
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
                self.client._fail_all(error)

    def send(self, ftype: FrameType, header: dict[str, Any], tensors: dict[str, torch.Tensor] | None) -> None:
        if self.writer is None or self.writer.is_closing():
            raise ChainError(f"connection to {self.hop.address} is closed; reconnect the client")
        write_frame(self.writer, ftype, header, tensors)

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


class AsyncChainClient:
    def __init__(
        self,
        chain: Chain,
        secret: bytes,
        *,
        max_frame_bytes: int = 64 * 1024 * 1024,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        wire_dtype: str = "f32",
    ) -> None:
        self.chain = chain
        self.secret = secret
        self.max_frame_bytes = max_frame_bytes
        self.timeout_s = timeout_s
        self.wire_dtype = wire_dtype
        self.channel = secrets.token_hex(8)
        self.links: list[Link] = []
        self._pending: dict[str, asyncio.Future[Frame]] = {}
        self._ids = itertools.count()
        self._prefix = secrets.token_hex(4)
        # Steps in flight, and a gate a switch closes so that it runs between two tokens of every session.
        self._inflight = 0
        self._idle: asyncio.Event | None = None
        self._open_gate: asyncio.Event | None = None

    # ------------------------------------------------------------------------------- connections

    async def connect(self) -> AsyncChainClient:
        self._idle = asyncio.Event()
        self._idle.set()
        self._open_gate = asyncio.Event()
        self._open_gate.set()
        self.links = await self._open(self.chain)
        return self

    async def _open(self, chain: Chain) -> list[Link]:
        links = [Link(hop, self) for hop in chain.hops]
        try:
            for link in links:
                await link.connect()
            await self._control_link(links[-1], "subscribe", channel=self.channel)
        except BaseException:
            for link in links:
                await link.close()
            raise
        return links

    async def close(self) -> None:
        for link in self.links:
            await link.close()
        self.links = []

    async def __aenter__(self) -> AsyncChainClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _dispatch(self, frame: Frame) -> None:
        rid = frame.header.get("request_id")
        future = self._pending.pop(rid, None) if isinstance(rid, str) else None
        if future is not None and not future.done():
            future.set_result(frame)

    def _fail_all(self, error: Exception) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        self._pending.clear()

    def _new_request(self) -> tuple[str, asyncio.Future[Frame]]:
        rid = f"{self._prefix}-{next(self._ids)}"
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
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

    # ----------------------------------------------------------------------------------- control

    async def _control_link(
        self, link: Link, op: str, tensors: dict[str, torch.Tensor] | None = None, **args: Any
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        rid, future = self._new_request()
        link.send(FrameType.CONTROL, {"op": op, "request_id": rid, **args}, tensors)
        await link.drain()
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
            return await self._step(session_id, inputs, position, attention_mask, sampling, logits)
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()

    async def _step(
        self,
        session_id: str,
        inputs: torch.Tensor,
        position: int,
        attention_mask: torch.Tensor | None,
        sampling: SamplingParams | None,
        logits: str,
    ) -> StepResult:
        t0 = time.perf_counter()
        rid, future = self._new_request()
        route = [link.hop.address for link in self.links[1:]]
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
        }
        tensors = {"x": inputs}
        if attention_mask is not None:
            tensors["mask"] = attention_mask
        first = self.links[0]
        first.send(FrameType.FORWARD, header, tensors)
        await first.drain()
        frame = await self._await(rid, future)
        return StepResult(
            tokens=frame.header.get("tokens"),
            logits=frame.tensors.get("logits"),
            hidden=frame.tensors.get("hidden"),
            latency_s=time.perf_counter() - t0,
        )

    async def generate(
        self,
        session: Session,
        max_new_tokens: int,
        sampling: SamplingParams | None = None,
        stop_ids: Sequence[int] = (),
    ) -> AsyncIterator[int]:
        """Stream new tokens of ``session`` (whose ``tokens`` hold the prompt or the history so far)."""
        import torch

        params = sampling or SamplingParams()
        for _ in range(max_new_tokens):
            pending = session.pending
            if not pending:
                raise ChainError("the session has no pending token to feed; give it a prompt")
            inputs = torch.tensor([pending], dtype=torch.int64)
            result = await self.step(session.id, inputs, session.kv_length, sampling=params)
            assert result.tokens is not None
            session.kv_length += len(pending)
            token = result.tokens[0]
            session.tokens.append(token)
            yield token
            if token in stop_ids:
                return

    # ------------------------------------------------------------------------------------ moving

    async def drop(self, session: Session) -> None:
        """Free the session's KV on every hop (errors ignored: a hop may never have seen it)."""
        for link in self.links:
            with contextlib.suppress(SegmentError, RemoteError):
                await self._control_link(link, "drop", session=session.id)

    async def switch(
        self,
        sessions: Session | Sequence[Session],
        new_chain: Chain,
        mode: SwitchMode = "kv",
        drop_old: bool = True,
    ) -> None:
        """Move ``sessions`` to ``new_chain`` between two tokens; later steps go to the new chain.

        ``kv``: export each old hop's KV and import the layers each new hop serves, through this client;
        ``push``: the old hops send their KV straight to the new hops (server to server);
        ``replay``: rebuild the KV on the new chain from the kept token history (one prefill).
        """
        if new_chain.num_layers != self.chain.num_layers:
            raise LayerRangeError(
                f"the new chain covers {new_chain.num_layers} layers, the old {self.chain.num_layers}"
            )
        if mode not in ("kv", "push", "replay"):
            raise ValueError(f"unknown switch mode {mode!r}; use kv, push or replay")
        assert self._open_gate is not None and self._idle is not None, "connect() first"
        moving = [sessions] if isinstance(sessions, Session) else list(sessions)
        # Close the gate, let the steps in flight finish: every session now sits between two tokens.
        self._open_gate.clear()
        try:
            await self._idle.wait()
            new_links = await self._open(new_chain)
            old_links = self.links
            try:
                for session in moving:
                    await self._move(session, mode, old_links, new_links)
            except BaseException:
                for link in new_links:
                    await link.close()
                raise
            if drop_old:
                for session in moving:
                    await self.drop(session)
            self.links, self.chain = new_links, new_chain
            for link in old_links:
                await link.close()
        finally:
            self._open_gate.set()

    async def _move(self, session: Session, mode: SwitchMode, old: list[Link], new: list[Link]) -> None:
        if mode == "kv":
            await self._move_kv_via_client(session, old, new)
        elif mode == "push":
            await self._move_kv_push(session, old, new)
        else:
            await self._replay(session, new)

    async def _move_kv_via_client(self, session: Session, old: list[Link], new: list[Link]) -> None:
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
            await self._control_link(
                target, "import_kv", tensors, session=session.id, length=session.kv_length
            )

    async def _move_kv_push(self, session: Session, old: list[Link], new: list[Link]) -> None:
        for target in new:
            for source in old:
                first = max(source.hop.first, target.hop.first)
                end = min(source.hop.end, target.hop.end)
                if first < end:
                    await self._control_link(
                        source, "push_kv", session=session.id, first=first, end=end, target=target.hop.address
                    )

    async def _replay(self, session: Session, new: list[Link]) -> None:
        import torch

        if session.kv_length == 0:
            return
        saved = self.links
        self.links = new
        try:
            history = torch.tensor([session.tokens[: session.kv_length]], dtype=torch.int64)
            await self._step(session.id, history, 0, None, None, "none")
        finally:
            self.links = saved


class ChainClient:
    """Synchronous facade over :class:`AsyncChainClient` with its own event loop."""

    def __init__(self, chain: Chain, secret: bytes, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self.inner = AsyncChainClient(chain, secret, **kwargs)
        self._loop.run_until_complete(self.inner.connect())

    @property
    def chain(self) -> Chain:
        return self.inner.chain

    def reconnect(self, chain: Chain) -> None:
        """Close the connections and open new ones to ``chain`` (e.g. after ``load_range`` on its hops)."""
        self._loop.run_until_complete(self.inner.close())
        self.inner = AsyncChainClient(
            chain,
            self.inner.secret,
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
    ) -> None:
        self._loop.run_until_complete(self.inner.switch(sessions, new_chain, mode, drop_old))

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
    host: str, port: int, secret: bytes, op: str, timeout_s: float, **args: Any
) -> dict[str, Any]:
    """One control op on its own short-lived connection (health checks, reconfiguring a server)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    try:
        await client_handshake(reader, writer, secret, timeout_s)
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
    health.add_argument("--secret-file", type=Path, default=None)
    health.add_argument("--timeout-s", type=float, default=5.0)
    args = parser.parse_args(argv)
    try:
        secret = load_secret(args.secret_file)
        result = asyncio.run(control_once(args.host, args.port, secret, "health", args.timeout_s))
    except (
        SecretConfigError,
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
