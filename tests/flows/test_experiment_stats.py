"""The experiment's figures on synthetic requests: exact numbers, no network, no Prefect server."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import TINY_SCENARIO

from flows import results
from flows.experiment import compare, policy_stats, summarise_run
from flows.workload import RequestRecord


def _request(gaps: list[float], *, ttft: float = 0.5, asked: int | None = None, finish: str | None = "length",
             error: str | None = None, start: float = 1000.0) -> RequestRecord:  # fmt: skip
    received = len(gaps) + 1
    return RequestRecord(
        started_at_s=start, asked=asked or received, ttft_s=ttft, token_gaps_s=tuple(gaps), received=received,
        finish=finish, error=error,
    )  # fmt: skip


def test_policy_stats_exact_figures() -> None:
    # 3 requests: two steady (gaps 0.1 s), one with a 1.0 s stall and one with a 0.25 s gap (> 2 x 0.1).
    records = [
        _request([0.1, 0.1, 0.1, 0.1], ttft=0.4),
        _request([0.1, 1.0, 0.1, 0.1], ttft=0.6),
        _request([0.1, 0.25, 0.1, 0.1], ttft=0.8, asked=8, finish="stop"),  # ended by the model: 0 lost
    ]
    stats = policy_stats(records, window_s=10.0)
    assert stats["requests"] == 3
    assert stats["tokens"] == 15
    assert stats["tokens_asked"] == 18
    assert stats["tokens_lost"] == 0
    assert stats["failed_requests"] == 0
    assert stats["median_tpot_ms"] == 100.0
    assert stats["mean_tpot_ms"] == pytest.approx(2.25 / 12 * 1e3, abs=0.01)  # 187.5
    assert stats["p95_tpot_ms"] == 1000.0  # nearest rank: 12 gaps, index 11
    assert stats["mean_ttft_ms"] == 600.0
    assert stats["p95_ttft_ms"] == 800.0
    assert stats["throughput_tok_s"] == 1.5
    assert stats["stalls"] == 2
    assert stats["total_stall_s"] == pytest.approx((1.0 - 0.1) + (0.25 - 0.1))
    assert stats["first_token_stall_s"] == 0.0  # TTFTs 0.4-0.8 s: none beyond 2 x the median 0.6 s
    assert stats["longest_gap_ms"] == 1000.0


def test_a_held_first_token_is_a_stall() -> None:
    # A request held 20 s before its first token (its chain rebuilt): median TTFT 0.5 s.
    records = [_request([0.1] * 3, ttft=0.5), _request([0.1] * 3, ttft=0.5), _request([0.1] * 3, ttft=20.0)]
    stats = policy_stats(records, window_s=30.0)
    assert stats["stalls"] == 1
    assert stats["token_stall_s"] == 0.0
    assert stats["first_token_stall_s"] == pytest.approx(19.5)
    assert stats["total_stall_s"] == pytest.approx(19.5)
    assert stats["mean_ttft_ms"] == 7000.0 and stats["p95_ttft_ms"] == 20000.0


def test_lost_tokens_count_failed_and_cut_requests() -> None:
    ok = _request([0.1] * 7)  # 8 of 8
    cut = _request([0.1, 0.1], asked=8, finish=None, error="RuntimeError: chain failed")  # 3 of 8
    nothing = RequestRecord(started_at_s=0.0, asked=8, ttft_s=None, token_gaps_s=(), received=0, finish=None,
                            error="ConnectError")  # fmt: skip
    short = _request([0.1], asked=8, finish="length")  # ended without error but short: counted as lost
    stats = policy_stats([ok, cut, nothing, short], window_s=4.0)
    assert stats["tokens_lost"] == 5 + 8 + 6
    assert stats["failed_requests"] == 2
    assert stats["tokens"] == 8 + 3 + 0 + 2
    assert stats["mean_ttft_ms"] == 500.0  # the request with no token has no TTFT
    assert nothing.sample() is None


def test_a_failed_requests_wait_is_a_stall() -> None:
    ok = [_request([0.1] * 4) for _ in range(3)]
    # 2 tokens in 0.6 s, then held until it failed 30.6 s after it started: 30 s waited, 29.9 beyond median.
    failed = RequestRecord(
        started_at_s=0.0, asked=5, ttft_s=0.5, token_gaps_s=(0.1,), received=2, finish=None,
        error="RuntimeError: no new chain came", failed_after_s=30.6,
    )  # fmt: skip
    stats = policy_stats([*ok, failed], window_s=40.0)
    assert failed.waited_before_failure_s == pytest.approx(30.0)
    assert stats["failed_wait_s"] == pytest.approx(29.9)
    assert stats["total_stall_s"] == pytest.approx(29.9)
    assert stats["tokens_lost"] == 3 and stats["failed_requests"] == 1


def test_empty_policy_has_every_field() -> None:
    stats = policy_stats([], window_s=5.0)
    assert stats["tokens"] == 0 and stats["tokens_lost"] == 0
    assert stats["mean_tpot_ms"] is None and stats["total_stall_s"] == 0.0


def test_compare_picks_best_static_like_policy() -> None:
    per_policy = {
        "adaptive": {"mean_tpot_ms": 100.0},
        "static": {"mean_tpot_ms": 150.0},
        "exo": {"mean_tpot_ms": 120.0},
        "petals": {"mean_tpot_ms": None},  # no tokens: not a candidate
    }
    cmp = compare(per_policy)
    assert cmp is not None
    assert cmp["best_static"] == "exo"
    assert cmp["speedup_mean_tpot"] == 1.2
    assert cmp["goal_met"] is False
    assert compare({"static": {"mean_tpot_ms": 1.0}}) is None
    assert compare({"adaptive": {"mean_tpot_ms": 50.0}, "static": {"mean_tpot_ms": 80.0}})["goal_met"] is True


def test_plots_and_table_from_synthetic_run(tmp_path: Path) -> None:
    per_policy = {}
    for name, gap in (("adaptive", 0.1), ("static", 0.2)):
        records = [_request([gap] * 5, start=1000.0 + i) for i in range(4)]
        (tmp_path / name).mkdir()
        results.write_samples(tmp_path / name / "samples.parquet", [r.sample() for r in records])
        stats = {**policy_stats(records, 10.0), "reconfigurations": 1 if name == "adaptive" else 0}
        (tmp_path / name / "policy.json").write_text(
            json.dumps({"t0_wall_s": 999.0, "stats": stats, "plan_changes": [{"t_s": 2.0}]})
        )
        per_policy[name] = stats
    summary = {"policies": per_policy, "adaptive_vs_best_static": compare(per_policy), "results_dir": "r"}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    results.plot_policies(tmp_path, [{"at_s": 3.0, "kind": "fail", "what": "rsu1"}])
    results.plot_policy_bars(tmp_path, per_policy)
    assert (tmp_path / "latency.png").stat().st_size > 10_000
    assert (tmp_path / "bars.png").stat().st_size > 10_000
    for name in per_policy:  # what run_policy keeps, so that summarise_run can recompute the figures
        records = [_request([0.1 if name == "adaptive" else 0.2] * 5, start=1000.0 + i) for i in range(4)]
        (tmp_path / name / "requests.json").write_text(json.dumps([vars(r) for r in records]))
        info = json.loads((tmp_path / name / "policy.json").read_text())
        info["stats"]["window_s"] = 10.0
        (tmp_path / name / "policy.json").write_text(json.dumps(info))
    shutil.copy(TINY_SCENARIO, tmp_path / "scenario.yaml")
    (tmp_path / "summary.json").write_text(json.dumps({**summary, "backend": "local", "duration_s": 10.0}))
    again = summarise_run(tmp_path)
    assert again["policies"]["static"]["mean_tpot_ms"] == 200.0
    assert again["policies"]["adaptive"]["reconfigurations"] == 1
    assert again["adaptive_vs_best_static"]["speedup_mean_tpot"] == 2.0
    failed = {**per_policy, "petals": {"policy": "petals", "error": "InfeasibleError: memory binds"}}
    results.plot_policy_bars(tmp_path, failed)
    assert compare(failed)["best_static"] == "static"
    assert "| petals | could not run: InfeasibleError" in results.policy_table({"policies": failed})
    table = results.policy_table(summary)
    assert "| adaptive | 100 | 100 |" in table
    assert "2.00x" in table and "goal 1.3x met" in table
