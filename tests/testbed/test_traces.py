"""Bandwidth traces: bundled files load, rates are scaled, clipped and floored, replay timing is right."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from testbed.trace import (
    MIN_BW_MBIT,
    TRACES_DIR,
    TraceError,
    bundled_trace_names,
    bundled_trace_path,
    iter_rates,
    load_trace,
    read_trace_columns,
)


def test_bundled_traces_carry_their_licences() -> None:
    names = bundled_trace_names()
    assert {"lte-driving-1", "lte-driving-2", "5g-static-1", "5g-walking-1"} <= set(names)
    readme = (TRACES_DIR / "README.md").read_text()
    assert (
        (TRACES_DIR / "LICENSE-GPL-3.0.txt").read_text().startswith("                    GNU GENERAL PUBLIC")
    )
    for name in names:
        assert f"`{name}.csv`" in readme, f"{name} has no attribution in traces/README.md"
    assert "CC BY 4.0" in readme and "modified" in readme.lower()


def test_two_direction_trace_columns() -> None:
    assert read_trace_columns(bundled_trace_path("lte-driving-2")) == ["down_mbit", "up_mbit"]


def test_load_floors_outages_and_keeps_real_values() -> None:
    up = load_trace(bundled_trace_path("lte-driving-2"), "up_mbit")
    assert len(up.t_s) == 600 and up.step_s == 1.0 and up.duration_s == 600.0
    assert min(up.bw_mbit) == MIN_BW_MBIT  # the raw trace has zero seconds (outages)
    assert up.bw_mbit[1] == pytest.approx(0.984)
    # The published summary gives max 1.236 Mbit/s for this column.
    assert max(up.bw_mbit) == pytest.approx(1.236, abs=1e-3)


def test_scale_and_clip(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("t_s,bw_mbit\n0,10\n1,0\n2,100\n3,30\n")
    trace = load_trace(path, scale=0.5, max_mbit=20, min_mbit=1)
    assert trace.bw_mbit == (5.0, 1.0, 20.0, 15.0)
    assert trace.mean_mbit() == pytest.approx(10.25)


def test_iter_rates_once_and_looped(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("t_s,bw_mbit\n10,1\n11,2\n12,3\n")
    trace = load_trace(path)
    assert list(iter_rates(trace)) == [(0.0, 1.0), (1.0, 2.0), (2.0, 3.0)]
    looped = list(itertools.islice(iter_rates(trace, loop=True), 7))
    assert looped == [(0.0, 1.0), (1.0, 2.0), (2.0, 3.0), (3.0, 1.0), (4.0, 2.0), (5.0, 3.0), (6.0, 1.0)]


@pytest.mark.parametrize(
    ("content", "column", "message"),
    [
        ("t_s,bw_mbit\n0,1\n", "up_mbit", "needs columns"),
        ("t_s,bw_mbit\n0,1\n0,2\n", "bw_mbit", "increasing"),
        ("t_s,bw_mbit\n0,-1\n", "bw_mbit", ">= 0"),
        ("t_s,bw_mbit\n0,abc\n", "bw_mbit", "not a number"),
        ("t_s,bw_mbit\n0,nan\n", "bw_mbit", "finite"),
        ("t_s,bw_mbit\n", "bw_mbit", "no data rows"),
        ("", "bw_mbit", "empty"),
    ],
)
def test_bad_trace_is_refused(tmp_path: Path, content: str, column: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(TraceError, match=message):
        load_trace(path, column)


def test_missing_trace(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="cannot read"):
        load_trace(tmp_path / "none.csv")
    with pytest.raises(TraceError, match="available: "):
        bundled_trace_path("none")
