"""Continuous batching: decode steps of several sessions run as one forward pass give each session what it
gets alone (the same greedy tokens; logits to the rounding of a larger matrix product), while sessions
join, leave and move to another chain."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from store_helpers import BIG, StoreFor, chain, generate
from wire_helpers import num_layers

from segments import store
from segments.client import AsyncChainClient, Session, control_once
from segments.errors import InputError, PositionMismatchError
from segments.launch import LocalChain
from segments.reference import ReferenceModel
from segments.runner import SegmentRunner
from segments.spec import SegmentSpec

TEXTS = (
    "The capital of France is",
    "Split models run on edge nodes",
    "Hello",
    "A car on a 5G link sends its hidden states to the roadside unit",
    "Once upon a time",
    "1, 2, 3,",
    "Edge computing",
    "The quick brown fox jumps over the lazy dog and then",
)
STEPS = 6


def _ids(store_dir: Path, model: str, text: str) -> torch.Tensor:
    return torch.tensor([store.load_tokenizer(store_dir, model)(text)["input_ids"]], dtype=torch.long)


def _assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """The convention of test_runner's padded batches: the tolerance scales with the logits."""
    atol = 1e-5 * max(1.0, float(want.abs().max()))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=atol)


@pytest.mark.exactness
@pytest.mark.parametrize("model", ["llama-tiny", "gpt2-tiny", "smollm2-135m"])
def test_sessions_stepped_together_get_what_each_gets_alone(model_store: StoreFor, model: str) -> None:
    """Eight sessions with prompts of 1-13 tokens on a two-segment chain. Two join every round, so each
    batch mixes sessions at different positions; each leaves after its last step, and one leaves after
    two, so the others go on without it."""
    store_dir = model_store(model)
    n = store.read_manifest(store_dir, model).num_layers
    prompts = [_ids(store_dir, model, text) for text in TEXTS]
    by_one = chain(store_dir, model, [n // 2], n)
    alone = [
        generate(lambda *a: _run(by_one, *a), ids, STEPS, session=f"alone{i}")
        for i, ids in enumerate(prompts)
    ]

    runners = chain(store_dir, model, [n // 2], n)
    last = {i: STEPS if i != 5 else 2 for i in range(len(prompts))}  # tokens each takes before leaving
    tokens: dict[int, list[int]] = {}
    logits: dict[int, list[torch.Tensor]] = {}
    positions: dict[int, int] = {}
    while len(tokens) < len(prompts) or any(len(tokens[i]) < last[i] for i in tokens):
        stepping = [i for i in tokens if len(tokens[i]) < last[i]]
        if stepping:
            x: list[torch.Tensor] = [torch.tensor([[tokens[i][-1]]]) for i in stepping]
            for runner in runners:
                done = runner.forward_batch(
                    [(f"s{i}", xi, positions[i]) for i, xi in zip(stepping, x, strict=True)]
                )
                x = [out for out in done if isinstance(out, torch.Tensor)]
                assert len(x) == len(stepping), done
            for i, out in zip(stepping, x, strict=True):
                logits[i].append(out)
                tokens[i].append(int(out[0, -1].argmax()))
                positions[i] += 1
                if len(tokens[i]) == last[i]:  # it leaves
                    assert all(r.drop_session(f"s{i}") for r in runners)
        for i in range(len(tokens), min(len(tokens) + 2, len(prompts))):  # two join; prompts run alone
            out = _run(runners, f"s{i}", prompts[i], 0, None)
            tokens[i], logits[i], positions[i] = [int(out[0, -1].argmax())], [out], prompts[i].shape[1]
    assert all(not r.sessions() for r in runners)
    for i, (want_tokens, want_logits) in enumerate(alone):
        assert tokens[i] == want_tokens[0, : last[i]].tolist(), i
        _assert_close(logits[i][0][0, -1], want_logits[0][0, -1])
        for step in range(1, last[i]):
            _assert_close(logits[i][step][0, -1], want_logits[step][0, -1])


def _run(
    runners: list[SegmentRunner], session: str, x: torch.Tensor, position: int, mask: torch.Tensor | None
) -> torch.Tensor:
    for runner in runners:
        x = runner.forward(session, x, position, mask)
    return x


def test_a_refused_step_fails_alone_and_a_failed_pass_changes_nothing(
    model_store: StoreFor, monkeypatch: pytest.MonkeyPatch
) -> None:
    store_dir = model_store("llama-tiny")
    runner = SegmentRunner(store_dir, SegmentSpec("llama-tiny", 0, 2), max_sessions=4, max_kv_bytes=BIG)
    for name in ("a", "b"):
        runner.forward(name, torch.tensor([[5, 6, 7]]), 0)
    out = runner.forward_batch([
        ("a", torch.tensor([[8]]), 3), ("b", torch.tensor([[8]]), 2), ("a", torch.tensor([[9]]), 4),
        ("c", torch.tensor([[8, 9]]), 0),
    ])  # fmt: skip
    assert isinstance(out[0], torch.Tensor) and out[0].shape[:2] == (1, 1)
    assert isinstance(out[1], PositionMismatchError)  # b holds 3 tokens
    assert isinstance(out[2], InputError) and "two steps" in str(out[2])
    assert isinstance(out[3], InputError) and "one token" in str(out[3])
    assert runner.kv_length("a") == 4 and runner.kv_length("b") == 3 and runner.sessions() == ["a", "b"]

    # A pass that raises (memory, say) leaves both as they were, and a session it began is gone.
    def fail(*_: object) -> torch.Tensor:
        raise MemoryError("no room for the pass")

    monkeypatch.setattr(runner, "_run", fail)
    with pytest.raises(MemoryError):
        runner.forward_batch(
            [("a", torch.tensor([[8]]), 4), ("b", torch.tensor([[8]]), 3), ("d", torch.tensor([[8]]), 0)]
        )
    assert runner.kv_length("a") == 4 and runner.kv_length("b") == 3 and runner.sessions() == ["a", "b"]


@pytest.mark.exactness
def test_a_batching_chain_serves_eight_concurrent_sessions_their_own_tokens_across_a_move(
    wire_store: Path,
) -> None:
    """Real servers on loopback with ``--max-batch 8``: eight sessions generate at once, move halfway to a
    second chain (KV moved) and go on; each gets the greedy tokens of its prompt alone, and the servers
    ran steps of several sessions together."""
    model = "llama-tiny"
    n = num_layers(wire_store, model)
    reference = ReferenceModel(wire_store, model)
    prompts = [_ids(wire_store, model, text) for text in TEXTS]
    want = [
        generate(reference.forward, ids, 2 * STEPS, session=f"ref{i}")[0][0].tolist()
        for i, ids in enumerate(prompts)
    ]

    async def run(old: LocalChain, new: LocalChain) -> list[list[int]]:
        client = await AsyncChainClient(old.chain, old.secret(), timeout_s=60).connect()
        sessions = [Session(tokens=ids[0].tolist()) for ids in prompts]
        try:
            for _ in range(2):  # STEPS tokens on the old chain, then the rest on the new one
                await asyncio.gather(*(_tokens(client, s, STEPS) for s in sessions))
                if client.chain == old.chain:
                    await client.switch(sessions, new.chain, "kv")
            return [s.tokens[len(ids[0]) :] for s, ids in zip(sessions, prompts, strict=True)]
        finally:
            await client.close()

    with (
        LocalChain.even(wire_store, model, n, 2, max_batch=8) as old,
        LocalChain(wire_store, old.specs, secret_file=old.secret_file, max_batch=8) as new,
    ):
        got = asyncio.run(run(old, new))
        largest = [asyncio.run(_largest_batch(lc, port)) for lc in (old, new) for port in lc.ports]
    assert got == want
    assert min(largest) > 1, largest


async def _largest_batch(lc: LocalChain, port: int) -> int:
    return int((await control_once(lc.host, port, lc.auth(), "stats", 10.0))["largest_batch"])


async def _tokens(client: AsyncChainClient, session: Session, count: int) -> None:
    async for _ in client.generate(session, count):
        pass


@pytest.mark.exactness
def test_a_prompt_fed_in_chunks_gets_the_tokens_of_one_prefill(wire_store: Path) -> None:
    """With ``prefill_chunk_tokens`` a long prompt is fed in steps of that many tokens (each traced as its
    own step); its greedy tokens, and its seeded sampled ones, are those of the prompt fed at once."""
    from segments.sampling import SamplingParams

    model = "llama-tiny"
    n = num_layers(wire_store, model)
    ids = _ids(wire_store, model, " ".join(TEXTS))[0].tolist()
    assert len(ids) > 40
    seeded = SamplingParams(temperature=0.9, seed=7)

    async def run(lc: LocalChain, chunk: int, sampling: SamplingParams | None) -> tuple[list[int], list[int]]:
        client = await AsyncChainClient(
            lc.chain, lc.secret(), timeout_s=60, prefill_chunk_tokens=chunk
        ).connect()
        session = Session(tokens=list(ids))
        try:
            async for _ in client.generate(session, STEPS, sampling):
                pass
            positions = [r["positions"] for r in client.telemetry.snapshot(0)["records"]]
            return session.tokens[len(ids) :], positions
        finally:
            await client.close()

    with LocalChain.even(wire_store, model, n, 2) as lc:
        whole, whole_steps = asyncio.run(run(lc, 0, None))
        chunked, chunked_steps = asyncio.run(run(lc, 16, None))
        assert asyncio.run(run(lc, 16, seeded))[0] == asyncio.run(run(lc, 0, seeded))[0]
    assert chunked == whole
    assert whole_steps[0] == len(ids) and max(chunked_steps) == 16
    assert (
        sum(chunked_steps) == sum(whole_steps)
        and len(chunked_steps) == len(whole_steps) + (len(ids) - 1) // 16
    )
