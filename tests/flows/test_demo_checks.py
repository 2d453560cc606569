"""The demo watches the serve process it waits on: a dead one fails the demo at once, with its log."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flows.demo import _check_serve, _wait_for_reconfigure
from flows.runtime import RuntimeFailure


def test_a_dead_serve_fails_the_wait_at_once_with_its_log(tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; print('PermissionError: runner_storage'); sys.exit(3)"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        proc.wait(timeout=30)
    _check_serve(None, log)  # no serve process: nothing to watch
    with pytest.raises(RuntimeFailure, match="exited with 3") as info:
        _wait_for_reconfigure(0.0, 600.0, lambda: _check_serve(proc, log))
    assert "runner_storage" in str(info.value) and str(log) in str(info.value)
