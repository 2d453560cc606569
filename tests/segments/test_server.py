"""Segment servers as real processes on loopback: auth, control ops, limits, errors, exact chains."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from wire_helpers import (
    assert_error_then_closed,
    children_alive,
    num_layers,
    raw_connect,
    recv_frame,
)

from segments.auth import AuthError, create_secret
from segments.client import AsyncChainClient, Chain, ChainClient, ChainError, RemoteError, Session
from segments.errors import KVMemoryLimitError, LayerRangeError, PositionMismatchError, SessionLimitError
from segments.launch import LocalChain, boundaries_to_specs
from segments.protocol import FrameType, encode_frame_bytes
from segments.reference import ReferenceModel, greedy_generate
from segments.spec import split_evenly

MODEL = "gpt2-tiny"


@pytest.fixture(scope="module")
def chain2(wire_store: Path) -> Iterator[LocalChain]:
    with LocalChain.even(wire_store, MODEL, num_layers(wire_store, MODEL), 2) as lc:
        pids = lc.pids
        yield lc
    assert pids and children_alive(pids) == []


def test_health_command_and_stats(chain2: LocalChain) -> None:
    assert chain2.secret_file is not None
    cmd = [sys.executable, "-m", "segments.client", "health", "--port", str(chain2.ports[0]),
           "--secret-file", str(chain2.secret_file)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout)
    assert stats["healthy"] is True and stats["first"] == 0
    for key in ("queue_len", "busy_s", "bytes_in", "bytes_out", "sessions", "kv_bytes", "rss_bytes"):
        assert key in stats


def test_health_command_fails_with_wrong_secret(chain2: LocalChain, tmp_path: Path) -> None:
    wrong = create_secret(tmp_path / "wrong")
    cmd = [sys.executable, "-m", "segments.client", "health", "--port", str(chain2.ports[0]),
           "--secret-file", str(wrong)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert json.loads(out.stdout)["healthy"] is False


def test_wrong_secret_is_refused(chain2: LocalChain) -> None:
    with pytest.raises(AuthError):
        ChainClient(chain2.chain, b"not-the-deployment-secret-at-all")


def test_unauthenticated_frame_gets_error_and_close(chain2: LocalChain) -> None:
    sock = raw_connect(chain2.ports[0], secret=None)
    sock.sendall(encode_frame_bytes(FrameType.CONTROL, {"op": "stats", "request_id": "r"}))
    assert_error_then_closed(sock, "auth")
    sock.close()


@pytest.mark.parametrize(
    ("hop", "x"),
    [(1, torch.zeros(1, 2, 3)), (0, torch.tensor([[5, 50_000]]))],
    ids=["wrong-shape", "out-of-vocabulary"],
)
def test_a_bad_request_fails_alone_and_the_connection_serves_on(
    chain2: LocalChain, hop: int, x: torch.Tensor
) -> None:
    """A well-framed request that makes no sense (hidden states of the wrong width, a token id beyond the
    vocabulary) gets a bad_request error; the same connection, which carries a gateway's other sessions,
    still answers, and so do the other clients."""
    with ChainClient(chain2.chain, chain2.secret()) as client:
        session = Session(tokens=[5, 6, 7])
        first = list(client.generate(session, 2))
        sock = raw_connect(chain2.ports[hop], chain2.secret())
        header = {"session": "x", "request_id": "r1", "position": 0, "layer": chain2.specs[hop].first,
                  "route": [], "channel": "nobody"}  # fmt: skip
        sock.sendall(encode_frame_bytes(FrameType.FORWARD, header, {"x": x}))
        error = recv_frame(sock)
        assert error is not None and error.type == FrameType.ERROR
        assert (error.header["code"], error.header["request_id"]) == ("bad_request", "r1")
        sock.sendall(encode_frame_bytes(FrameType.CONTROL, {"op": "stats", "request_id": "r2"}))
        reply = recv_frame(sock)
        assert reply is not None and reply.type == FrameType.REPLY, reply
        assert reply.header["request_id"] == "r2"
        sock.close()
        more = list(client.generate(session, 2))
        assert len(first + more) == 4


def test_position_mismatch_is_typed_and_connection_survives(chain2: LocalChain) -> None:
    with ChainClient(chain2.chain, chain2.secret()) as client:
        with pytest.raises(PositionMismatchError, match="position"):
            client.step("s-pos", torch.tensor([[1, 2]]), 5)
        result = client.step("s-pos", torch.tensor([[1, 2]]), 0, logits="last")
        assert result.logits is not None and result.logits.shape[:2] == (1, 1)
        client.drop(Session(id="s-pos"))


def test_unknown_control_op_is_refused(chain2: LocalChain) -> None:
    with (
        ChainClient(chain2.chain, chain2.secret()) as client,
        pytest.raises(RemoteError, match="unknown control op"),
    ):
        client.control(0, "format_disk")


def test_export_truncate_import_round_trip(chain2: LocalChain) -> None:
    with ChainClient(chain2.chain, chain2.secret()) as client:
        session = Session(tokens=[3, 1, 4, 1, 5])
        list(client.generate(session, 3))
        spec = chain2.specs[0]
        result, kv = client.control(0, "export_kv", session=session.id, first=spec.first, end=spec.end)
        assert result["length"] == session.kv_length
        assert set(kv) == {f"{i}.{kv_}" for i in range(spec.first, spec.end) for kv_ in "kv"}
        client.control(0, "truncate", session=session.id, length=2)
        assert client.control(0, "export_kv", session=session.id)[0]["length"] == 2
        client.control(0, "import_kv", kv, session=session.id + "-copy", length=result["length"])
        copy, _ = client.control(0, "export_kv", session=session.id + "-copy")
        assert copy["length"] == result["length"]
        sessions = client.control(0, "sessions")[0]["sessions"]
        assert {session.id, session.id + "-copy"} <= set(sessions)
        for sid in (session.id, session.id + "-copy"):
            client.drop(Session(id=sid))


def test_load_range_replaces_the_segment_in_place(wire_store: Path) -> None:
    n = num_layers(wire_store, MODEL)
    with (
        LocalChain(wire_store, boundaries_to_specs(MODEL, n, [1])) as lc,
        ChainClient(lc.chain, lc.secret()) as c,
    ):
        result, _ = c.control(1, "load_range", first=2, end=n)
        assert (result["first"], result["end"]) == (2, n)
        with pytest.raises(LayerRangeError, match="exceeds"):
            c.control(1, "load_range", first=n, end=n + 5)  # bad range: old runner stays
        assert c.control(1, "stats")[0]["first"] == 2


def test_session_and_kv_limits(wire_store: Path) -> None:
    n = num_layers(wire_store, MODEL)
    specs = split_evenly(MODEL, n, 2)
    with LocalChain(wire_store, specs, max_sessions=2) as lc, ChainClient(lc.chain, lc.secret()) as client:
        a, b = Session(tokens=[1, 2]), Session(tokens=[3, 4])
        list(client.generate(a, 1))
        list(client.generate(b, 1))
        with pytest.raises(SessionLimitError, match="max_sessions"):
            list(client.generate(Session(tokens=[5]), 1))
        assert len(list(client.generate(a, 2))) == 2  # existing sessions go on
    with (
        LocalChain(wire_store, specs, max_kv_bytes=64 * 1024) as lc,
        ChainClient(lc.chain, lc.secret()) as client,
    ):
        with pytest.raises(KVMemoryLimitError, match="max_kv_bytes"):
            client.step("big", torch.zeros(1, 512, dtype=torch.int64), 0)
        assert len(list(client.generate(Session(tokens=[1, 2, 3]), 2))) == 2


def test_frame_size_limit(wire_store: Path) -> None:
    n = num_layers(wire_store, MODEL)
    with LocalChain(wire_store, split_evenly(MODEL, n, 1), max_frame_bytes=4096) as lc:
        sock = raw_connect(lc.ports[0], lc.secret())
        header = {"session": "s", "request_id": "r", "position": 0, "layer": 0, "route": [], "channel": "c"}
        sock.sendall(
            encode_frame_bytes(FrameType.FORWARD, header, {"x": torch.zeros(1, 1000, dtype=torch.int64)})
        )
        frame = assert_error_then_closed(sock, "frame_too_large")
        assert "MAX_FRAME_BYTES" in frame.header["message"]
        sock.close()


def _chain_logits(
    client: ChainClient,
    prompt: torch.Tensor,
    steps: int,
    mask: torch.Tensor | None = None,
    session: str = "v",
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Prompt logits and per-step logits through the chain, greedy; returns (logits, ids)."""
    out = client.step(session, prompt, 0, attention_mask=mask, logits="all")
    logits = [out.logits]
    position = prompt.shape[1]
    ids = []
    for _ in range(steps):
        nxt = logits[-1][:, -1, :].argmax(-1, keepdim=True)
        ids.append(nxt)
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        logits.append(client.step(session, nxt, position, attention_mask=mask, logits="all").logits)
        position += 1
    return logits, torch.cat(ids, dim=1)


