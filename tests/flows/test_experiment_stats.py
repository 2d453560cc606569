"""The experiment's figures on synthetic requests: exact numbers, no network, no Prefect server."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import TINY_SCENARIO

from flows import results
from flows.experiment import (
    FASTER,
    ONE_RUN,
    SLOWER,
    UNRESOLVED,
    aggregate_policy,
    audit_moves,
    compare,
    mean_interval,
    nothing_ran,
    policy_stats,
    run_order,
    summarise_run,
    window_dir,
)
from flows.workload import RequestRecord
from testbed.scenario import Constraints


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
    # Each request's latency over its 5 tokens: (0.4 + 0.4) / 5, (0.6 + 1.3) / 5, (0.8 + 0.55) / 5.
    assert stats["mean_latency_per_token_ms"] == pytest.approx((0.8 + 1.9 + 1.35) / 15 * 1e3, abs=0.01)
    assert stats["throughput_tok_s"] == 1.5
    assert stats["stalls"] == 2
    assert stats["total_stall_s"] == pytest.approx((1.0 - 0.1) + (0.25 - 0.1))
    assert stats["first_token_stall_s"] == 0.0  # TTFTs 0.4-0.8 s: none beyond 2 x the median 0.6 s
    assert stats["longest_gap_ms"] == 1000.0
    assert "within_slo_requests" not in stats  # no SLO given: no verdict
    # Against a 0.7 s TTFT and a 0.2 s TPOT bound: the first request only (the second's mean gap is
    # 0.325 s, the third's first token came at 0.8 s).
    slo = policy_stats(records, window_s=10.0, slo=Constraints(slo_ttft_s=0.7, slo_tpot_s=0.2))
    assert slo["within_slo_requests"] == 1 and slo["goodput_requests_per_s"] == 0.1


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
    # 1.6x, but one run cannot tell that from noise: the goal needs "adaptive faster" beyond the interval.
    one = compare({"adaptive": {"mean_tpot_ms": 50.0}, "static": {"mean_tpot_ms": 80.0}})
    assert one["speedup_mean_tpot"] == 1.6 and one["verdict"] == ONE_RUN and one["goal_met"] is False


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
    assert "2.00x" in table and "one run: no interval" in table and "goal 1.3x not met" in table


# ---- repeats: intervals, the paired verdict, both folder layouts ------------------------------------------

T_975 = {
    2: 4.302652729749462,
    3: 3.1824463052837078,
}  # Student t(0.975, n - 1) for n = 3, 4 (tables: 4.303, 3.182)


def _window(gap_s: float, *, requests: int = 3, window_s: float = 10.0, **extra: object) -> dict[str, object]:
    """One window's figures from synthetic requests whose every token gap is ``gap_s``."""
    records = [_request([gap_s] * 4) for _ in range(requests)]
    return {**policy_stats(records, window_s), "window_s": window_s, "reconfigurations": 0, **extra}


def _policy(name: str, gaps_s: list[float]) -> dict[str, object]:
    return aggregate_policy(name, [{**_window(g), "repeat": k} for k, g in enumerate(gaps_s, start=1)])


def test_mean_interval_is_the_student_t_interval() -> None:
    # 90, 95, 100: mean 95, sample sd 5, n 3: 95 ± t(0.975, 2) * 5 / sqrt(3) = 95 ± 12.4207
    interval = mean_interval([90.0, 95.0, 100.0])
    assert interval.n == 3 and interval.mean == 95.0
    assert interval.half_width == pytest.approx(T_975[2] * 5 / 3**0.5)
    assert interval.half_width == pytest.approx(12.4207, abs=1e-4)
    assert (interval.low, interval.high) == (
        pytest.approx(82.5793, abs=1e-4),
        pytest.approx(107.4207, abs=1e-4),
    )
    same = mean_interval([7.0, 7.0])  # no spread: the interval is the point
    assert (same.low, same.high) == (7.0, 7.0)
    with pytest.raises(ValueError):
        mean_interval([])


