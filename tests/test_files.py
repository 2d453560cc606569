"""Files written whole or not at all, and caches that are rebuilt when corrupt."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mecsplit.files import read_cache, write_atomic, write_json


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "summary.json"
    write_json(path, {"run": 1})

    def crash(*_: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_json(path, {"run": 2})
    assert json.loads(path.read_text()) == {"run": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_write_atomic_creates_the_folder_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "run" / "state.json"
    write_atomic(path, "first")
    write_atomic(path, "second")
    assert path.read_text() == "second" and path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["state.json"]
    write_atomic(path, "secret", mode=0o600)
    assert path.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("content", ['{"edge": {"rate": 1', "[1, 2]", "\udcff"])
def test_a_corrupt_cache_is_reported_and_read_as_empty(tmp_path: Path, content: str) -> None:
    path = tmp_path / "links-testbed.json"
    path.write_text(content, errors="surrogateescape")
    said: list[str] = []
    assert read_cache(path, said.append) == {}
    assert len(said) == 1 and "rebuilding" in said[0] and str(path) in said[0]
    assert read_cache(tmp_path / "missing.json", said.append) == {} and len(said) == 1