@pytest.mark.exactness
def test_chains_of_1_to_4_are_exact(wire_store: Path) -> None:
    """Every K and (with 4-layer models) every boundary; four processes re-loaded in place per split."""
    prompt = torch.tensor([[11, 250, 3000, 17, 42, 9]])
    with LocalChain.even(wire_store, MODEL, num_layers(wire_store, MODEL), 4) as pool:
        for model in ("gpt2-tiny", "llama-tiny"):
            n = num_layers(wire_store, model)
            ref_ids, ref_logits = greedy_generate(ReferenceModel(wire_store, model).forward, "r", prompt, 6)
            for k in range(1, min(4, n) + 1):
                chain = Chain(model, pool.reload(split_evenly(model, n, k)))
                with ChainClient(chain, pool.secret()) as client:
                    logits, ids = _chain_logits(client, prompt, 6)
                assert torch.equal(ids, ref_ids), (model, k)
                for got, want in zip(logits, ref_logits, strict=True):
                    assert got.dtype == torch.float32
                    assert (got - want).abs().max().item() == 0.0, (model, k)


def test_padded_batch_equals_one_by_one(chain2: LocalChain) -> None:
    rows = [[7, 8, 9, 10], [21, 22]]
    width = max(len(r) for r in rows)
    batch = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with ChainClient(chain2.chain, chain2.secret()) as client:
        batch_logits, batch_ids = _chain_logits(client, batch, 3, mask, session="batch")
        for i, row in enumerate(rows):
            single_logits, single_ids = _chain_logits(client, torch.tensor([row]), 3, session=f"one{i}")
            assert torch.equal(batch_ids[i], single_ids[0])
            diff = (batch_logits[0][i, -1] - single_logits[0][0, -1]).abs().max().item()
            assert diff < 1e-4
        for sid in ("batch", "one0", "one1"):
            client.drop(Session(id=sid))