def test_one_run_has_no_interval() -> None:
    interval = mean_interval([93.9])
    assert interval.mean == 93.9 and interval.half_width is None
    assert interval.low is None and interval.high is None
    entry = _policy("static", [0.09])
    assert entry["repeats"] == 1 and entry["interval"] == ONE_RUN
    assert entry["mean_tpot_ms"] == 90.0 and entry["over_repeats"]["mean_tpot_ms"]["low"] is None
    assert entry["requests"] == 3 and entry["window_s"] == 10.0  # one run: its figures stay flat, as before
    cmp = compare({"adaptive": _policy("adaptive", [0.05]), "static": entry})
    assert cmp["speedup_mean_tpot"] == 1.8 and cmp["speedup_ci95"] is None and cmp["repeats"] == 1
    assert cmp["verdict"] == ONE_RUN and cmp["worse_beyond_noise"] is False and cmp["goal_met"] is False


def test_aggregate_means_intervals_and_lost_tokens_over_repeats() -> None:
    lost = {**_window(0.1), "tokens_lost": 4, "repeat": 2}
    runs = [
        {**_window(0.09), "repeat": 1, "predicted_tpot_ms": 70.1, "prediction_ratio": {"tpot": 1.3}},
        lost,
        {**_window(0.11), "repeat": 3},
        {"policy": "static", "repeat": 4, "error": "InfeasibleError: memory binds"},
    ]
    entry = aggregate_policy("static", runs)
    assert entry["repeats"] == 3 and entry["failed_repeats"] == 1 and len(entry["runs"]) == 4
    assert entry["mean_tpot_ms"] == 100.0
    tpot = entry["over_repeats"]["mean_tpot_ms"]
    assert tpot["values"] == [90.0, 100.0, 110.0]
    assert tpot["half_width"] == pytest.approx(T_975[2] * 10 / 3**0.5, abs=1e-3)  # 24.8413
    assert entry["tokens_lost"] == pytest.approx(4 / 3, abs=1e-3) and entry["tokens_lost_total"] == 4
    assert entry["throughput_tok_s"] == 1.5 and entry["over_repeats"]["throughput_tok_s"]["half_width"] == 0.0
    # keys it does not know (a later predicted-vs-measured block) are kept per repeat, not averaged
    assert "predicted_tpot_ms" not in entry and "prediction_ratio" not in entry["over_repeats"]
    assert entry["runs"][0]["prediction_ratio"] == {"tpot": 1.3}
    failed = aggregate_policy("petals", [{"policy": "petals", "repeat": 1, "error": "InfeasibleError: x"}])
    assert failed["error"] == "InfeasibleError: x" and failed["repeats"] == 0
    # One policy's failed windows beside another's are a finding; no window at all is a failed run.
    assert nothing_ran({"policies": {"static": entry, "petals": failed}, "results_dir": "r"}) is None
    why = nothing_ran({"policies": {"petals": failed}, "results_dir": "r"})
    assert why is not None and "InfeasibleError: x" in why and "r" in why


def test_verdict_adaptive_clearly_faster() -> None:
    # ratios static / adaptive per repeat 1.4, 1.5, 1.6, 1.5: mean 1.5, sd sqrt(0.02/3), n 4
    cmp = compare(
        {"adaptive": _policy("adaptive", [0.1] * 4), "static": _policy("static", [0.14, 0.15, 0.16, 0.15])}
    )
    half = T_975[3] * (0.02 / 3) ** 0.5 / 2  # 0.12992
    assert cmp["repeats"] == 4 and cmp["speedup_per_repeat"] == [1.4, 1.5, 1.6, 1.5]
    assert cmp["speedup_mean_tpot"] == 1.5
    assert cmp["speedup_ci95"] == [pytest.approx(1.5 - half, abs=1e-4), pytest.approx(1.5 + half, abs=1e-4)]
    assert cmp["speedup_ci95"] == [1.3701, 1.6299]
    assert cmp["verdict"] == FASTER and cmp["worse_beyond_noise"] is False and cmp["goal_met"] is True
    assert cmp["best_static_mean_tpot_ms"] == 150.0 and cmp["adaptive_mean_tpot_ms"] == 100.0


