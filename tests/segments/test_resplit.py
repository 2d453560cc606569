"""Live re-split, migration and failure recovery with the real SmolLM2 weights, on real server processes.

A greedy generation whose split moves by 5 layers and whose last segment then migrates to another process
must give exactly the tokens of an undisturbed run, whichever way the KV cache gets there: moved (server to
server or through the client), recomputed on the new hops from the kept token history, or a mix. Then 20
sessions each lose a segment server (SIGKILL) mid-generation and finish on a replacement with exact tokens.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from store_helpers import StoreFor

from segments.auth import create_secret
from segments.client import AsyncChainClient, Chain, ChainClient, ChainError, Hop, Session, SwitchReport
from segments.launch import LocalChain
from segments.sampling import SamplingParams
from segments.spec import SegmentSpec
from segments.store import load_tokenizer

MODEL = "smollm2-135m"
LAYERS = 30
GREEDY = SamplingParams(temperature=0.0)

pytestmark = pytest.mark.slow


def _specs(*ranges: tuple[int, int]) -> tuple[SegmentSpec, ...]:
    return tuple(SegmentSpec(MODEL, a, b) for a, b in ranges)


class Fleet:
    """Segment server processes this test module started, sharing one secret."""

    def __init__(self, store_dir: Path, secret_file: Path) -> None:
        self.store_dir = store_dir
        self.secret_file = secret_file
        self.groups: list[LocalChain] = []

    def start(self, *ranges: tuple[int, int]) -> LocalChain:
        group = LocalChain(self.store_dir, _specs(*ranges), secret_file=self.secret_file)
        self.groups.append(group)
        return group.start()

    def pid_of(self, hop: Hop) -> int:
        return next(g.pids[g.ports.index(hop.port)] for g in self.groups if hop.port in g.ports)

    def stop(self) -> None:
        for group in self.groups:
            group.stop()


@pytest.fixture(scope="module")
def fleet(model_store: StoreFor, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    store_dir = model_store(MODEL)
    fleet = Fleet(store_dir, create_secret(tmp_path_factory.mktemp("resplit") / "secret"))
    try:
        yield fleet
    finally:
        fleet.stop()


def _prompt(store_dir: Path, text: str) -> list[int]:
    return [int(i) for i in load_tokenizer(store_dir, MODEL).encode(text)]


# Path name -> (mode, recompute_hops) for the re-split, then for the migration of the last segment.
PATHS = {
    "push": (("push", 0), ("push", 0)),
    "kv-via-client": (("kv", 0), ("kv", 0)),
    "recompute-first-hop": (("push", 1), ("push", 1)),
    "replay": (("replay", 0), ("replay", 0)),
}


def test_resplit_and_migration_keep_256_greedy_tokens_exact(fleet: Fleet) -> None:
    """[0,10)+[10,30) -> at token 80 [0,15)+[15,30) (5 layers move) -> at token 170 [15,30) migrates."""
    old = fleet.start((0, 10), (10, 30))
    new = fleet.start((0, 15), (15, 30))
    spare = fleet.start((15, 30))
    resplit = new.chain
    migrated = Chain(MODEL, (new.hops[0], spare.hops[0]))
    prompt = _prompt(fleet.store_dir, "The three services of an edge inference system are")
    secret = old.secret()

    with ChainClient(old.chain, secret) as client:
        want = list(client.generate(Session(tokens=list(prompt)), 256, GREEDY))

    reports: dict[str, list[SwitchReport]] = {}
    for name, ((mode1, k1), (mode2, k2)) in PATHS.items():
        with ChainClient(old.chain, secret) as client:
            session = Session(tokens=list(prompt))
            got: list[int] = []
            for token in client.generate(session, 256, GREEDY):
                got.append(token)
                if len(got) == 80:
                    reports[name] = [client.switch(session, resplit, mode1, recompute_hops=k1)]
                elif len(got) == 170:
                    reports[name].append(client.switch(session, migrated, mode2, recompute_hops=k2))
            client.drop(session)
        assert got == want, f"{name}: first difference at token {_first_difference(got, want)}"

    # Each path did what it says: KV bytes moved where KV moved, tokens recomputed where it was rebuilt.
    at_resplit, at_migration = len(prompt) + 79, len(prompt) + 169  # the last sampled token is not fed yet
    push = reports["push"]
    assert [r.tokens_recomputed for r in push] == [0, 0]
    # Re-split: all 30 layers move (fresh servers); migration: only [15, 30), the first hop is shared.
    per_layer_token = push[0].kv_bytes_moved / (30 * at_resplit)
    assert push[1].kv_bytes_moved == per_layer_token * 15 * at_migration
    assert [r.kv_bytes_moved for r in reports["kv-via-client"]] == [r.kv_bytes_moved for r in push]
    mixed = reports["recompute-first-hop"]
    assert [r.tokens_recomputed for r in mixed] == [at_resplit, at_migration]
    # The first hop recomputes [0, 15); only [15, 30) moves at the re-split, as at the migration.
    assert [r.kv_bytes_moved for r in mixed] == [push[0].kv_bytes_moved // 2, push[1].kv_bytes_moved]
    replay = reports["replay"]
    assert [(r.kv_bytes_moved, r.tokens_recomputed) for r in replay] == [(0, at_resplit), (0, at_migration)]


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def test_a_kv_move_off_a_broken_chain_is_refused(fleet: Fleet) -> None:
    """A dead hop's KV is gone: only a replay may leave a broken chain, and the refusal says so."""
    doomed = fleet.start((0, 15), (15, 30))
    target = fleet.start((0, 15), (15, 30))
    prompt = _prompt(fleet.store_dir, "Edge nodes fail")

    async def scenario() -> None:
        client = await AsyncChainClient(doomed.chain, doomed.secret()).connect()
        try:
            session = Session(tokens=list(prompt))
            async for _ in client.generate(session, 3, GREEDY):
                pass
            os.kill(doomed.pids[1], signal.SIGKILL)
            for _ in range(200):
                if client.broken:
                    break
                await asyncio.sleep(0.05)
            with pytest.raises(ChainError, match="switch by replay"):
                await client.switch(session, target.chain, "push")
            report = await client.switch(session, target.chain, "replay")
            assert report.tokens_recomputed == session.kv_length
            assert len([t async for t in client.generate(session, 2, GREEDY)]) == 2
        finally:
            await client.close()

    asyncio.run(scenario())


