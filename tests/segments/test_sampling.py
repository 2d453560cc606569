"""Token choice at the last hop: greedy is argmax, sampling depends only on (seed, position, row)."""

from __future__ import annotations

import pytest
import torch

from segments.sampling import SamplingError, SamplingParams, sample_tokens


def _logits(seed: int) -> torch.Tensor:
    return torch.randn(3, 50, generator=torch.Generator().manual_seed(seed))


def test_greedy_is_argmax() -> None:
    logits = _logits(0)
    assert sample_tokens(logits, SamplingParams(), 5) == logits.argmax(-1).tolist()


def test_sampling_is_reproducible_and_position_dependent() -> None:
    params = SamplingParams(temperature=1.0, seed=11)
    logits = _logits(1)
    a = [sample_tokens(logits, params, p) for p in range(20)]
    b = [sample_tokens(logits.clone(), params, p) for p in range(20)]
    assert a == b
    assert len({tuple(x) for x in a}) > 1  # different positions draw differently
    other = [sample_tokens(logits, SamplingParams(temperature=1.0, seed=12), p) for p in range(20)]
    assert other != a


def test_tiny_top_p_and_top_k_one_pick_the_argmax() -> None:
    logits = _logits(2)
    want = logits.argmax(-1).tolist()
    assert sample_tokens(logits, SamplingParams(temperature=1.0, top_p=1e-6, seed=3), 0) == want
    assert sample_tokens(logits, SamplingParams(temperature=2.0, top_k=1, seed=3), 0) == want


@pytest.mark.parametrize(
    "kwargs", [{"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -1}, {"seed": True}]
)
def test_bad_parameters_are_refused(kwargs: dict) -> None:
    with pytest.raises(SamplingError):
        SamplingParams(**kwargs)