def test_the_request_latency_side_is_compared_apart_from_the_gaps() -> None:
    """A policy with slower gaps but much faster first tokens loses on the gaps' verdict and wins on
    the requests' latency per token: both are reported, each against its own best other policy."""

    def window(gap_s: float, ttft_s: float, repeat: int) -> dict[str, object]:
        return {**policy_stats([_request([gap_s] * 3, ttft=ttft_s)] * 4, window_s=10.0), "repeat": repeat}

    adaptive = aggregate_policy("adaptive", [window(0.11, 0.2, k) for k in (1, 2, 3)])
    static = aggregate_policy("static", [window(0.10, 1.0, k) for k in (1, 2, 3)])
    cmp = compare({"adaptive": adaptive, "static": static})
    assert cmp["verdict"] == SLOWER
    side = cmp["latency_per_token"]
    assert side["best_static"] == "static"
    assert side["adaptive_ms"] == pytest.approx((0.2 + 0.33) / 4 * 1e3) and side["best_static_ms"] == 325.0
    assert side["speedup_mean"] == pytest.approx(1.3 / 0.53, abs=1e-3) and side["verdict"] == FASTER


def test_verdict_adaptive_clearly_slower() -> None:
    # ratios 0.8, 0.9, 0.85, 0.85: mean 0.85 ± t(0.975, 3) * sqrt(0.005/3) / 2 = 0.85 ± 0.06496
    cmp = compare(
        {"adaptive": _policy("adaptive", [0.1] * 4), "static": _policy("static", [0.08, 0.09, 0.085, 0.085])}
    )
    assert cmp["speedup_mean_tpot"] == 0.85 and cmp["speedup_ci95"] == [0.785, 0.915]
    assert cmp["verdict"] == SLOWER and cmp["worse_beyond_noise"] is True and cmp["goal_met"] is False


def test_verdict_overlapping_is_unresolved() -> None:
    # ratios 0.9, 1.1, 0.95, 1.05: mean 1.0 ± t(0.975, 3) * sqrt(0.025/3) / 2 = 1.0 ± 0.14526
    per_policy = {
        "adaptive": _policy("adaptive", [0.1] * 4),
        "static": _policy("static", [0.09, 0.11, 0.095, 0.105]),
        "exo": _policy("exo", [0.2] * 4),  # slower on average: not the best static-like policy
    }
    cmp = compare(per_policy)
    assert cmp["best_static"] == "static"
    assert cmp["speedup_mean_tpot"] == 1.0 and cmp["speedup_ci95"] == [0.8547, 1.1453]
    assert cmp["verdict"] == UNRESOLVED and cmp["worse_beyond_noise"] is False and cmp["goal_met"] is False


def test_pairing_cancels_a_drift_shared_by_a_repeat() -> None:
    # The machine got twice as slow in repeat 2 for both: unpaired means overlap, paired ratios do not.
    cmp = compare(
        {"adaptive": _policy("adaptive", [0.1, 0.2, 0.1]), "static": _policy("static", [0.11, 0.22, 0.11])}
    )
    assert cmp["speedup_per_repeat"] == [1.1, 1.1, 1.1] and cmp["verdict"] == FASTER
    # a repeat in which one of the two could not run is left out of the pairs
    adaptive = aggregate_policy("adaptive", [{**_window(0.1), "repeat": 1}, {"repeat": 2, "error": "E: x"},
                                            {**_window(0.1), "repeat": 3}])  # fmt: skip
    cmp = compare({"adaptive": adaptive, "static": _policy("static", [0.12, 0.5, 0.13])})
    assert cmp["repeats"] == 2 and cmp["speedup_per_repeat"] == [1.2, 1.3]
    assert cmp["best_static_mean_tpot_ms"] == pytest.approx(250.0)  # its mean over all its repeats