@pytest.mark.parametrize("wire", ["f16", "bf16"])
def test_half_precision_wire(wire_store: Path, wire: str) -> None:
    n = num_layers(wire_store, "llama-tiny")
    with LocalChain.even(wire_store, "llama-tiny", n, 2) as lc:
        with ChainClient(lc.chain, lc.secret()) as exact:
            want = exact.step("w", torch.tensor([[5, 6, 7]]), 0, logits="last").logits
        with ChainClient(lc.chain, lc.secret(), wire_dtype=wire) as half:
            got = half.step("h", torch.tensor([[5, 6, 7]]), 0, logits="last").logits
            stats = half.stats()
    assert got is not None and want is not None
    assert 0 < (got - want).abs().max().item() < 0.1
    assert stats[1]["bytes_in"] > 0


def test_drain_refuses_new_sessions(wire_store: Path) -> None:
    n = num_layers(wire_store, MODEL)
    with LocalChain.even(wire_store, MODEL, n, 1) as lc, ChainClient(lc.chain, lc.secret()) as client:
        old = Session(tokens=[1, 2])
        list(client.generate(old, 1))
        assert client.control(0, "drain")[0]["draining"] is True
        with pytest.raises(RemoteError, match="draining"):
            list(client.generate(Session(tokens=[3]), 1))
        assert len(list(client.generate(old, 1))) == 1
        client.control(0, "resume")
        assert len(list(client.generate(Session(tokens=[3]), 1))) == 1


