"""A bench killed while it builds its testbed leaves nothing of its prefix (root, Docker, Mininet).

``mecsplit bench links`` runs from a directory outside the checkout, as on the fresh machine where it
hung (the Mininet shells could not start there), and gets SIGTERM or SIGINT at one of its setup steps.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed import cleanup

pytestmark = [pytest.mark.root, pytest.mark.docker, pytest.mark.mininet]

BENCH_PREFIX = "mecsplitk"  # testbed.bench's own
REPO = Path(__file__).resolve().parents[2]
STEP_TIMEOUT_S = 120.0


def _docker_names(prefix: str) -> list[str]:
    out = subprocess.run(
        ["docker", "ps", "-a", "--filter", f"name=^{prefix}-", "--format", "{{.Names}}"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return out.stdout.split()


def _wait_for_line(proc: subprocess.Popen[str], marker: str) -> list[str]:
    """The bench's progress lines (stderr) up to the one containing ``marker``."""
    assert proc.stderr is not None
    seen: list[str] = []
    deadline = time.monotonic() + STEP_TIMEOUT_S
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            pytest.fail(f"the bench ended before {marker!r}: {seen[-20:]}")
        seen.append(line.rstrip())
        if marker in line:
            return seen
    pytest.fail(f"no {marker!r} within {STEP_TIMEOUT_S} s: {seen[-20:]}")


@pytest.mark.parametrize(
    ("marker", "sig"),
    [("network:", signal.SIGTERM), ("node dst: container", signal.SIGINT)],
    ids=["sigterm-while-mininet-builds", "sigint-while-containers-start"],
)
def test_a_bench_killed_during_setup_removes_its_testbed(
    tmp_path: Path, marker: str, sig: signal.Signals
) -> None:
    assert cleanup.survey(BENCH_PREFIX, exact=True).empty(), "a bench testbed is up already"
    env = {**os.environ, "MECSPLIT_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mecsplit.cli", "bench", "links", "--rates", "5", "--delays", "5",
         "--seconds", "1"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        seen = _wait_for_line(proc, marker)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=STEP_TIMEOUT_S)
        assert proc.returncode == 128 + sig, (proc.returncode, seen[-5:], err[-2000:])
        assert _docker_names(BENCH_PREFIX) == []
        left = cleanup.survey(BENCH_PREFIX, exact=True)
        assert left.empty(), left.as_dict()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        cleanup.teardown(BENCH_PREFIX, exact=True)