def test_interleaved_order_rotates() -> None:
    assert run_order(["adaptive", "static", "exo"], 4) == (
        ("adaptive", "static", "exo"), ("static", "exo", "adaptive"), ("exo", "adaptive", "static"),
        ("adaptive", "static", "exo"),
    )  # fmt: skip
    assert window_dir(Path("run"), "exo", 1, 1) == Path("run/exo")  # one repeat: the layout as before
    assert window_dir(Path("run"), "exo", 2, 3) == Path("run/exo/r2")


def _write_window(
    where: Path, records: list[RequestRecord], *, mtime_s: float, window_s: float = 10.0
) -> None:
    """What run_policy keeps for one window."""
    where.mkdir(parents=True)
    results.write_samples(where / "samples.parquet", [r.sample() for r in records])
    (where / "requests.json").write_text(json.dumps([{**vars(r), "lost": r.lost} for r in records]))
    stats = {**policy_stats(records, window_s), "window_s": window_s, "initial_plan": [["a", 0, 4]]}
    (where / "policy.json").write_text(
        json.dumps({"t0_wall_s": 999.0, "stats": stats, "plan_changes": [{"t_s": 2.0, "revision": 2}]})
    )
    for path in where.iterdir():
        os.utime(path, (mtime_s, mtime_s))


def test_summarise_run_with_repeats(tmp_path: Path) -> None:
    # A run cut short after 3 repeats (no summary.json yet): r<k>/ folders, ended in the rotated order.
    shutil.copy(TINY_SCENARIO, tmp_path / "scenario.yaml")
    gaps = {"adaptive": [0.1, 0.1, 0.1], "static": [0.14, 0.15, 0.16]}
    t = 1_000_000.0
    for k, ordered in enumerate(run_order(["adaptive", "static"], 3), start=1):
        for p in ordered:
            t += 100.0
            records = [_request([gaps[p][k - 1]] * 5, start=1000.0 + i) for i in range(4)]
            _write_window(tmp_path / p / f"r{k}", records, mtime_s=t)
    summary = summarise_run(tmp_path)
    assert summary["repeats"] == 3
    assert summary["run_order"] == [["adaptive", "static"], ["static", "adaptive"], ["adaptive", "static"]]
    static = summary["policies"]["static"]
    assert static["repeats"] == 3 and [r["repeat"] for r in static["runs"]] == [1, 2, 3]
    assert static["mean_tpot_ms"] == 150.0 and static["reconfigurations"] == 1
    assert static["over_repeats"]["mean_tpot_ms"]["half_width"] == pytest.approx(
        T_975[2] * 10 / 3**0.5, abs=1e-3
    )
    cmp = summary["adaptive_vs_best_static"]
    assert cmp["speedup_per_repeat"] == [1.4, 1.5, 1.6] and cmp["verdict"] == FASTER
    assert (tmp_path / "latency.png").stat().st_size > 10_000
    assert (tmp_path / "bars.png").stat().st_size > 10_000
    table = results.policy_table(summary)
    assert "| static | 150 ± 24.8 |" in table and "| 3 |" in table
    assert "3 paired repeats, 95 % interval" in table and "**adaptive faster**" in table
    again = summarise_run(tmp_path)  # now from its own summary.json: the same figures
    assert again["policies"] == summary["policies"] and again["run_order"] == summary["run_order"]


