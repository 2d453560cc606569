"""The testbed CLI without a testbed: a broken scenario is refused with field and line, no daemon."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from mecsplit.cli import app


def test_up_refuses_a_broken_scenario(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MECSPLIT_HOME", str(tmp_path / "home"))
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: bad\nsource: a\nnodes:\n  - {name: a, tier: edge, cpus: 1, mem_mb: 64}\n"
        "links:\n  - {a: a, b: z, bw_mbit: 5}\n"
    )
    result = CliRunner().invoke(app, ["testbed", "up", "--scenario", str(bad)])
    assert result.exit_code == 2
    assert "line 6: links[0].b" in result.output
    assert not (tmp_path / "home" / "run").exists()


def test_status_without_a_testbed_says_how_to_start_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MECSPLIT_HOME", str(tmp_path))
    result = CliRunner().invoke(app, ["testbed", "status"])
    assert result.exit_code == 1
    assert "mecsplit testbed up --scenario" in result.output