def test_raw_error_reply_names_request(chain2: LocalChain) -> None:
    sock = raw_connect(chain2.ports[0], chain2.secret())
    sock.sendall(encode_frame_bytes(FrameType.CONTROL, {"op": "drop", "request_id": "q1"}))
    frame = recv_frame(sock)
    assert frame is not None and frame.type == FrameType.ERROR and frame.header["request_id"] == "q1"
    sock.close()


def test_dead_hop_fails_fast_and_the_first_hop_stays_healthy(wire_store: Path) -> None:
    n = num_layers(wire_store, MODEL)
    with (
        LocalChain.even(wire_store, MODEL, n, 2) as lc,
        ChainClient(lc.chain, lc.secret(), timeout_s=30) as c,
    ):
        session = Session(tokens=[1, 2, 3])
        list(c.generate(session, 2))
        os.kill(lc.pids[1], signal.SIGKILL)
        lc.processes[1].wait(timeout=30)
        t0 = time.monotonic()
        with pytest.raises((ChainError, RemoteError)):
            list(c.generate(session, 1))
        assert time.monotonic() - t0 < 10
        assert c.control(0, "health")[0]["healthy"] is True


def test_a_switch_past_its_budget_keeps_the_old_chain_and_its_tokens_exact(
    chain2: LocalChain, wire_store: Path
) -> None:
    """A switch that cannot finish within ``timeout_s`` (here: none at all) fails with ChainError; the
    session goes on on the old chain, whose KV a move only copies, exactly as if it had never tried."""
    prompt = [5, 6, 7, 8]
    want, _ = greedy_generate(ReferenceModel(wire_store, MODEL).forward, "r", torch.tensor([prompt]), 6)
    with (
        LocalChain(wire_store, chain2.specs, secret_file=chain2.secret_file) as other,
        ChainClient(chain2.chain, chain2.secret()) as client,
    ):
        session = Session(tokens=list(prompt))
        got = list(client.generate(session, 3))
        for mode in ("kv", "push", "replay"):
            with pytest.raises(ChainError, match="time budget"):
                client.switch(session, other.chain, mode, timeout_s=0.0)
            assert client.chain == chain2.chain
        got += list(client.generate(session, 3))
        assert got == want[0].tolist()
        client.drop(session)


def test_a_step_sent_to_a_dead_hop_leaves_no_request_pending(wire_store: Path) -> None:
    """A step sent on the link of a hop that died fails at once; its request must not stay pending (each
    one did, until the next failure of the chain set an exception nobody awaited)."""
    n = num_layers(wire_store, MODEL)
    with (
        LocalChain.even(wire_store, MODEL, n, 2) as lc,
        ChainClient(lc.chain, lc.secret(), timeout_s=30) as c,
    ):
        list(c.generate(Session(tokens=[1, 2, 3]), 2))
        os.kill(lc.pids[0], signal.SIGKILL)
        lc.processes[0].wait(timeout=30)
        for _ in range(3):
            with pytest.raises(ChainError):
                c.step("after", torch.tensor([[1, 2]]), 0)
            with pytest.raises(ChainError):
                c.control(0, "health")
        assert c.inner._pending == {}


