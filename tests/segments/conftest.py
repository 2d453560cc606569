"""Fixtures shared by the modules of tests/segments.

``wire_store``: a temporary store with the tiny presets (the wire-side tests). ``model_store``: a valid
store entry per preset, reusing the user's store where it is valid (store_helpers).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from store_helpers import model_store  # noqa: F401  (fixture)
from wire_helpers import TINY


@pytest.fixture(scope="session")
def wire_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding the tiny presets (prepare is idempotent, so modules share one copy)."""
    from segments import store

    root = tmp_path_factory.getbasetemp() / "wire-store"
    for name in TINY:
        store.prepare(name, root, progress=False)
    return root
