"""Failure recovery under fire: segment servers killed mid-generation, sessions finished on replacements.

``run_failover_bench`` runs SmolLM2 split ``[0,15) + [15,30)`` over loopback processes. Each of N sessions
generates greedily; at a different token each time, one server of its chain (the first and the last hop in
turn) is killed with SIGKILL. The step in flight fails, the client holds it; a warm standby server (started
ahead with a one-layer range) loads the lost range (``load_range``), the session is switched there by
replay of its token history, and the held step runs again on the new chain. Every session's tokens are
compared with an undisturbed run. A new standby starts in the background after each failure.

Reported (JSON): sessions exact, tokens lost, and per failure the recovery time (from the failed step to
the retried step's answer) with its parts: waiting for a standby, loading the range, the switch.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segments.auth import create_secret
from segments.client import AsyncChainClient, Chain, ChainClient, Hop, Session
from segments.launch import LocalChain
from segments.sampling import SamplingParams
from segments.spec import SegmentSpec
from segments.store import load_tokenizer

MODEL = "smollm2-135m"
SPLIT = ((0, 15), (15, 30))
PROMPTS = ("Bandwidth traces show", "A road-side unit", "The gateway keeps", "Segments migrate")
GREEDY = SamplingParams(temperature=0.0)
# Warm standbys kept ready; each failure takes one and starts another in the background. Failures here
# come every second or two, far faster than in life, so a pool of one would measure process start-up.
STANDBYS = 3


@dataclass(frozen=True)
class FailoverSample:
    session: int
    killed_hop: int
    at_token: int
    exact: bool
    tokens_lost: int
    recovery_s: float  # failed step -> retried step answered (0 when the kill fell between two steps)
    standby_wait_s: float
    load_range_s: float
    switch_s: float


class Fleet:
    """The servers this bench started (by PID), sharing one secret; standbys started in the background."""

    def __init__(self, store_dir: Path, secret_file: Path) -> None:
        self.store_dir = store_dir
        self.secret_file = secret_file
        self.groups: list[LocalChain] = []
        # One thread starts every server: a server gets SIGTERM when the thread that started it ends.
        self.pool = ThreadPoolExecutor(max_workers=1)

    def start(self, *ranges: tuple[int, int]) -> LocalChain:
        specs = tuple(SegmentSpec(MODEL, a, b) for a, b in ranges)
        group = LocalChain(self.store_dir, specs, secret_file=self.secret_file)
        self.groups.append(group)
        return group.start()

    def standby(self) -> Future[LocalChain]:
        return self.pool.submit(self.start, (0, 1))

    def pid_of(self, hop: Hop) -> int:
        return next(g.pids[g.ports.index(hop.port)] for g in self.groups if hop.port in g.ports)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        for group in self.groups:
            group.stop()


async def _replace(
    fleet: Fleet, client: AsyncChainClient, session: Session, chain: Chain, victim: int,
    standbys: list[Future[LocalChain]], parts: dict[str, float],
) -> Chain:  # fmt: skip
    """Kill hop ``victim``'s server, load its range onto a standby, switch the session there by replay
    (what the reconfigure flow does through the gateway on ``mec.node.failed``)."""
    os.kill(fleet.pid_of(chain.hops[victim]), signal.SIGKILL)
    t0 = time.perf_counter()
    standby = await asyncio.wrap_future(standbys.pop(0))
    standbys.append(fleet.standby())
    t1 = time.perf_counter()
    lost = chain.hops[victim]
    await asyncio.to_thread(standby.reload, (SegmentSpec(MODEL, lost.first, lost.end),))
    t2 = time.perf_counter()
    hops = list(chain.hops)
    hops[victim] = standby.hops[0]
    new_chain = Chain(MODEL, tuple(hops))
    await client.switch(session, new_chain, "replay", abandon_after_s=1.0)
    parts.update(standby_wait_s=t1 - t0, load_range_s=t2 - t1, switch_s=time.perf_counter() - t2)
    return new_chain


async def _one(
    fleet: Fleet, i: int, chain: Chain, prompt: list[int], want: list[int],
    standbys: list[Future[LocalChain]], secret: bytes,
) -> tuple[Chain, FailoverSample]:  # fmt: skip
    session = Session(tokens=list(prompt))
    client = await AsyncChainClient(chain, secret, recover_timeout_s=120.0).connect()
    at_token, victim = 2 + i % (len(want) - 4), i % 2
    parts: dict[str, float] = {}
    got: list[int] = []
    replacing: asyncio.Task[Chain] | None = None
    try:
        async for token in client.generate(session, len(want), GREEDY):
            got.append(token)
            if len(got) == at_token:
                # Concurrent with the next step, as a failure is: that step fails and is held.
                replacing = asyncio.create_task(
                    _replace(fleet, client, session, chain, victim, standbys, parts)
                )
        assert replacing is not None
        chain = await replacing
    finally:
        await client.close()
    recovery = client.recoveries[0].recovery_s if client.recoveries else 0.0
    lost = sum(1 for a, b in zip(got, want, strict=False) if a != b) + max(0, len(want) - len(got))
    return chain, FailoverSample(i, victim, at_token, got == want, lost, recovery, **parts)


def run_failover_bench(
    store_dir: Path, failures: int = 20, tokens: int = 24, progress: Callable[[str], None] = print
) -> dict[str, Any]:
    if failures < 1 or tokens < 6:
        raise ValueError(f"need failures >= 1 and tokens >= 6, got {failures}, {tokens}")
    tokenizer = load_tokenizer(store_dir, MODEL)
    prompts = [[int(t) for t in tokenizer.encode(text)] for text in PROMPTS]
    with tempfile.TemporaryDirectory(prefix="mecsplit-failover-") as tmp:
        fleet = Fleet(store_dir, create_secret(Path(tmp) / "secret"))
        try:
            first = fleet.pool.submit(fleet.start, *SPLIT).result()
            standbys = [fleet.standby() for _ in range(STANDBYS)]
            secret = first.secret()
            with ChainClient(first.chain, secret) as client:
                wants = [list(client.generate(Session(tokens=list(p)), tokens, GREEDY)) for p in prompts]

            async def run_all() -> list[FailoverSample]:
                chain, samples = first.chain, []
                for i in range(failures):
                    k = i % len(prompts)
                    chain, sample = await _one(fleet, i, chain, prompts[k], wants[k], standbys, secret)
                    progress(f"failure {i + 1}/{failures}: {sample}")
                    samples.append(sample)
                return samples

            samples = asyncio.run(run_all())
        finally:
            fleet.close()
    return _summary(samples, tokens)


def _summary(samples: list[FailoverSample], tokens: int) -> dict[str, Any]:
    def stats(values: list[float]) -> dict[str, float]:
        ordered = sorted(values)
        p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
        return {
            "median": round(statistics.median(ordered), 3),
            "p95": round(p95, 3),
            "max": round(ordered[-1], 3),
        }

    return {
        "bench": "failover",
        "model": MODEL,
        "split": [list(r) for r in SPLIT],
        "failures": len(samples),
        "tokens_per_session": tokens,
        "sessions_exact": sum(s.exact for s in samples),
        "tokens_lost": sum(s.tokens_lost for s in samples),
        "steps_retried": sum(s.recovery_s > 0 for s in samples),
        "recovery_s": stats([s.recovery_s for s in samples if s.recovery_s > 0] or [0.0]),
        "standby_wait_s": stats([s.standby_wait_s for s in samples]),
        "load_range_s": stats([s.load_range_s for s in samples]),
        "switch_s": stats([s.switch_s for s in samples]),
        "samples": [s.__dict__ for s in samples],
    }