def _on_two_chains(
    wire_store: Path, run: Callable[[LocalChain, LocalChain], Coroutine[Any, Any, None]]
) -> None:
    """Run ``run(old, new)`` on two 2-hop chains of separate servers under one deployment secret."""
    with (
        LocalChain.even(wire_store, MODEL, num_layers(wire_store, MODEL), 2) as old,
        LocalChain(wire_store, old.specs, secret_file=old.secret_file) as new,
    ):
        asyncio.run(run(old, new))


def test_a_dying_hop_fails_only_the_requests_that_need_it(wire_store: Path) -> None:
    """A hop of the current chain dies while a request to another chain's hop (a switch's, say) is still
    unanswered: the chain is marked broken, that request still gets its answer. Every pending request
    failed with the dead hop's error, so the replacement switch that came right after a kill got a 503."""

    async def run(old: LocalChain, new: LocalChain) -> None:
        client = await AsyncChainClient(old.chain, old.secret(), timeout_s=30).connect()
        links = await client._open(new.chain)
        try:
            os.kill(new.pids[1], signal.SIGSTOP)  # its answer cannot come before the old hop has died
            answer = asyncio.create_task(client._control_link(links[1], "health"))
            await asyncio.sleep(0.2)
            os.kill(old.pids[0], signal.SIGKILL)
            while client.broken is None:
                await asyncio.sleep(0.05)
            os.kill(new.pids[1], signal.SIGCONT)
            result, _ = await asyncio.wait_for(answer, 30)
            assert result["healthy"] is True
            assert client._pending == {}
        finally:
            os.kill(new.pids[1], signal.SIGCONT)
            for link in links:
                await link.close()
            await client.close()

    _on_two_chains(wire_store, run)


def test_a_session_dropped_during_a_switch_is_not_left_on_the_new_chain(wire_store: Path) -> None:
    """A client leaves while a replay switch moves the sessions: its session, already on the switch's move
    list, is dropped where the switch leaves it. Dropped on the old chain at once, it was rebuilt on the
    new chain and held there for good (the 10-minute soak's one leaked session)."""

    async def run(old: LocalChain, new: LocalChain) -> None:
        client = await AsyncChainClient(old.chain, old.secret(), timeout_s=30).connect()
        stays, leaves = Session(tokens=[5, 6, 7]), Session(tokens=[8, 9])
        live = {stays.id: stays, leaves.id: leaves}
        stopped = [old.pids[1], new.pids[0]]
        try:
            for session in live.values():
                async for _ in client.generate(session, 2):
                    pass
            os.kill(old.pids[1], signal.SIGSTOP)  # a step in flight there holds the switch's gate closed
            step = asyncio.create_task(client.generate(stays, 1).__anext__())
            await asyncio.sleep(0.2)
            switch = asyncio.create_task(client.switch(live.values(), new.chain, "replay"))
            while client._open_gate is not None and client._open_gate.is_set():
                await asyncio.sleep(0.01)
            os.kill(new.pids[0], signal.SIGSTOP)  # the move (the step's new token) waits there
            os.kill(old.pids[1], signal.SIGCONT)
            await asyncio.sleep(0.5)
            del live[leaves.id]  # what the gateway does when the client leaves, then it drops
            drop = asyncio.create_task(client.drop(leaves))
            await asyncio.sleep(0.5)
            os.kill(new.pids[0], signal.SIGCONT)
            await asyncio.wait_for(asyncio.gather(step, switch, drop), 60)
            assert client.chain == new.chain
            held = [(await client.control(i, "sessions"))[0]["sessions"] for i in range(2)]
            assert held == [[stays.id], [stays.id]]
        finally:
            for pid in stopped:
                os.kill(pid, signal.SIGCONT)
            await client.close()

    _on_two_chains(wire_store, run)


