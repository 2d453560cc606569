"""`mecsplit testbed doctor`: real probes in a throw-away namespace, fixes for what is missing."""

from __future__ import annotations

import json
import subprocess

import pytest
from typer.testing import CliRunner

from testbed.doctor import run_checks


def _netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@pytest.mark.root
def test_doctor_probes_and_leaves_nothing() -> None:
    before = _netns()
    checks = run_checks()
    by_name = {c.name: c for c in checks}
    for name in ("root", "veth + Linux bridge", "tc htb", "iptables statistic (loss)", "link delay/loss"):
        assert by_name[name].ok, by_name[name]
    assert all(c.fix for c in checks if not c.ok), "every failed check must say how to fix it"
    assert _netns() == before


def test_doctor_json_output() -> None:
    from mecsplit.cli import app

    result = CliRunner().invoke(app, ["testbed", "doctor", "--json"])
    checks = json.loads(result.output)
    names = {c["name"] for c in checks}
    assert {
        "root",
        "docker engine",
        "mininet + mnexec",
        "netem",
        "NFQUEUE target",
        "link delay/loss",
    } <= names
    required_ok = all(c["ok"] for c in checks if c["required"])
    assert result.exit_code == (0 if required_ok else 1)
