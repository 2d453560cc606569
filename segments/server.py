"""The segment server: one process serving the half-open layer range ``[first, end)`` of one model.

``python -m segments.server --store DIR --model M --first F --end E --host H --port P --secret-file FILE``
prints ``{"ready": true, "port": P}`` once it accepts connections and exits cleanly on SIGTERM (after
draining). ``--port 0`` picks a free port (the ready line names it).

Design (see docs/segments-wire.md):

* I/O runs on one asyncio loop; all model compute runs on ONE worker thread (torch threads = ``--threads``),
  so a long prefill never blocks reading, forwarding or answering health checks. The worker is FIFO, so
  the steps of a session run in the order they arrived.
* Chained forwarding: a FORWARD frame carries the remaining route (``host:port`` of the next hops). The
  server keeps one persistent, authenticated connection per next hop and sends its output on; the last hop
  samples the token (or returns logits / hidden states on request) and pushes a RESULT frame on the
  client's *channel*: a connection the client opened to the last hop and subscribed with a channel id.
  Results thus take one hop back to the client, not the whole chain.
* Errors travel back: a hop that fails a request sends an ERROR frame (with the request id) on the
  connection the request arrived on; upstream hops relay it, so the client hears it on its connection to
  the first hop. A malformed frame gets an ERROR reply and the connection is closed; a well-formed request
  that fails (position mismatch, session or KV limit) gets an ERROR and the connection stays open.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import json
import logging
import os
import signal
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segments import pki
from segments.auth import (
    AuthError,
    Credentials,
    client_handshake,
    open_connection,
    server_handshake,
    set_congestion_control,
)
from segments.protocol import (
    FLOAT_WIRE_DTYPES,
    ConnectionClosedError,
    Frame,
    FrameType,
    ProtocolError,
    error_header,
    optional,
    read_frame,
    require,
    str_list,
    torch_dtype,
    write_frame,
)
from segments.sampling import SamplingError, SamplingParams, sample_tokens
from segments.telemetry import HopStamp, TraceError, check_trace

if TYPE_CHECKING:
    import torch

log = logging.getLogger("segments.server")


def can_restore_priority() -> bool:
    """Whether this process may lower its nice value again once raised: with CAP_SYS_NICE or an
    RLIMIT_NICE that reaches nice 0 (20 - limit <= 0). Docker drops CAP_SYS_NICE even for root."""
    import resource

    soft, _hard = resource.getrlimit(resource.RLIMIT_NICE)
    if soft == resource.RLIM_INFINITY or soft >= 20:
        return True
    try:
        with open("/proc/self/status") as fh:
            caps = next(line for line in fh if line.startswith("CapEff:"))
    except (OSError, StopIteration):
        return False
    return bool(int(caps.split()[1], 16) >> 23 & 1)  # bit 23: CAP_SYS_NICE


def _normal_priority() -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 0)
    except OSError as exc:
        log.warning("could not take normal CPU priority back: %s", exc)


MAX_ID_CHARS = 128
# A standby boots at this niceness (the lowest priority) until it is given work.
BACKGROUND_NICE = 19
# Requests whose error must find its way back upstream; bounded so a flood cannot grow it without end.
MAX_TRACKED_REQUESTS = 65_536
GC_EVERY_S = 5.0  # a full collection this often (SegmentServer._collect_garbage)
LOGITS_MODES = ("none", "last", "all")


class BadRequestError(ProtocolError):
    """A well-framed request that makes no sense for this segment (wrong shape, broken route): it fails
    alone, the connection stays."""

    code = "bad_request"


class ForbiddenError(BadRequestError):
    """The peer's identity may not do this (a segment server asking to load a range, say)."""

    code = "forbidden"


class DrainingError(Exception):
    code = "draining"


class UnreachableError(Exception):
    code = "unreachable"


@dataclass(frozen=True)
class ServerLimits:
    max_frame_bytes: int
    max_sessions: int
    max_kv_bytes: int
    threads: int
    handshake_timeout_s: float = 5.0
    frame_timeout_s: float = 10.0
    peer_timeout_s: float = 10.0
    session_idle_s: float = 600.0  # a session unused this long is dropped (its gateway left without it)
    # One-token steps of up to this many sessions that wait for the compute thread together run as one
    # forward pass (1: each alone, bit for bit the whole model's; see ``SegmentServer._run_steps``).
    max_batch: int = 1


@dataclass
class Stats:
    started_s: float = field(default_factory=time.monotonic)
    bytes_in: int = 0
    bytes_out: int = 0
    frames_in: int = 0
    frames_out: int = 0
    forwards: int = 0
    errors: int = 0
    busy_s: float = 0.0
    queue_len: int = 0
    connections: int = 0
    batches: int = 0  # forward passes that ran batched decode steps (``max_batch`` > 1)
    batched_steps: int = 0
    largest_batch: int = 0