def test_summarise_run_old_layout_without_requests(tmp_path: Path) -> None:
    # Like results/reference/experiment-*: a summary from before repeats (figures flat), <policy>/policy.json
    # only (no requests.json, no samples, no scenario.yaml) and a policy that could not run.
    flat = {}
    for name, gap in (("adaptive", 0.0939), ("static", 0.0898)):
        stats = {**_window(gap), "policy": name, "initial_plan": [["car", 0, 1], ["mec", 1, 30]]}
        (tmp_path / name).mkdir()
        (tmp_path / name / "policy.json").write_text(
            json.dumps({"t0_wall_s": 1.0, "stats": stats, "plan_changes": []})
        )
        flat[name] = stats
    flat["petals"] = {"policy": "petals", "error": "InfeasibleError: memory binds"}
    old = {"scenario": "v2x", "backend": "testbed", "duration_s": 150.0, "scenario_duration_s": 150.0,
           "policies": flat, "adaptive_vs_best_static": {"speedup_mean_tpot": 0.956}}  # fmt: skip
    (tmp_path / "summary.json").write_text(json.dumps(old))
    summary = summarise_run(tmp_path)
    assert summary["scenario"] == "v2x" and summary["repeats"] == 1
    assert summary["run_order"] == [["adaptive", "static", "petals"]]
    assert list(summary["policies"]) == ["adaptive", "static", "petals"]
    adaptive = summary["policies"]["adaptive"]
    assert adaptive["mean_tpot_ms"] == 93.9 and adaptive["interval"] == ONE_RUN
    assert adaptive["initial_plan"] == [["car", 0, 1], ["mec", 1, 30]]
    assert summary["policies"]["petals"]["error"] == "InfeasibleError: memory binds"
    cmp = summary["adaptive_vs_best_static"]
    assert cmp["best_static"] == "static" and cmp["speedup_mean_tpot"] == 0.956 and cmp["verdict"] == ONE_RUN
    assert (tmp_path / "bars.png").exists() and not (tmp_path / "latency.png").exists()  # no samples kept
    assert "| petals | could not run: InfeasibleError" in results.policy_table(summary)


def _tokens_every(window: Path, t0_s: float, gap_s: float, until_s: float) -> None:
    """A window folder whose tokens arrived every ``gap_s`` from its workload's start until ``until_s``."""
    import pandas as pd

    window.mkdir(parents=True)
    times = [t0_s + k * gap_s for k in range(int(until_s / gap_s))]
    rows = {
        "request": [0] * len(times),
        "t_s": times,
        "kind": ["token"] * len(times),
        "latency_s": [gap_s] * len(times),
    }
    pd.DataFrame(rows).to_parquet(window / "samples.parquet")
    (window / "policy.json").write_text(json.dumps({"t0_wall_s": t0_s}))


def test_a_move_is_audited_against_the_static_window_of_the_same_repeat(tmp_path: Path) -> None:
    """Promised +20 % over a 60 s horizon; the adaptive window served a token every 0.125 s from 30 s on
    against static's 0.1 s, over the 40 s left of the shorter window: realised -20 %."""
    plan = [["car", 0, 1], ["mec", 1, 30]]
    adaptive = tmp_path / "adaptive" / "r1"
    _tokens_every(tmp_path / "static" / "r1", 5000.0, 0.1, 70.0)
    adaptive.mkdir(parents=True)
    import pandas as pd

    times = [1000.0 + k * 0.1 for k in range(300)] + [1030.0 + k * 0.125 for k in range(320)]
    pd.DataFrame({"request": 0, "t_s": times, "kind": "token", "latency_s": 0.1}).to_parquet(
        adaptive / "samples.parquet"
    )
    (adaptive / "policy.json").write_text(json.dumps({"t0_wall_s": 1000.0}))
    move = {"t_s": 30.0, "from": plan, "to": [["car", 0, 30]], "horizon_s": 60.0, "predicted_gain": 0.2}
    per_policy = {
        "adaptive": aggregate_policy(
            "adaptive", [{**_window(0.1, window_s=71.0), "repeat": 1, "moves": [move]}]
        ),
        "static": aggregate_policy(
            "static", [{**_window(0.1, window_s=70.0), "repeat": 1, "initial_plan": plan}]
        ),
        "petals": aggregate_policy(
            "petals", [{"policy": "petals", "repeat": 1, "error": "InfeasibleError: x"}]
        ),
    }
    audit = audit_moves(tmp_path, per_policy, repeats=2, against="static")
    assert audit is not None and audit["against"] == "static"
    (row,) = audit["moves"]
    assert row["span_s"] == 40.0 and row["left_static_plan"] and row["predicted_gain"] == 0.2
    assert row["tokens"] == [320, 400] and row["realised_gain"] == pytest.approx(-0.2)
    assert audit_moves(tmp_path, per_policy, repeats=2, against=None) is None
