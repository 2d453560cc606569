"""The switching headroom: the fixed plans' windows of a repeat, stretch by stretch, bound what adapting
among them could win; adaptive's own windows say how much of it it took."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import pytest

from flows.headroom import headroom

T0 = 1_800_000_000.0


def _window(folder: Path, gaps_by_stretch_s: Sequence[float], tokens: int = 20) -> Path:
    """A window whose tokens come ``gap`` apart in each 10 s stretch (``tokens`` of them per stretch)."""
    folder.mkdir(parents=True)
    rows = []
    for b, gap_s in enumerate(gaps_by_stretch_s):
        for i in range(tokens):
            rows.append(
                {"request": b, "t_s": T0 + 10 * b + 0.1 + i * 0.4, "kind": "token", "latency_s": gap_s}
            )
        rows.append({"request": b, "t_s": T0 + 10 * b + 0.05, "kind": "first", "latency_s": 5.0})
    pd.DataFrame(rows).to_parquet(folder / "samples.parquet")
    (folder / "policy.json").write_text(json.dumps({"t0_wall_s": T0}))
    return folder


def test_the_oracle_takes_the_faster_fixed_plan_in_each_stretch(tmp_path: Path) -> None:
    # The edge plan is fast but for a dip in stretches 2-3; the device plan is steady at 150 ms.
    edge = _window(tmp_path / "static", [0.1, 0.1, 0.4, 0.4, 0.1, 0.1])
    device = _window(tmp_path / "all_device", [0.15] * 6)
    # Adaptive moved to the device for the dip, late: stretch 2 at the edge's dip, stretch 3 on the device.
    adaptive = _window(tmp_path / "adaptive", [0.1, 0.1, 0.4, 0.15, 0.1, 0.1])
    out = headroom({1: {"static": edge, "all_device": device, "adaptive": adaptive}}, "static", "adaptive")
    assert out is not None
    row = out["per_repeat"][0]
    assert row["oracle_picks"] == {"all_device": 2, "static": 4}
    # Token-weighted: 6 stretches at 1 / gap tokens per second each.
    best_ms = 6 / (4 / 0.1 + 2 / 0.4) * 1e3
    oracle_ms = 6 / (4 / 0.1 + 2 / 0.15) * 1e3
    adaptive_ms = 6 / (4 / 0.1 + 1 / 0.4 + 1 / 0.15) * 1e3
    assert row["best_fixed_ms"] == pytest.approx(best_ms, abs=0.01)
    assert row["oracle_ms"] == pytest.approx(oracle_ms, abs=0.01)
    assert row["headroom"] == pytest.approx(best_ms / oracle_ms, abs=1e-4)
    assert row["adaptive_speedup"] == pytest.approx(best_ms / adaptive_ms, abs=1e-4)
    assert 0 < out["captured"] < 1  # it took part of what there was
    # Per request, its 5 s to first token counts too: each stretch's latency per token is (5 + 20 gap) / 21.
    per_request = headroom({1: {"static": edge, "all_device": device}}, "static", "adaptive", first=True)
    assert per_request is not None
    lpt = [(5 + 20 * g) / 21 for g in (0.1, 0.1, 0.4, 0.4, 0.1, 0.1)]
    assert per_request["per_repeat"][0]["best_fixed_ms"] == pytest.approx(
        6 / sum(1 / x for x in lpt) * 1e3, abs=0.01
    )


def test_a_best_plan_fastest_everywhere_leaves_nothing_to_win(tmp_path: Path) -> None:
    edge = _window(tmp_path / "static", [0.1, 0.12, 0.11])
    device = _window(tmp_path / "all_device", [0.15, 0.15, 0.15])
    adaptive = _window(tmp_path / "adaptive", [0.1, 0.15, 0.11])
    out = headroom({1: {"static": edge, "all_device": device, "adaptive": adaptive}}, "static", "adaptive")
    assert out is not None
    assert out["headroom_mean"] == 1.0 and out["per_repeat"][0]["oracle_picks"]["all_device"] == 0
    assert out["captured"] is None  # no room: no share of it
    assert out["per_repeat"][0]["adaptive_speedup"] < 1.0  # its move lost


def test_one_fixed_plan_gives_no_headroom(tmp_path: Path) -> None:
    edge = _window(tmp_path / "static", [0.1, 0.1])
    adaptive = _window(tmp_path / "adaptive", [0.1, 0.1])
    assert headroom({1: {"static": edge, "adaptive": adaptive}}, "static", "adaptive") is None