def test_links_to_next_hops_that_died_are_forgotten(wire_store: Path) -> None:
    """A server routed to a new next hop after each SIGKILL of the last one holds a link to the live one
    only: every dead hop's link stayed in its table before, with its closed connection's objects (the
    soak's surviving server grew ~2 MB a minute while 25 of its next hops were replaced)."""
    n = num_layers(wire_store, MODEL)
    with LocalChain.even(wire_store, MODEL, n, 2) as lc:
        first = lc.hops[0]
        assert lc.secret_file is not None
        for round_ in range(3):
            with LocalChain(wire_store, lc.specs[1:], secret_file=lc.secret_file) as last:
                chain = Chain(MODEL, (first, last.hops[0]))
                with ChainClient(chain, lc.secret()) as client:
                    session = Session(tokens=[5, 6, 7])
                    assert len(list(client.generate(session, 2))) == 2
                    client.drop(session)
                    assert client.stats()[0]["peer_links"] == 1, f"round {round_}"
                os.kill(last.pids[0], signal.SIGKILL)
                last.processes[0].wait(timeout=30)


@pytest.mark.parametrize("shared_hop", [False, True])  # prefilled before the gate / moved in the stall
def test_a_switch_that_failed_midway_can_be_retried(wire_store: Path, shared_hop: bool) -> None:
    """A replay switch fails after it rebuilt one session on the new chain (the next session's history
    is refused). The retry of the same switch must succeed and the session go on exactly: before, the
    first attempt's KV stayed on the new hops and every retry failed with a position mismatch."""
    from segments.store import read_manifest

    n = num_layers(wire_store, MODEL)
    vocab = read_manifest(wire_store, MODEL).info.vocab_size
    with (
        LocalChain.even(wire_store, MODEL, n, 2) as a,
        LocalChain.even(wire_store, MODEL, n, 2, secret_file=a.secret_file) as b,
        ChainClient(a.chain, a.secret(), timeout_s=30) as c,
    ):
        want = list(c.generate(Session(tokens=[1, 2, 3]), 6))
        session = Session(tokens=[1, 2, 3])
        got = list(c.generate(session, 3))
        refused = Session(tokens=[5, vocab + 5, 6], kv_length=2)  # its replay is a bad_request
        target = Chain(MODEL, (b.chain.hops[0], a.chain.hops[1])) if shared_hop else b.chain
        with pytest.raises(RemoteError):
            c.switch([session, refused], target, "replay")
        c.switch([session], target, "replay")
        got += list(c.generate(session, 3))
        assert got == want


def test_a_hop_ahead_of_the_client_is_cut_back_and_the_tokens_stay_exact(
    chain2: LocalChain, wire_store: Path
) -> None:
    """A step the client gave up on can still land on a hop (abandoned in a switch, found by bench soak):
    that hop, and the next, then hold one token more than the session's kv_length. The next step's
    position mismatch is met by cutting every hop back to kv_length and stepping again, exactly."""
    prompt = [5, 6, 7, 8]
    want, _ = greedy_generate(ReferenceModel(wire_store, MODEL).forward, "r", torch.tensor([prompt]), 6)
    with ChainClient(chain2.chain, chain2.secret()) as client:
        session = Session(tokens=list(prompt))
        got = list(client.generate(session, 3))
        stale = raw_connect(chain2.ports[0], chain2.secret())
        hop1 = chain2.chain.hops[1]
        header = {"session": session.id, "request_id": "stale", "position": session.kv_length, "layer": 0,
                  "route": [f"{hop1.host}:{hop1.port}"], "channel": "nobody"}  # fmt: skip
        stale.sendall(encode_frame_bytes(FrameType.FORWARD, header, {"x": torch.tensor([session.pending])}))
        answer = recv_frame(stale)  # the last hop has no subscriber on "nobody": both hops computed it
        assert answer is not None and answer.header.get("code") == "unreachable", answer
        stale.close()
        got += list(client.generate(session, 3))
        assert got == want[0].tolist()
        client.drop(session)
