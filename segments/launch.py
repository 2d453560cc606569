"""Start K segment server processes on loopback for one model, wait until each is ready, stop them by PID.

Used by ``mecsplit generate|verify|bench overhead|gateway`` and by the tests. Each server binds port 0 and
names its port on its ready line, so parallel launches never collide.
"""

from __future__ import annotations

import itertools
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from segments.auth import Credentials, create_secret
from segments.client import Chain, Hop
from segments.pki import ORCHESTRATOR, issue, segment_identity, write_credentials
from segments.spec import SegmentSpec, split_evenly


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the launching process dies, even by SIGKILL, so a
    killed command never leaves segment servers behind (Linux; elsewhere a no-op)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class LaunchError(Exception):
    """A segment server did not start; the message carries its own error line."""


def boundaries_to_specs(model: str, num_layers: int, boundaries: list[int]) -> tuple[SegmentSpec, ...]:
    """``[0, b1, ..., num_layers]`` or just the inner cut points ``[b1, ...]``."""
    cuts = [b for b in boundaries if 0 < b < num_layers]
    if sorted(set(cuts)) != cuts:
        raise ValueError(f"boundaries must be strictly increasing inside (0, {num_layers}): {boundaries}")
    edges = [0, *cuts, num_layers]
    return tuple(SegmentSpec(model, a, b) for a, b in itertools.pairwise(edges))


@dataclass
class LocalChain:
    """K segment server processes on loopback. Use as a context manager so they always stop."""

    store_dir: Path
    specs: tuple[SegmentSpec, ...]
    secret_file: Path | None = None
    threads: int = 1
    max_sessions: int | None = None
    max_kv_bytes: int | None = None
    max_frame_bytes: int | None = None
    session_idle_s: float | None = None
    max_batch: int | None = None
    ready_timeout_s: float = 300.0
    host: str = "127.0.0.1"  # the address the servers bind and the chain names
    wrap: tuple[str, ...] = ()  # a command prefix, e.g. ("ip", "netns", "exec", NAME): must exec, not fork
    tls: bool = False  # mutual TLS, server i as identity segment.p<i> (segments.pki); else the shared secret
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)
    _tmp: Path | None = None
    _own_secret: bool = False

    @classmethod
    def even(
        cls, store_dir: Path, model: str, num_layers: int, segments: int, **kwargs: object
    ) -> LocalChain:
        return cls(store_dir, split_evenly(model, num_layers, segments), **kwargs)  # type: ignore[arg-type]

    @property
    def model(self) -> str:
        return self.specs[0].model

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    @property
    def hops(self) -> tuple[Hop, ...]:
        """One hop per running process, in start order (they need not tile the model: spares, standbys)."""
        return tuple(
            Hop(self.host, port, s.first, s.end) for s, port in zip(self.specs, self.ports, strict=False)
        )

    @property
    def chain(self) -> Chain:
        """The chain of the first ``len(specs)`` processes (after ``reload`` to fewer, the rest idle)."""
        return Chain(self.model, self.hops)

    def reload(self, specs: tuple[SegmentSpec, ...], timeout_s: float = 120.0) -> tuple[Hop, ...]:
        """Re-load the running processes in place (``load_range``) with ``specs``; no restart."""
        import asyncio

        from segments.client import control_once

        if len(specs) > len(self.ports):
            raise LaunchError(
                f"{len(specs)} segments need {len(specs)} processes; this chain has {len(self.ports)}"
            )

        async def _all() -> None:
            for spec, port in zip(specs, self.ports, strict=False):
                await control_once(
                    self.host, port, self.auth(), "load_range", timeout_s,
                    model=spec.model, first=spec.first, end=spec.end,
                )  # fmt: skip

        asyncio.run(_all())
        self.specs = specs
        return self.hops

    def secret(self) -> bytes:
        from segments.auth import load_secret

        assert self.secret_file is not None
        return load_secret(self.secret_file)

    def auth(self, identity: str = ORCHESTRATOR) -> bytes | Credentials:
        """What a client of this chain authenticates with: the secret, or (``tls``) the credentials of
        ``identity`` (issued on first use)."""
        if not self.tls:
            return self.secret()
        assert self._tmp is not None
        folder = self._tmp / "pki" / identity
        if not folder.exists():
            write_credentials(issue(self.secret(), identity), folder)
        return Credentials(tls_dir=folder)

    def _command(self, index: int, spec: SegmentSpec) -> list[str]:
        assert self.secret_file is not None
        if self.tls:
            credentials = self.auth(segment_identity(f"p{index}"))
            assert isinstance(credentials, Credentials) and credentials.tls_dir is not None
            auth_args = ["--tls-dir", str(credentials.tls_dir)]
        else:
            auth_args = ["--secret-file", str(self.secret_file)]
        cmd = [
            *self.wrap, sys.executable, "-m", "segments.server",
            "--store", str(self.store_dir), "--model", spec.model,
            "--first", str(spec.first), "--end", str(spec.end),
            "--host", self.host, "--port", "0", *auth_args, "--threads", str(self.threads),
        ]  # fmt: skip
        for flag, value in (
            ("--max-sessions", self.max_sessions),
            ("--max-kv-bytes", self.max_kv_bytes),
            ("--max-frame-bytes", self.max_frame_bytes),
            ("--session-idle-s", self.session_idle_s),
            ("--max-batch", self.max_batch),
        ):
            if value is not None:
                cmd += [flag, str(value)]
        return cmd

    def start(self) -> LocalChain:
        self._tmp = Path(tempfile.mkdtemp(prefix="mecsplit-chain-"))
        if self.secret_file is None:
            self._own_secret = True
            self.secret_file = create_secret(self._tmp / "secret")
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads)}
        try:
            # Start all, then wait for all: model loading overlaps across processes.
            for index, spec in enumerate(self.specs):
                self.processes.append(
                    subprocess.Popen(
                        self._command(index, spec),
                        stdout=subprocess.PIPE,
                        stdin=subprocess.DEVNULL,
                        env=env,
                        preexec_fn=_die_with_parent,
                    )
                )
            self.ports = [self._wait_ready(p, s) for p, s in zip(self.processes, self.specs, strict=True)]
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, proc: subprocess.Popen[bytes], spec: SegmentSpec) -> int:
        assert proc.stdout is not None
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 0.5)
            if not ready:
                if proc.poll() is not None:
                    raise LaunchError(
                        f"segment server {spec} exited with code {proc.returncode} before ready"
                    )
                continue
            line = proc.stdout.readline()
            if not line:
                raise LaunchError(f"segment server {spec} closed stdout before ready (code {proc.wait()})")
            try:
                message = json.loads(line)
            except json.JSONDecodeError:
                continue
            if message.get("ready"):
                return int(message["port"])
            raise LaunchError(f"segment server {spec} failed: {message.get('error')}")
        raise LaunchError(f"segment server {spec} not ready within {self.ready_timeout_s} s")

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM each server we started (it drains and exits), SIGKILL what outlives ``timeout_s``."""
        for proc in self.processes:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for proc in self.processes:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        self.processes = []
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        if self._own_secret:
            self.secret_file = None
            self._own_secret = False

    def __enter__(self) -> LocalChain:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