FAILURES = 20
TOKENS = 24


def test_twenty_failures_mid_generation_lose_no_token(fleet: Fleet) -> None:
    """Each of 20 sessions loses one segment server (SIGKILL; first and last hop in turn) mid-generation; a
    standby server loads the lost range and the session is rebuilt there by replay: exact tokens."""
    prompts = [
        _prompt(fleet.store_dir, text)
        for text in (
            "Bandwidth traces show",
            "A road-side unit",
            "The gateway keeps",
            "Segments migrate when",
        )
    ]
    first = fleet.start((0, 15), (15, 30))
    secret = first.secret()
    with ChainClient(first.chain, secret) as client:
        want = [list(client.generate(Session(tokens=list(p)), TOKENS, GREEDY)) for p in prompts]

    # Standbys: started ahead with a one-layer range, loaded with the lost range on demand (load_range);
    # a new one starts in the background after each failure.
    pool = ThreadPoolExecutor(max_workers=1)
    standbys: list[Future[LocalChain]] = [pool.submit(fleet.start, (0, 1)) for _ in range(2)]

    async def replace(client: AsyncChainClient, session: Session, chain: Chain, victim: int) -> Chain:
        """What the reconfigure flow does through the gateway: kill (this test's own server, by PID),
        load the lost range on a standby, switch the session there by replay."""
        os.kill(fleet.pid_of(chain.hops[victim]), signal.SIGKILL)
        standby = await asyncio.wrap_future(standbys.pop(0))
        standbys.append(pool.submit(fleet.start, (0, 1)))
        lost = chain.hops[victim]
        await asyncio.to_thread(standby.reload, (SegmentSpec(MODEL, lost.first, lost.end),))
        hops = list(chain.hops)
        hops[victim] = standby.hops[0]
        new_chain = Chain(MODEL, tuple(hops))
        await client.switch(session, new_chain, "replay", abandon_after_s=1.0)
        return new_chain

    async def one(i: int, chain: Chain) -> tuple[Chain, float]:
        session = Session(tokens=list(prompts[i % len(prompts)]))
        client = await AsyncChainClient(chain, secret, recover_timeout_s=120.0).connect()
        got: list[int] = []
        try:
            async for token in client.generate(session, TOKENS, GREEDY):
                got.append(token)
                if len(got) == 2 + i:  # a different point of the generation each time
                    # Concurrent with the next step, as a failure is: the step fails and waits.
                    replacing = asyncio.create_task(replace(client, session, chain, i % 2))
            chain = await replacing
        finally:
            await client.close()
        expected = want[i % len(prompts)]
        assert got == expected, f"session {i}: first difference at {_first_difference(got, expected)}"
        return chain, client.recoveries[0].recovery_s if client.recoveries else 0.0

    async def run_all() -> list[float]:
        chain, times = first.chain, []
        for i in range(FAILURES):
            chain, recovery_s = await one(i, chain)
            times.append(recovery_s)
        return times

    try:
        times = asyncio.run(run_all())
    finally:
        pool.shutdown(wait=True)
    print(f"recovery_s per failure: {[round(t, 3) for t in times]}")
    assert len(times) == FAILURES
