"""Token choice from logits: greedy, or temperature / top-k / top-p sampling with a per-request seed.

The last segment samples, so only token ids cross the (slow) return link. The random stream depends only
on (seed, position, row), the position being that of the token whose logits are sampled, never on which
process samples or how the prompt was split into steps: a session moved to another chain, replayed, or
prefilled in chunks draws the same tokens from the same logits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

_MASK64 = (1 << 63) - 1


class SamplingError(ValueError):
    code = "bad_request"


@dataclass(frozen=True)
class SamplingParams:
    """``temperature == 0`` means greedy (argmax); ``top_k == 0`` and ``top_p == 1`` disable those filters."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, int | float) and 0.0 <= self.temperature <= 100.0):
            raise SamplingError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not (isinstance(self.top_p, int | float) and 0.0 < self.top_p <= 1.0):
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise SamplingError(f"top_k must be an int >= 0, got {self.top_k!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise SamplingError(f"seed must be an int, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplingParams:
        if not isinstance(data, dict) or not set(data) <= {"temperature", "top_p", "top_k", "seed"}:
            raise SamplingError(f"sampling must be an object of temperature, top_p, top_k, seed: {data!r}")
        return cls(**data)


def _stream_seed(seed: int, position: int, row: int) -> int:
    # A fixed mix (not Python's salted hash) so every process derives the same stream.
    return (seed * 1_000_003 + position * 7_919 + row * 104_729 + 1) & _MASK64


def sample_tokens(logits: torch.Tensor, params: SamplingParams, position: int) -> list[int]:
    """One token per row of ``logits`` [B, V] (the logits of the last position of each row).

    ``position`` is the KV length before the step that produced these logits, so every step of a session
    draws from its own random stream.
    """
    import torch

    if logits.dim() != 2:
        raise SamplingError(f"expected logits [B, V], got shape {tuple(logits.shape)}")
    if params.greedy:
        return [int(i) for i in torch.argmax(logits, dim=-1).tolist()]
    tokens: list[int] = []
    for row in range(logits.shape[0]):
        scores = logits[row].float() / params.temperature
        if params.top_k and params.top_k < scores.numel():
            kth = torch.topk(scores, params.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if params.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            cumulative = torch.cumsum(sorted_probs, dim=-1)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            drop = cumulative - sorted_probs >= params.top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        gen = torch.Generator().manual_seed(_stream_seed(params.seed, position, row))
        tokens.append(int(torch.multinomial(probs, 1, generator=gen).item()))
    return tokens
