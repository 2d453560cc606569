"""The model store the runner tests use: the user's store where an entry is valid, else a temporary one."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import pairwise
from pathlib import Path

import pytest
import torch

from segments.reference import ForwardFn, greedy_generate
from segments.runner import SegmentRunner, run_chain
from segments.spec import SegmentSpec

StoreFor = Callable[[str], Path]
BIG = 1 << 34  # limits that never bind, for tests not about limits


@pytest.fixture(scope="session")
def model_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreFor]:
    """``model_store(name)`` -> a store folder holding a valid entry of ``name``.

    Reuses the user's store (``$MECSPLIT_HOME/store``) for entries that pass the checksum check, so a
    prepared machine converts nothing; otherwise prepares into a session-wide temporary store.
    """
    from mecsplit.settings import Settings
    from segments import store

    user_store = Settings().store_dir
    temp_store = tmp_path_factory.getbasetemp() / "model-store"
    chosen: dict[str, Path] = {}

    def store_for(name: str) -> Path:
        if name not in chosen:
            if store.is_prepared(user_store, name):
                chosen[name] = user_store
            else:
                store.prepare(name, temp_store, progress=False)
                chosen[name] = temp_store
        return chosen[name]

    yield store_for


def chain(store_dir: Path, model: str, boundaries: list[int], num_layers: int) -> list[SegmentRunner]:
    """Runners for the split of ``[0, num_layers)`` at ``boundaries``."""
    edges = [0, *boundaries, num_layers]
    return [
        SegmentRunner(store_dir, SegmentSpec(model, a, b), max_sessions=8, max_kv_bytes=BIG)
        for a, b in pairwise(edges)
    ]


def chain_forward(runners: list[SegmentRunner]) -> ForwardFn:
    def forward(session: str, inputs: torch.Tensor, position: int, mask: torch.Tensor | None) -> torch.Tensor:
        return run_chain(runners, session, inputs, position, mask)

    return forward


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b)
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def generate(
    forward: ForwardFn, ids: torch.Tensor, steps: int, mask: torch.Tensor | None = None, session: str = "s"
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    return greedy_generate(forward, session, ids, steps, mask)
