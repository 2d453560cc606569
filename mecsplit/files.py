"""Files the project writes and reads back: written whole or not at all, caches rebuilt when corrupt."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old file or the new one, never a part: a temp
    file beside it, flushed to disk, renamed over it (the directory synced so the rename survives a
    crash too). A crash mid-write used to leave a truncated JSON that failed every later run. ``mode``:
    the file's permissions (0o600 for what holds a secret)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened for fsync
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_json(path: Path, data: Any, mode: int = 0o644, **dumps: Any) -> None:
    write_atomic(path, json.dumps(data, **dumps), mode)


def read_cache(path: Path, warn: Callable[[str], None] = print) -> dict[str, Any]:
    """A JSON object cached at ``path``: {} where there is none, and where it is unreadable or not an
    object (said once through ``warn``; the caller rebuilds it)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        warn(f"cache {path} is unreadable ({type(exc).__name__}); rebuilding it")
        return {}
    if not isinstance(data, dict):
        warn(f"cache {path} holds no JSON object; rebuilding it")
        return {}
    return data


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    """Append one JSON line (a log read back line by line; a torn last line is skipped by its reader)."""
    with path.open("a") as handle:
        handle.write(json.dumps(row) + "\n")