def _settle(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    """Resolve ``future`` on its loop (a request whose connection went may have cancelled it)."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


def rss_bytes() -> int:
    """Resident memory of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _check_id(header: dict[str, Any], key: str) -> str:
    value = require(header, key, str)
    if not value or len(value) > MAX_ID_CHARS:
        raise ProtocolError(f"{key} must have 1..{MAX_ID_CHARS} characters")
    return value


def parse_hop(hop: str) -> tuple[str, int]:
    host, sep, port_text = hop.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise BadRequestError(f"route hop {hop!r} is not host:port")
    return host, int(port_text)


@dataclass(frozen=True)
class ForwardRequest:
    session: str
    request_id: str
    position: int
    layer: int
    route: tuple[str, ...]
    channel: str
    wire_dtype: str
    logits: str
    sampling: SamplingParams | None
    x: torch.Tensor
    mask: torch.Tensor | None
    # The hop that ends the route answers with no tensors (a recompute prefill only rebuilds KV).
    discard_output: bool = False
    # Telemetry (segments.telemetry): the client's send time and the hops' entries so far; None: untraced.
    t0: float | None = None
    trace: tuple[list[float], ...] = ()
    arrived_s: float = 0.0
    bytes_in: int = 0

    @classmethod
    def from_frame(cls, frame: Frame, arrived_s: float = 0.0) -> ForwardRequest:
        h = frame.header
        try:
            traced = check_trace(h)
        except TraceError as exc:
            raise BadRequestError(str(exc)) from None
        route = tuple(str_list(h, "route"))
        for hop in route:
            parse_hop(hop)
        wire = optional(h, "wire_dtype", str, "f32")
        if wire not in FLOAT_WIRE_DTYPES:
            raise BadRequestError(f"wire_dtype must be one of {FLOAT_WIRE_DTYPES}, got {wire!r}")
        logits = optional(h, "logits", str, "none")
        if logits not in LOGITS_MODES:
            raise BadRequestError(f"logits must be one of {LOGITS_MODES}, got {logits!r}")
        raw_sampling = optional(h, "sampling", dict, None)
        try:
            sampling = None if raw_sampling is None else SamplingParams.from_dict(raw_sampling)
        except (SamplingError, TypeError) as exc:
            raise BadRequestError(str(exc)) from None
        position = require(h, "position", int)
        layer = require(h, "layer", int)
        if position < 0 or layer < 0:
            raise BadRequestError("position and layer must be >= 0")
        if set(frame.tensors) - {"x", "mask"} or "x" not in frame.tensors:
            raise BadRequestError("a FORWARD frame carries tensor 'x' and optionally 'mask', nothing else")
        return cls(
            session=_check_id(h, "session"),
            request_id=_check_id(h, "request_id"),
            position=position,
            layer=layer,
            route=route,
            channel=_check_id(h, "channel"),
            wire_dtype=wire,
            logits=logits,
            sampling=sampling,
            x=frame.tensors["x"],
            mask=frame.tensors.get("mask"),
            discard_output=optional(h, "discard_output", bool, False),
            t0=None if traced is None else traced[0],
            trace=() if traced is None else tuple(traced[1]),
            arrived_s=arrived_s,
            bytes_in=frame.wire_bytes,
        )

    def traced(self, stamp: HopStamp) -> dict[str, Any]:
        """The telemetry fields of the next frame (FORWARD or RESULT), with this hop's entry appended."""
        if self.t0 is None:
            return {}
        return {"t0": self.t0, "trace": [*self.trace, stamp.entry(self.t0)]}

    def next_header(self, end: int) -> dict[str, Any]:
        return {
            "session": self.session,
            "request_id": self.request_id,
            "position": self.position,
            "layer": end,
            "route": list(self.route[1:]),
            "channel": self.channel,
            "wire_dtype": self.wire_dtype,
            "logits": self.logits,
            "sampling": None if self.sampling is None else self.sampling.to_dict(),
            "discard_output": self.discard_output,
        }


@dataclass
class Connection:
    """One accepted (upstream) connection."""

    writer: asyncio.StreamWriter
    peer: str
    identity: str = ""  # who authenticated (a certificate's common name)
    role: str = "unknown"  # what that identity may do (segments.pki.role_of), fixed at the handshake
    channels: set[str] = field(default_factory=set)
    closed: bool = False
    # Requests of this connection still computing: a peer that half-closes still gets their replies.
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


class PeerLink:
    """A persistent, authenticated connection to a next hop. Its reader relays ERROR frames upstream and
    resolves control replies (server-to-server KV transfer)."""

    def __init__(self, server: SegmentServer, hop: str) -> None:
        self.server = server
        self.hop = hop
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.pending: dict[str, asyncio.Future[Frame]] = {}
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    @property
    def alive(self) -> bool:
        return self.writer is not None and not self.writer.is_closing()

    @property
    def idle_and_closed(self) -> bool:
        """Not connected (closed, or its hop never answered) and nobody connecting or waiting on it: safe
        to forget. A coroutine that looks a link up takes its lock before it first yields."""
        return not self.alive and not self.pending and not self._lock.locked()

    async def ensure(self) -> asyncio.StreamWriter:
        async with self._lock:
            if self.alive:
                assert self.writer is not None
                return self.writer
            host, port = parse_hop(self.hop)
            timeout_s = self.server.limits.peer_timeout_s
            try:
                reader, writer = await asyncio.wait_for(
                    open_connection(host, port, self.server.credentials), timeout_s
                )
            except (OSError, TimeoutError) as exc:
                raise UnreachableError(f"next hop {self.hop} is unreachable: {exc}") from None
            try:
                await client_handshake(reader, writer, self.server.credentials, timeout_s)
            except (AuthError, ProtocolError, ConnectionClosedError, OSError) as exc:
                writer.close()
                raise UnreachableError(f"next hop {self.hop} refused the connection: {exc}") from None
            self.reader, self.writer = reader, writer
            self._task = asyncio.create_task(self._read_loop(reader))
            return writer

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                frame = await read_frame(reader, self.server.limits.max_frame_bytes, 3600.0)
                self.server.stats.bytes_in += frame.wire_bytes
                rid = frame.header.get("request_id")
                future = self.pending.pop(rid, None) if isinstance(rid, str) else None
                if future is not None and not future.done():
                    future.set_result(frame)
                elif frame.type == FrameType.ERROR:
                    self.server.relay_error_upstream(frame.header)
        except (ConnectionClosedError, ProtocolError, OSError) as exc:
            log.info("link to %s closed: %s", self.hop, exc)
        finally:
            for future in self.pending.values():
                if not future.done():
                    future.set_exception(UnreachableError(f"link to {self.hop} closed"))
            self.pending.clear()
            if self.writer is not None:
                self.writer.close()

    async def request(self, header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Frame:
        writer = await self.ensure()
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self.pending[header["request_id"]] = future
        self.server.stats.bytes_out += write_frame(writer, FrameType.CONTROL, header, tensors)
        await writer.drain()
        return await asyncio.wait_for(future, self.server.limits.peer_timeout_s * 6)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


class SegmentServer:
    def __init__(
        self,
        store_dir: Path,
        model: str,
        first: int,
        end: int,
        auth: bytes | Credentials,
        limits: ServerLimits,
    ) -> None:
        self.store_dir = store_dir
        self.model = model
        self.first = first
        self.end = end
        self.credentials = Credentials.of(auth)
        self.limits = limits
        self.stats = Stats()
        self.runner: Any = None
        self.kv_bytes = 0
        self.session_count = 0
        self.draining = False
        self.channels: dict[str, Connection] = {}
        self.links: dict[str, PeerLink] = {}
        self.upstream: OrderedDict[str, Connection] = OrderedDict()
        # Segment identities that may step this server: the hops before it in the chains it serves in,
        # as the gateways that built those chains said (allow_upstream). Oldest first; bounded.
        self.allowed_upstream: OrderedDict[str, None] = OrderedDict()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="segment-compute")
        self.background = False  # started at low priority (a standby) and not yet given work
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._collector: asyncio.Task[None] | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        # One-token steps waiting for the next batch (appended on the loop, taken on the compute thread).
        self._steps: list[tuple[ForwardRequest, asyncio.Future[Any]]] = []
        self._steps_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------------------------ lifecycle

    def _load_runner(self, first: int, end: int, model: str | None = None) -> Any:
        import torch

        from segments.runner import SegmentRunner
        from segments.spec import SegmentSpec

        torch.set_num_threads(self.limits.threads)
        return SegmentRunner(
            self.store_dir,
            SegmentSpec(model or self.model, first, end),
            max_sessions=self.limits.max_sessions,
            max_kv_bytes=self.limits.max_kv_bytes,
        )

    async def start(self, host: str, port: int, *, verify_store: bool = False) -> int:
        """Load the range and listen. ``verify_store`` first hashes every file of the model, so any range
        ``load_range`` is given later is loaded without reading the store again (a warm standby)."""
        loop = self._loop = asyncio.get_running_loop()
        if verify_store:
            from segments import store

            await loop.run_in_executor(self.executor, store.verify, self.store_dir, self.model)
        self.runner = await loop.run_in_executor(self.executor, self._load_runner, self.first, self.end)
        self._server = await asyncio.start_server(
            self._handle, host, port, limit=1 << 20, ssl=self.credentials.server_ssl,
            ssl_handshake_timeout=self.limits.handshake_timeout_s if self.credentials.server_ssl else None,
        )  # fmt: skip
        self._sweeper = asyncio.create_task(self._sweep_idle())
        self._collector = asyncio.create_task(self._collect_garbage())
        return self._server.sockets[0].getsockname()[1]

    async def _collect_garbage(self) -> None:
        """A full collection every few seconds, over what is not frozen. A failed TLS handshake leaves
        reference cycles holding its buffers (CPython gh-109534, 3.11), which otherwise wait for a full
        collection that the process's long-lived objects make rare: hostile handshakes grew a server by
        200 MiB per 15,000 (bench fuzz), 85 MiB with this. What is alive once the range is loaded (torch,
        transformers, the modules) lives as long as the process: frozen, out of the collector's sight, a
        collection costs ~0.3 ms when there is nothing to free."""
        gc.freeze()
        while True:
            await asyncio.sleep(GC_EVERY_S)
            gc.collect()

    async def _sweep_idle(self) -> None:
        """Evict idle sessions every quarter of the idle limit, on the compute thread (between steps)."""
        loop = asyncio.get_running_loop()
        every_s = min(60.0, self.limits.session_idle_s / 4)
        while True:
            await asyncio.sleep(every_s)
            runner = self.runner
            evicted = await loop.run_in_executor(self.executor, runner.evict_idle, self.limits.session_idle_s)
            if evicted:
                log.warning("evicted %d sessions idle for %.0f s", len(evicted), self.limits.session_idle_s)
                self.kv_bytes = runner.kv_bytes()
                self.session_count = len(runner.sessions())

    async def drain(self, timeout_s: float = 30.0) -> None:
        """Refuse new sessions and wait for queued compute to finish."""
        self.draining = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)

    async def close(self) -> None:
        for task in (self._sweeper, self._collector):
            if task is not None:
                task.cancel()
        if self._server is not None:
            self._server.close()
        for link in list(self.links.values()):
            await link.close()
        # End the connection handlers ourselves, so none is cancelled half-way by the loop's shutdown.
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=2.0)
        self.executor.shutdown(wait=True)

    def identity(self) -> dict[str, Any]:
        return {"model": self.model, "first": self.first, "end": self.end}

    # ----------------------------------------------------------------------------------- compute

    def _submit(self, fn: Callable[[], Any]) -> asyncio.Future[Any]:
        """Queue ``fn`` on the compute thread now (FIFO order = arrival order)."""
        self.stats.queue_len += 1
        self._idle.clear()

        def timed() -> Any:
            t0 = time.perf_counter()
            try:
                return fn()
            finally:
                self.stats.busy_s += time.perf_counter() - t0
                if self.runner is not None:
                    self.kv_bytes = self.runner.kv_bytes()
                    self.session_count = len(self.runner.sessions())

        future = asyncio.get_running_loop().run_in_executor(self.executor, timed)

        def done(_: asyncio.Future[Any]) -> None:
            self.stats.queue_len -= 1
            if self.stats.queue_len == 0:
                self._idle.set()

        future.add_done_callback(done)
        return future

    def _validate_forward(self, req: ForwardRequest) -> None:
        info = self.runner.info
        if req.layer != self.first:
            raise BadRequestError(
                f"activations for layer {req.layer} reached a segment serving [{self.first}, {self.end}); "
                "the route does not match the chain"
            )
        if self.runner.is_last and req.route:
            raise BadRequestError("this is the last segment, but the route names further hops")
        if not self.runner.is_last and not req.route and not req.discard_output:
            raise BadRequestError(f"the route ends at layer {self.end}; the model has {info.num_layers}")
        x = req.x
        if self.runner.is_first:
            if x.dtype != torch_dtype("i64") or x.dim() != 2 or 0 in x.shape:
                raise BadRequestError(
                    f"the first segment takes int64 token ids [B, T], got {x.dtype} {tuple(x.shape)}"
                )
            if int(x.min()) < 0 or int(x.max()) >= info.vocab_size:
                raise BadRequestError(f"token ids must lie in [0, {info.vocab_size})")
        elif x.dim() != 3 or x.shape[-1] != info.hidden_size or 0 in x.shape or not x.is_floating_point():
            raise BadRequestError(
                f"this segment takes float hidden states [B, T, {info.hidden_size}], got {x.dtype} "
                f"{tuple(x.shape)}"
            )
        if req.mask is not None:
            b, t = x.shape[0], x.shape[1]
            if req.mask.dtype != torch_dtype("i64") or tuple(req.mask.shape) != (b, req.position + t):
                raise BadRequestError(f"mask must be int64 [B, position + T] = [{b}, {req.position + t}]")

    def _compute_forward(self, req: ForwardRequest) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return self._output(req, self.runner.forward(req.session, self._inputs(req), req.position, req.mask))

    def _inputs(self, req: ForwardRequest) -> torch.Tensor:
        import torch

        return req.x if self.runner.is_first else req.x.to(torch.float32)

    def _output(self, req: ForwardRequest, out: torch.Tensor) -> Result:
        """What the hop sends on: the next hop's input, or on the last hop the token, logits or states."""
        if not self.runner.is_last:
            return {}, {"x": out.to(torch_dtype(req.wire_dtype))}
        result: dict[str, Any] = {}
        tensors: dict[str, torch.Tensor] = {}
        if self.runner.info.kind != "causal_lm":
            tensors["hidden"] = out
            return result, tensors
        if req.sampling is not None:
            # The position of the token whose logits are sampled, not the step's first: a prompt fed in
            # chunks (``AsyncChainClient.generate``) draws what it draws fed at once.
            result["tokens"] = sample_tokens(out[:, -1, :], req.sampling, req.position + out.shape[1] - 1)
        if req.logits == "last":
            tensors["logits"] = out[:, -1:, :]
        elif req.logits == "all":
            tensors["logits"] = out
        return result, tensors

    # ----------------------------------------------------------------------------------- connections

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = str(writer.get_extra_info("peername"))
        set_congestion_control(writer)
        conn = Connection(writer, peer)
        self.stats.connections += 1
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            try:
                conn.identity = await server_handshake(
                    reader, writer, self.credentials, self.identity(), self.limits.handshake_timeout_s
                )
                conn.role = pki.role_of(conn.identity)
            except (AuthError, ProtocolError) as exc:
                self._send_error(conn, getattr(exc, "code", "auth"), str(exc))
                return
            await self._serve(conn, reader)
        except (ConnectionClosedError, ConnectionError, asyncio.CancelledError):
            pass  # the peer left, or the server is shutting down: nothing to answer
        finally:
            self._close_conn(conn)
            if task is not None:
                self._handlers.discard(task)

    async def _serve(self, conn: Connection, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                frame = await read_frame(reader, self.limits.max_frame_bytes, self.limits.frame_timeout_s)
            except ConnectionClosedError:
                if conn.tasks:
                    await asyncio.wait(list(conn.tasks), timeout=self.limits.peer_timeout_s * 6)
                return
            except ProtocolError as exc:
                self._send_error(conn, exc.code, str(exc))
                return
            arrived_s = time.time()
            self.stats.frames_in += 1
            self.stats.bytes_in += frame.wire_bytes
            try:
                if frame.type == FrameType.FORWARD:
                    self._on_forward(conn, frame, arrived_s)
                elif frame.type == FrameType.CONTROL:
                    self._on_control(conn, frame)
                else:
                    raise ProtocolError(f"a server accepts FORWARD and CONTROL frames, not {frame.type.name}")
            except ProtocolError as exc:
                rid = frame.header.get("request_id")
                self._send_error(conn, exc.code, str(exc), rid if isinstance(rid, str) else None)
                # A well-framed request that makes no sense fails alone: the stream is still in step, and
                # the connection carries the gateway's other sessions. Anything else ends it.
                if not isinstance(exc, BadRequestError):
                    return
            await conn.writer.drain()

    def _close_conn(self, conn: Connection) -> None:
        conn.closed = True
        for channel in conn.channels:
            if self.channels.get(channel) is conn:
                del self.channels[channel]
        # close() flushes what is buffered (the error frame) before the FIN.
        conn.writer.close()

    def _write(
        self,
        conn: Connection,
        ftype: FrameType,
        header: dict[str, Any],
        tensors: dict[str, torch.Tensor] | None = None,
    ) -> None:
        if conn.closed or conn.writer.is_closing():
            return
        self.stats.bytes_out += write_frame(conn.writer, ftype, header, tensors)
        self.stats.frames_out += 1

    def _send_error(self, conn: Connection, code: str, message: str, request_id: str | None = None) -> None:
        self.stats.errors += 1
        self._write(conn, FrameType.ERROR, error_header(code, message, request_id))

    def relay_error_upstream(self, header: dict[str, Any]) -> None:
        rid = header.get("request_id")
        conn = self.upstream.pop(rid, None) if isinstance(rid, str) else None
        if conn is not None:
            self._write(conn, FrameType.ERROR, header)

    def _track(self, request_id: str, conn: Connection) -> None:
        self.upstream[request_id] = conn
        self.upstream.move_to_end(request_id)
        while len(self.upstream) > MAX_TRACKED_REQUESTS:
            self.upstream.popitem(last=False)

    # ----------------------------------------------------------------------------------- forward

    def promote(self) -> None:
        """Normal CPU priority for a standby given work: the loop's thread and the compute thread (Linux
        keeps a nice value per thread)."""
        if not self.background:
            return
        self.background = False
        try:
            os.setpriority(os.PRIO_PROCESS, 0, 0)
        except OSError as exc:  # checked at start; a failure here must not cost the request
            log.warning("could not take normal CPU priority back: %s", exc)
        self.executor.submit(_normal_priority)

    def _on_forward(self, conn: Connection, frame: Frame, arrived_s: float) -> None:
        _allow(conn, "forward", FORWARD_ROLES)
        if conn.role == "segment" and conn.identity not in self.allowed_upstream:
            raise ForbiddenError(
                f"{conn.identity!r} is not the hop before this one in any chain a gateway built through it"
            )
        self.promote()
        req = ForwardRequest.from_frame(frame, arrived_s)
        self._validate_forward(req)
        self.stats.forwards += 1
        if self.draining and req.position == 0:
            self._send_error(
                conn,
                DrainingError.code,
                "this segment is draining and takes no new sessions; use another chain",
                req.request_id,
            )
            return
        self._track(req.request_id, conn)
        if self._batchable(req):
            future = self._batched(req)
        else:
            future = self._submit(lambda: self._timed_forward(req))
        conn.spawn(self._finish_forward(conn, req, future))

    def _batchable(self, req: ForwardRequest) -> bool:
        """A decode step: one token of one row of a session already begun, without a mask."""
        return (
            self.limits.max_batch > 1
            and not self.runner.is_encoder
            and req.position > 0
            and req.mask is None
            and tuple(req.x.shape[:2]) == (1, 1)
        )

    def _batched(self, req: ForwardRequest) -> asyncio.Future[Any]:
        """Queue a decode step for the next batch; the first step to wait queues the batch's run."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        with self._steps_lock:
            self._steps.append((req, future))
            first = len(self._steps) == 1
        if first:
            self._submit(self._run_steps)
        return future

    def _run_steps(self) -> None:
        """On the compute thread: the decode steps that queued while it was busy, up to ``max_batch``, as
        one forward pass (continuous batching: sessions join and leave between passes, none waits for a
        batch to fill). Each step's stamp has the pass's wall time, which it waited, and its share of the
        CPU. A step refused (its position, the session limits) fails alone."""
        with self._steps_lock:
            taken, self._steps = self._steps[: self.limits.max_batch], self._steps[self.limits.max_batch :]
            more = bool(self._steps)
        assert self._loop is not None
        if more:  # the rest run next, after what queued meanwhile
            self._loop.call_soon_threadsafe(self._submit, self._run_steps)
        if not taken:
            return
        started_s, cpu0 = time.time(), time.thread_time()
        try:
            steps = [(r.session, self._inputs(r), r.position) for r, _ in taken]
            outs: list[Any] = self.runner.forward_batch(steps)
        except Exception as exc:  # the pass failed: every step in it fails, the sessions are as they were
            outs = [exc] * len(taken)
        done_s = time.time()
        cpu_s = (time.thread_time() - cpu0) / len(taken)
        self.stats.batches += 1
        self.stats.batched_steps += len(taken)
        self.stats.largest_batch = max(self.stats.largest_batch, len(taken))
        for (req, future), out in zip(taken, outs, strict=True):
            try:
                if isinstance(out, Exception):
                    raise out
                stamp = HopStamp(
                    first=self.first, arrived_s=req.arrived_s, queue_s=max(0.0, started_s - req.arrived_s),
                    compute_s=done_s - started_s, cpu_s=cpu_s, left_s=done_s, bytes_in=req.bytes_in,
                )  # fmt: skip
                self._loop.call_soon_threadsafe(_settle, future, (self._output(req, out), stamp), None)
            except Exception as exc:
                self._loop.call_soon_threadsafe(_settle, future, None, exc)

    def _timed_forward(self, req: ForwardRequest) -> tuple[Result, HopStamp]:
        """The forward and what it cost this hop: queue, wall and CPU time (the compute thread's own,
        which neither a CPU quota's throttling nor other processes' preemption inflate)."""
        started_s, cpu0 = time.time(), time.thread_time()
        out = self._compute_forward(req)
        done_s = time.time()
        stamp = HopStamp(
            first=self.first, arrived_s=req.arrived_s, queue_s=max(0.0, started_s - req.arrived_s),
            compute_s=done_s - started_s, cpu_s=time.thread_time() - cpu0, left_s=done_s,
            bytes_in=req.bytes_in,
        )  # fmt: skip
        return out, stamp

    async def _finish_forward(
        self, conn: Connection, req: ForwardRequest, future: asyncio.Future[Any]
    ) -> None:
        try:
            (result, tensors), stamp = await future
            stamp = dataclasses.replace(stamp, left_s=time.time())
            if req.route:
                await self._send_on(req, tensors, stamp)
            else:
                self._deliver(req, {**result, **req.traced(stamp)}, tensors)
        except Exception as exc:  # the request fails, the server and other sessions go on
            code = getattr(exc, "code", "internal")
            if code == "internal":
                log.exception("forward failed")
            self.upstream.pop(req.request_id, None)
            self._send_error(conn, code, f"{type(exc).__name__}: {exc}", req.request_id)

    async def _send_on(self, req: ForwardRequest, tensors: dict[str, torch.Tensor], stamp: HopStamp) -> None:
        link = self.peer(req.route[0])
        writer = await link.ensure()
        if req.mask is not None:
            tensors = {**tensors, "mask": req.mask}
        header = {**req.next_header(self.end), **req.traced(stamp)}
        self.stats.bytes_out += write_frame(writer, FrameType.FORWARD, header, tensors)
        self.stats.frames_out += 1
        await writer.drain()

    def _deliver(self, req: ForwardRequest, result: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        target = self.channels.get(req.channel)
        if target is None:
            raise UnreachableError(f"no client is subscribed to channel {req.channel!r} on the last hop")
        self.upstream.pop(req.request_id, None)
        header = {"request_id": req.request_id, "session": req.session, "position": req.position, **result}
        self._write(target, FrameType.RESULT, header, {} if req.discard_output else tensors)

    # ----------------------------------------------------------------------------------- control

    def _on_control(self, conn: Connection, frame: Frame) -> None:
        op = require(frame.header, "op", str)
        rid = _check_id(frame.header, "request_id")
        handler = _CONTROL_OPS.get(op)
        if handler is None:
            raise BadRequestError(f"unknown control op {op!r}; known: {', '.join(sorted(_CONTROL_OPS))}")
        _allow(conn, op, _OP_ROLES[op])
        conn.spawn(self._run_control(conn, handler, frame, rid))

    async def _run_control(self, conn: Connection, handler: Any, frame: Frame, rid: str) -> None:
        try:
            result, tensors = await handler(self, conn, frame)
            self._write(conn, FrameType.REPLY, {"request_id": rid, "ok": True, "result": result}, tensors)
        except Exception as exc:
            code = getattr(exc, "code", "internal")
            if code == "internal":
                log.exception("control op failed")
            self._send_error(conn, code, f"{type(exc).__name__}: {exc}", rid)
        with contextlib.suppress(Exception):
            await conn.writer.drain()

    def peer(self, hop: str) -> PeerLink:
        """The link to ``hop``, made on first use. Making one forgets the links that died and are idle:
        kept, every next hop a chain ever had (a killed server's replacement listens on a new port)
        stayed in the table with its closed connection's objects, for the server's lifetime."""
        link = self.links.get(hop)
        if link is None:
            for old, dead in list(self.links.items()):
                if dead.idle_and_closed:
                    del self.links[old]
            link = self.links[hop] = PeerLink(self, hop)
        return link

    def stats_dict(self) -> dict[str, Any]:
        s = self.stats
        return {
            "model": self.model,
            "first": self.first,
            "end": self.end,
            "draining": self.draining,
            "uptime_s": round(time.monotonic() - s.started_s, 3),
            "queue_len": s.queue_len,
            "busy_s": round(s.busy_s, 6),
            "bytes_in": s.bytes_in,
            "bytes_out": s.bytes_out,
            "frames_in": s.frames_in,
            "frames_out": s.frames_out,
            "forwards": s.forwards,
            "batches": s.batches,
            "batched_steps": s.batched_steps,
            "largest_batch": s.largest_batch,
            "errors": s.errors,
            "connections": s.connections,
            "sessions": self.session_count,
            "kv_bytes": self.kv_bytes,
            "peer_links": len(self.links),
            "rss_bytes": rss_bytes(),
            "pid": os.getpid(),
        }


Result = tuple[dict[str, Any], dict[str, "torch.Tensor"]]


async def _op_health(server: SegmentServer, conn: Connection, frame: Frame) -> Result:
    return {"healthy": server.runner is not None, **server.stats_dict()}, {}


async def _op_stats(server: SegmentServer, conn: Connection, frame: Frame) -> Result:
    return server.stats_dict(), {}


async def _op_subscribe(server: SegmentServer, conn: Connection, frame: Frame) -> Result:
    channel = _check_id(frame.header, "channel")
    server.channels[channel] = conn
    conn.channels.add(channel)
    return {"channel": channel}, {}


MAX_ALLOWED_UPSTREAM = 256


async def _op_allow_upstream(server: SegmentServer, conn: Connection, frame: Frame) -> Result:
    """The segment identities that precede this server in a chain the caller (a gateway) built: only they
    may send it FORWARD frames, besides the gateway and the orchestrator themselves."""
    identities = frame.header.get("identities")
    if not isinstance(identities, list) or not 0 < len(identities) <= 16:
        raise BadRequestError("identities must be a list of 1 to 16 segment identities")
    for identity in identities:
        if not isinstance(identity, str) or len(identity) > 128 or pki.role_of(identity) != "segment":
            raise BadRequestError(f"{identity!r} is not a segment identity")
    for identity in identities:
        server.allowed_upstream[identity] = None
        server.allowed_upstream.move_to_end(identity)
    while len(server.allowed_upstream) > MAX_ALLOWED_UPSTREAM:
        server.allowed_upstream.popitem(last=False)
    return {"allowed": list(server.allowed_upstream)}, {}


async def _op_sessions(server: SegmentServer, conn: Connection, frame: Frame) -> Result:
    sessions = await server._submit(lambda: server.runner.sessions())
    return {"sessions": sessions}, {}


async def _op_load_range(server: SegmentServer, conn: Connection, frame: Frame) -> Result:
    first = require(frame.header, "first", int)
    end = require(frame.header, "end", int)
    model = optional(frame.header, "model", str, server.model)
    server.promote()

    def load() -> Any:
        # Build the new runner before dropping the old one: a bad range leaves the server as it was.
        runner = server._load_runner(first, end, model)
        server.runner = runner
        server.model, server.first, server.end = model, first, end
        return None

    await server._submit(load)
    return server.identity(), {}


async def _op_drain(server: SegmentServer, conn: Connection, frame: Frame) -> Result:
    timeout_s = optional(frame.header, "timeout_s", (int, float), 30.0)
    await server.drain(float(timeout_s))
    return {"draining": True, "queue_len": server.stats.queue_len}, {}


async def _op_resume(server: SegmentServer, conn: Connection, frame: Frame) -> Result:
    server.draining = False
    return {"draining": False}, {}


def _layer_range(server: SegmentServer, frame: Frame) -> tuple[int, int]:
    first = optional(frame.header, "first", int, server.first)
    end = optional(frame.header, "end", int, server.end)
    return first, end


async def _op_export_kv(server: SegmentServer, conn: Connection, frame: Frame) -> Result:
    session = _check_id(frame.header, "session")
    first, end = _layer_range(server, frame)

    def export() -> tuple[int, dict[str, torch.Tensor]]:
        return server.runner.kv_length(session), server.runner.export_kv(session, first, end)

    length, tensors = await server._submit(export)
    result = {"session": session, "length": length, "first": first, "end": end, "bytes": _nbytes(tensors)}
    return result, tensors


async def _op_import_kv(server: SegmentServer, conn: Connection, frame: Frame) -> Result:
    session = _check_id(frame.header, "session")
    length = require(frame.header, "length", int)
    tensors = {k: v.clone() for k, v in frame.tensors.items()}
    await server._submit(lambda: server.runner.import_kv(session, tensors, length))
    return {"session": session, "length": length, "tensors": len(tensors)}, {}


async def _op_push_kv(server: SegmentServer, conn: Connection, frame: Frame) -> Result:
    """Server-to-server KV move: export [first, end) of a session and import it at ``target``."""
    session = _check_id(frame.header, "session")
    target = require(frame.header, "target", str)
    parse_hop(target)
    first, end = _layer_range(server, frame)
    rid = _check_id(frame.header, "request_id")

    def export() -> tuple[int, dict[str, torch.Tensor]]:
        return server.runner.kv_length(session), server.runner.export_kv(session, first, end)

    length, tensors = await server._submit(export)
    link = server.peer(target)
    header = {"op": "import_kv", "request_id": f"{rid}.push", "session": session, "length": length}
    reply = await link.request(header, tensors)
    if reply.type == FrameType.ERROR:
        raise UnreachableError(f"{target} refused the KV import: {reply.header.get('message')}")
    result = {"first": first, "end": end, "target": target, "bytes": _nbytes(tensors)}
    return {"session": session, "length": length, **result}, {}


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


async def _op_truncate(server: SegmentServer, conn: Connection, frame: Frame) -> Result:
    session = _check_id(frame.header, "session")
    length = require(frame.header, "length", int)
    await server._submit(lambda: server.runner.truncate(session, length))
    return {"session": session, "length": length}, {}


async def _op_drop(server: SegmentServer, conn: Connection, frame: Frame) -> Result:
    session = _check_id(frame.header, "session")
    await server._submit(lambda: server.runner.drop_session(session))
    return {"session": session, "dropped": True}, {}


_CONTROL_OPS: dict[str, Any] = {
    "health": _op_health,
    "stats": _op_stats,
    "subscribe": _op_subscribe,
    "sessions": _op_sessions,
    "load_range": _op_load_range,
    "drain": _op_drain,
    "resume": _op_resume,
    "export_kv": _op_export_kv,
    "import_kv": _op_import_kv,
    "push_kv": _op_push_kv,
    "truncate": _op_truncate,
    "drop": _op_drop,
    "allow_upstream": _op_allow_upstream,
}

# Who may do what (by the role its certificate names; the shared secret's holder is the orchestrator).
# The gateway is the orchestrator's agent for its own sessions: it steps them, moves their KV to a new
# chain and drops them. A segment server only steps the next hop and pushes KV into a peer.
_EVERY_ROLE = frozenset({pki.ORCHESTRATOR, pki.GATEWAY, "segment"})
_SESSION_OWNERS = frozenset({pki.ORCHESTRATOR, pki.GATEWAY})
_ORCHESTRATOR_ONLY = frozenset({pki.ORCHESTRATOR})
FORWARD_ROLES = _EVERY_ROLE
_OP_ROLES: dict[str, frozenset[str]] = {
    "health": _EVERY_ROLE,
    "stats": _EVERY_ROLE,
    "import_kv": _EVERY_ROLE,
    "subscribe": _SESSION_OWNERS,
    "export_kv": _SESSION_OWNERS,
    "push_kv": _SESSION_OWNERS,
    "truncate": _SESSION_OWNERS,
    "drop": _SESSION_OWNERS,
    "allow_upstream": _SESSION_OWNERS,
    "sessions": _ORCHESTRATOR_ONLY,
    "load_range": _ORCHESTRATOR_ONLY,
    "drain": _ORCHESTRATOR_ONLY,
    "resume": _ORCHESTRATOR_ONLY,
}
assert _OP_ROLES.keys() == _CONTROL_OPS.keys(), "every control op needs its roles"


def _allow(conn: Connection, what: str, roles: frozenset[str]) -> None:
    if conn.role not in roles:
        raise ForbiddenError(f"{conn.identity!r} may not {what}; allowed to {', '.join(sorted(roles))}")


# --------------------------------------------------------------------------------------------- main


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    from mecsplit.settings import get_settings

    seg = get_settings().segments
    p = argparse.ArgumentParser(prog="python -m segments.server", description="Serve one layer range.")
    p.add_argument("--store", type=Path, default=get_settings().store_dir)
    p.add_argument("--model", required=True)
    p.add_argument("--first", type=int, required=True)
    p.add_argument("--end", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument(
        "--tls-dir",
        type=Path,
        default=None,
        help="mutual TLS with this credentials folder (key.pem, cert.pem, ca.pem; segments.pki); "
        "without it, the shared secret from --secret-file or MECSPLIT_SECRET over plain TCP",
    )
    p.add_argument("--secret-file", type=Path, default=None)
    p.add_argument("--threads", type=int, default=seg.threads)
    p.add_argument("--max-sessions", type=int, default=seg.max_sessions)
    p.add_argument("--max-kv-bytes", type=int, default=seg.max_kv_bytes)
    p.add_argument("--max-frame-bytes", type=int, default=seg.max_frame_bytes)
    p.add_argument(
        "--max-batch",
        type=int,
        default=seg.max_batch,
        help="run the decode steps of up to this many sessions that wait together as one forward pass "
        "(1: each alone, bit for bit the whole model's output)",
    )
    p.add_argument(
        "--session-idle-s",
        type=float,
        default=seg.session_idle_s,
        help="drop a session no step has used for this long (a gateway that left never drops it)",
    )
    p.add_argument(
        "--verify-store",
        action="store_true",
        help="hash every file of the model before listening, so a later load_range reads nothing twice",
    )
    p.add_argument(
        "--background",
        action="store_true",
        help="a standby: start at the lowest CPU priority (its boot must not slow the node's serving "
        "segments) and take normal priority with its first forward or load_range (needs root to restore)",
    )
    return p.parse_args(argv)


async def _amain(args: argparse.Namespace) -> int:
    credentials = Credentials.load(args.tls_dir, args.secret_file)
    limits = ServerLimits(
        max_frame_bytes=args.max_frame_bytes,
        max_sessions=args.max_sessions,
        max_kv_bytes=args.max_kv_bytes,
        threads=args.threads,
        session_idle_s=args.session_idle_s,
        max_batch=args.max_batch,
    )
    server = SegmentServer(args.store, args.model, args.first, args.end, credentials, limits)
    if args.background and can_restore_priority():
        os.nice(BACKGROUND_NICE)  # threads started from now on (the compute thread) inherit it
        server.background = True
    port = await server.start(args.host, args.port, verify_store=args.verify_store)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(json.dumps({"ready": True, "port": port, "pid": os.getpid(), **server.identity()}), flush=True)
    await stop.wait()
    await server.drain(timeout_s=10.0)
    await server.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    args = _parse_args(argv)
    try:
        return asyncio.run(_amain(args))
    except Exception as exc:
        # One JSON line on stdout so a launcher waiting for "ready" learns why instead of timing out.
        print(json.dumps({"ready": False, "error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
