"""SegmentRunner: bit-exact chains over every split, padded batches, KV moves between splits, limits."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from store_helpers import (
    BIG,
    StoreFor,
    chain,
    chain_forward,
    generate,
    max_abs_diff,
)

from segments import store
from segments.errors import (
    InputError,
    KVMemoryLimitError,
    LayerRangeError,
    PositionMismatchError,
    SessionLimitError,
    UnknownSessionError,
)
from segments.reference import ReferenceModel
from segments.runner import SegmentRunner
from segments.spec import SegmentSpec, split_evenly

TINY = ("gpt2-tiny", "llama-tiny", "qwen2-tiny")
STEPS = 6


def _prompt(store_dir: Path, model: str, text: str = "The capital of France is") -> torch.Tensor:
    tokenizer = store.load_tokenizer(store_dir, model)
    return torch.tensor([tokenizer(text)["input_ids"]], dtype=torch.long)


def _left_padded(store_dir: Path, model: str, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    tokenizer = store.load_tokenizer(store_dir, model)
    rows = [tokenizer(t)["input_ids"] for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return ids, mask


def _all_splits(num_layers: int) -> list[list[int]]:
    """Every single boundary, plus one segment per layer."""
    return [[cut] for cut in range(1, num_layers)] + [list(range(1, num_layers))]


@pytest.mark.exactness
@pytest.mark.parametrize("model", TINY)
def test_every_split_is_bit_exact(model_store: StoreFor, model: str) -> None:
    store_dir = model_store(model)
    ref = ReferenceModel(store_dir, model)
    ids = _prompt(store_dir, model)
    ref_tokens, ref_logits = generate(ref.forward, ids, STEPS)
    assert len(set(ref_tokens[0].tolist())) > 1, "a degenerate model would make this test vacuous"
    for boundaries in _all_splits(ref.info.num_layers):
        runners = chain(store_dir, model, boundaries, ref.info.num_layers)
        tokens, logits = generate(chain_forward(runners), ids, STEPS)
        assert torch.equal(tokens, ref_tokens), boundaries
        assert max_abs_diff(logits, ref_logits) == 0.0, boundaries
        assert [r.kv_length("s") for r in runners] == [ids.shape[1] + STEPS] * len(runners)


@pytest.mark.exactness
@pytest.mark.slow  # converts SmolLM2 (~35 s) unless the user's store has it; each chain then runs ~5 s
def test_smollm2_splits_are_exact_and_answer(model_store: StoreFor) -> None:
    model = "smollm2-135m"
    store_dir = model_store(model)
    ref = ReferenceModel(store_dir, model)
    ids = _prompt(store_dir, model)
    ref_tokens, ref_logits = generate(ref.forward, ids, 5)
    text = store.load_tokenizer(store_dir, model).decode(ref_tokens[0])
    assert "Paris" in text, text  # the real weights, not noise
    for parts in (2, 3, 4):
        runners = [
            SegmentRunner(store_dir, spec, max_sessions=2, max_kv_bytes=BIG)
            for spec in split_evenly(model, ref.info.num_layers, parts)
        ]
        tokens, logits = generate(chain_forward(runners), ids, 5)
        assert torch.equal(tokens, ref_tokens), parts
        assert max_abs_diff(logits, ref_logits) == 0.0, parts


def test_encoder_split_equals_whole(model_store: StoreFor) -> None:
    model = "minilm-l6"
    store_dir = model_store(model)
    tokenizer = store.load_tokenizer(store_dir, model)
    batch = tokenizer(
        ["edge nodes", "a longer sentence about splitting models"], padding=True, return_tensors="pt"
    )
    ref = ReferenceModel(store_dir, model)
    whole = ref.forward("x", batch["input_ids"], 0, batch["attention_mask"])
    assert whole.shape == (2, batch["input_ids"].shape[1], ref.info.hidden_size)
    for boundaries in _all_splits(ref.info.num_layers):
        runners = chain(store_dir, model, boundaries, ref.info.num_layers)
        out = batch["input_ids"]
        for runner in runners:
            out = runner.forward("x", out, 0, batch["attention_mask"])
        assert float((out - whole).abs().max()) == 0.0, boundaries
        assert runners[0].sessions() == []  # an encoder keeps no state
    with pytest.raises(PositionMismatchError):
        runners[0].forward("x", batch["input_ids"], 3, None)


@pytest.mark.parametrize("model", TINY)
def test_left_padded_batch_equals_one_by_one(model_store: StoreFor, model: str) -> None:
    store_dir = model_store(model)
    texts = ["Hello", "Split models run on edge nodes"]
    ids, mask = _left_padded(store_dir, model, texts)
    n = store.read_manifest(store_dir, model).num_layers
    batched_tokens, batched_logits = generate(
        chain_forward(chain(store_dir, model, [2], n)), ids, STEPS, mask
    )
    # The batched chain is bit-exact with the batched whole model...
    ref_tokens, ref_logits = generate(ReferenceModel(store_dir, model).forward, ids, STEPS, mask)
    assert torch.equal(batched_tokens, ref_tokens)
    assert max_abs_diff(batched_logits, ref_logits) == 0.0
    # ...and each row matches that prompt run alone (same tokens; logits to float tolerance, since the
    # kernels block a batch of 2 differently from a batch of 1). The tolerance is relative to the
    # logits' scale, not each element's: a reordered sum errs by ulps of what it accumulates, and a
    # fixed 1e-5 failed one logit of 49,152 (1.2e-5 off) on a CPU whose kernels block otherwise.
    for row, text in enumerate(texts):
        alone = _prompt(store_dir, model, text)
        tokens, logits = generate(chain_forward(chain(store_dir, model, [2], n)), alone, STEPS)
        assert torch.equal(tokens[0], batched_tokens[row])
        real = int(mask[row].sum())
        for step in range(STEPS + 1):
            got = batched_logits[step][row, -real:] if step == 0 else batched_logits[step][row]
            want = logits[step][0]
            atol = 1e-5 * max(1.0, float(want.abs().max()))
            torch.testing.assert_close(got, want, rtol=1e-5, atol=atol)


@pytest.mark.exactness
@pytest.mark.parametrize("model", TINY)
def test_kv_moves_to_a_chain_with_other_boundaries(model_store: StoreFor, model: str) -> None:
    store_dir = model_store(model)
    n = store.read_manifest(store_dir, model).num_layers
    ids = _prompt(store_dir, model)
    ref_tokens, ref_logits = generate(ReferenceModel(store_dir, model).forward, ids, STEPS)

    old = chain(store_dir, model, [1], n)  # [0,1) [1,4)
    old_fwd = chain_forward(old)
    old_fwd("s", ids, 0, None)
    position = ids.shape[1]
    for step in range(2):
        old_fwd("s", ref_tokens[:, step : step + 1], position, None)
        position += 1

    new = chain(store_dir, model, [3], n)  # [0,3) [3,4): layers 1 and 2 change hands
    new[0].import_kv("s", old[0].export_kv("s", 0, 1), position)
    with pytest.raises(PositionMismatchError, match="lacks KV for layers"):
        new[0].forward("s", ref_tokens[:, 2:3], position, None)
    new[0].import_kv("s", old[1].export_kv("s", 1, 3), position)
    new[1].import_kv("s", old[1].export_kv("s", 3, 4), position)
    for runner in old:
        assert runner.drop_session("s")
    assert all(r.kv_length("s") == position for r in new)

    new_fwd = chain_forward(new)
    for step in range(2, STEPS):
        logits = new_fwd("s", ref_tokens[:, step : step + 1], position, None)
        assert float((logits - ref_logits[step + 1]).abs().max()) == 0.0, step
        position += 1


@pytest.mark.exactness
def test_truncate_rolls_back_exactly(model_store: StoreFor) -> None:
    model = "llama-tiny"
    store_dir = model_store(model)
    runners = chain(store_dir, model, [2], 4)
    forward = chain_forward(runners)
    ids = _prompt(store_dir, model)
    forward("s", ids, 0, None)
    step = torch.tensor([[42]])
    first = forward("s", step, ids.shape[1], None)
    forward("s", torch.tensor([[7]]), ids.shape[1] + 1, None)
    for runner in runners:
        runner.truncate("s", ids.shape[1])
    again = forward("s", step, ids.shape[1], None)
    assert float((again - first).abs().max()) == 0.0
    with pytest.raises(PositionMismatchError):
        runners[0].truncate("s", 999)
    with pytest.raises(UnknownSessionError):
        runners[0].truncate("nope", 0)


def test_limits_and_bad_inputs_raise_typed_errors(model_store: StoreFor) -> None:
    model = "gpt2-tiny"
    store_dir = model_store(model)
    ids = _prompt(store_dir, model)
    runner = SegmentRunner(store_dir, SegmentSpec(model, 0, 2), max_sessions=1, max_kv_bytes=BIG)
    runner.forward("a", ids, 0)
    assert runner.kv_bytes() == ids.numel() * runner.kv_bytes_per_token
    with pytest.raises(SessionLimitError, match="max_sessions=1"):
        runner.forward("b", ids, 0)
    assert runner.sessions() == ["a"]
    with pytest.raises(PositionMismatchError, match=f"position={ids.shape[1]}"):
        runner.forward("a", ids[:, :1], 0)
    with pytest.raises(InputError):
        runner.forward("a", ids.float(), ids.shape[1])
    with pytest.raises(InputError, match="attention_mask"):
        runner.forward("a", ids[:, :1], ids.shape[1], torch.ones(1, 2, dtype=torch.long))
    assert runner.kv_length("a") == ids.shape[1]  # failed calls changed nothing
    assert runner.drop_session("a") and runner.kv_bytes() == 0 and not runner.drop_session("a")

    # Room for exactly the prompt: the next token must be refused and leave the cache as it was.
    tight = SegmentRunner(
        store_dir, SegmentSpec(model, 2, 4), max_sessions=4, max_kv_bytes=ids.numel() * 2 * 2 * 64 * 4
    )
    hidden = torch.zeros(1, ids.shape[1], 64)
    tight.forward("a", hidden, 0)
    with pytest.raises(KVMemoryLimitError, match="max_kv_bytes"):
        tight.forward("a", hidden[:, :1], ids.shape[1])
    assert tight.kv_length("a") == ids.shape[1]
    with pytest.raises(KVMemoryLimitError):
        tight.import_kv("b", tight.export_kv("a", 2, 4), ids.shape[1])
    with pytest.raises(InputError, match="float32 hidden states"):
        tight.forward("c", hidden.half(), 0)
    with pytest.raises(InputError, match="not inside"):
        tight.export_kv("a", 0, 2)
    with pytest.raises(LayerRangeError, match="has 4 layers"):
        SegmentRunner(store_dir, SegmentSpec(model, 2, 5), max_sessions=1, max_kv_bytes=BIG)


def test_spec_validation_and_json_round_trip() -> None:
    spec = SegmentSpec("gpt2-tiny", 1, 3)
    assert SegmentSpec.from_json(spec.to_json()) == spec
    assert spec.num_layers == 2
    for first, end in [(2, 2), (3, 1), (-1, 2)]:
        with pytest.raises(LayerRangeError):
            SegmentSpec("gpt2-tiny", first, end)
    assert [(s.first, s.end) for s in split_evenly("m", 30, 4)] == [(0, 8), (8, 16), (16, 23), (23, 30)]


def test_idle_sessions_are_evicted_and_used_ones_kept(model_store: StoreFor) -> None:
    """A session no forward has used for the idle limit is dropped with its KV; one used since is not."""
    model = "gpt2-tiny"
    store_dir = model_store(model)
    ids = _prompt(store_dir, model)
    runner = SegmentRunner(store_dir, SegmentSpec(model, 0, 2), max_sessions=2, max_kv_bytes=BIG)
    runner.forward("left", ids, 0)
    runner.forward("active", ids, 0)
    assert runner.evict_idle(3600.0) == []
    time.sleep(0.3)
    runner.forward("active", ids[:, :1], ids.shape[1])
    assert runner.evict_idle(0.2) == ["left"]
    assert runner.sessions() == ["active"]
    assert runner.kv_bytes() == (ids.numel() + 1) * runner.kv_bytes_per_token
    runner.forward("new", ids, 0)  # the evicted session's place in max_sessions is free again
