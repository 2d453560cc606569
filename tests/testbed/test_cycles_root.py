"""20 up/down cycles and a SIGKILLed daemon leave nothing with the prefix (root, Docker, Mininet)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from testbed import cleanup
from testbed.api import TestbedClient, start_daemon

pytestmark = [pytest.mark.root, pytest.mark.docker, pytest.mark.mininet, pytest.mark.slow]

PREFIX = "mecsplitc"
SCENARIO = """
name: pair
source: a
nodes:
  - {name: a, tier: device, cpus: 0.5, mem_mb: 256}
  - {name: b, tier: edge, cpus: 0.5, mem_mb: 256}
links:
  - {a: a, b: b, bw_mbit: 10, delay_ms: 2}
"""


def test_cycles_and_sigkill_leave_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MECSPLIT_HOME", str(tmp_path))
    monkeypatch.setenv("MECSPLIT_TESTBED__PREFIX", PREFIX)
    monkeypatch.setenv("MECSPLIT_TESTBED__DATA_NET", "10.225.0.0/16")  # not a developer's testbed's
    monkeypatch.setenv("MECSPLIT_TESTBED__MGMT_NET", "10.226.0.0/24")
    scenario = tmp_path / "pair.yaml"
    scenario.write_text(SCENARIO)
    run_dir = tmp_path / "run"
    cycle_s = []
    for _ in range(20):
        t0 = time.monotonic()
        start_daemon(scenario)
        with TestbedClient() as client:
            client.down()
        cycle_s.append(time.monotonic() - t0)
        left = cleanup.survey(PREFIX, run_dir)
        assert left.empty(), left.as_dict()
    print(f"20 cycles: mean {sum(cycle_s) / 20:.2f} s, max {max(cycle_s):.2f} s per up+down")

    state = start_daemon(scenario)
    with TestbedClient() as client:
        client.set_link("a", "b", bw_mbit=5, delay_ms=10)  # starts NFQUEUE shapers where there is no netem
        client.set_load("a", 30)
    os.kill(state["pid"], signal.SIGKILL)
    time.sleep(0.5)
    assert not cleanup.survey(PREFIX, run_dir).empty()  # the killed daemon left its network behind
    t0 = time.monotonic()
    left = cleanup.teardown(PREFIX, run_dir)
    print(f"down --force after SIGKILL: {time.monotonic() - t0:.2f} s")
    assert left.empty(), left.as_dict()
    assert not (run_dir / "daemon.pid").exists()
    assert not list(run_dir.glob("*.delay.*")), list(run_dir.iterdir())  # the delay shapers' files
    # Independent of cleanup's own matching: nothing in the system's listings names the prefix.
    for cmd in (["docker", "ps", "-a"], ["ip", "link"], ["ip", "netns"], ["iptables-save"]):
        assert PREFIX not in subprocess.run(cmd, capture_output=True, text=True).stdout, cmd
    assert not list(Path("/sys/fs/cgroup").glob(f"*/{PREFIX}*"))
