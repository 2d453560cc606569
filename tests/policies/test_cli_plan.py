from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from mecsplit.cli import app

EXAMPLE = str(Path(__file__).resolve().parents[2] / "policies" / "examples" / "smollm2_mec.json")


def test_plan_json_is_deterministic_and_valid() -> None:
    runner = CliRunner()
    a = runner.invoke(app, ["plan", "--problem", EXAMPLE, "--policy", "latency_dp", "--json"])
    b = runner.invoke(app, ["plan", "--problem", EXAMPLE, "--policy", "latency_dp", "--json"])
    assert a.exit_code == 0, a.output
    assert a.output == b.output
    plan = json.loads(a.output)
    assert plan["stages"][0]["first"] == 0 and plan["stages"][-1]["end"] == 30


def test_plan_table_and_infeasible_exit_code() -> None:
    runner = CliRunner()
    table = runner.invoke(app, ["plan", "--problem", EXAMPLE, "--policy", "exo"])
    assert table.exit_code == 0 and "TTFT" in table.output
    bad = runner.invoke(app, ["plan", "--problem", EXAMPLE, "--policy", "all_cloud"])
    assert bad.exit_code == 2
    assert "trust" in bad.output
