"""What switching between the fixed plans a run measured could win at most, and how much adaptive won.

Every window of a run replays the same timeline from its workload's start, so the fixed-plan windows of
one repeat (``static`` and any baseline) say how each of those plans served every stretch of it. An
oracle that knew the whole timeline and switched for free would serve each stretch (``bin_s``) with the
plan whose tokens came fastest there. Its mean token gap against the best fixed plan's, over the same
stretches, is the most that adapting among those plans could gain (``headroom``): a scenario whose best
fixed plan is the fastest in every stretch gives adaptation nothing to win, whatever the controller
does. Adaptive's own gain over the same stretches says how much of that it took.

The bound is loose upwards: the fastest of several noisy means per stretch favours the oracle, more so
with short stretches and few tokens in each. It covers only the plans measured: a plan nobody ran may
do better.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows import results

BIN_S = 10.0  # a stretch of the timeline: several requests' tokens at the scenarios' request rates


@dataclass(frozen=True)
class Gaps:
    """One window's token gaps summed and counted per stretch of its timeline."""

    total_s: dict[int, float]
    count: dict[int, int]

    def mean_s(self, b: int) -> float:
        return self.total_s[b] / self.count[b]


def window_gaps(window: Path, bin_s: float = BIN_S, first: bool = False) -> Gaps | None:
    """The token gaps of a window (``samples.parquet``, token rows) by the stretch each token arrived in,
    with ``first`` each request's time to first token too (the stretch's mean is then the requests'
    latency per token); None where the window kept no samples."""
    frame = results.window_samples(window)
    if frame is None:
        return None
    tokens = frame if first else frame[frame["kind"] == "token"]
    total: dict[int, float] = {}
    count: dict[int, int] = {}
    for rel_s, gap_s in zip(tokens["rel_s"], tokens["latency_s"], strict=True):
        b = int(float(rel_s) // bin_s)
        total[b] = total.get(b, 0.0) + float(gap_s)
        count[b] = count.get(b, 0) + 1
    return Gaps(total, count)


def _token_weighted(means_s: Sequence[float]) -> float:
    """The mean gap of a plan that spends equal time in each stretch at these mean gaps: each stretch
    yields tokens at 1 / gap, so the mean over tokens is the harmonic mean."""
    return len(means_s) / sum(1.0 / m for m in means_s)


def repeat_headroom(fixed: Mapping[str, Gaps], best: str, adaptive: Gaps | None) -> dict[str, Any] | None:
    """One repeat: the oracle's, the best fixed plan's and adaptive's mean gaps over the stretches in
    which every window delivered tokens, and which plan the oracle picked how often. None when ``best``
    did not run or no stretch is shared."""
    if best not in fixed:
        return None
    windows = [*fixed.values(), *([adaptive] if adaptive is not None else [])]
    shared = sorted(set.intersection(*(set(g.count) for g in windows)))
    if not shared:
        return None
    picks = {b: min(sorted(fixed), key=lambda p: fixed[p].mean_s(b)) for b in shared}
    oracle_s = _token_weighted([fixed[picks[b]].mean_s(b) for b in shared])
    best_s = _token_weighted([fixed[best].mean_s(b) for b in shared])
    row: dict[str, Any] = {
        "stretches": len(shared),
        "best_fixed_ms": round(best_s * 1e3, 2),
        "oracle_ms": round(oracle_s * 1e3, 2),
        "headroom": round(best_s / oracle_s, 4),
        "oracle_picks": {p: sum(1 for b in shared if picks[b] == p) for p in sorted(fixed)},
    }
    if adaptive is not None:
        adaptive_s = _token_weighted([adaptive.mean_s(b) for b in shared])
        row["adaptive_ms"] = round(adaptive_s * 1e3, 2)
        row["adaptive_speedup"] = round(best_s / adaptive_s, 4)
    return row


def headroom(
    windows: Mapping[int, Mapping[str, Path]],
    best: str,
    adaptive: str,
    bin_s: float = BIN_S,
    first: bool = False,
) -> dict[str, Any] | None:
    """Per repeat (``windows[k][policy]``: that window's folder), the switching headroom among the fixed
    plans measured, against ``best``, on the token gaps (``first``: on the latency per token, times to
    first token included); None where no repeat has ``best`` beside another fixed plan (one fixed plan
    leaves nothing to switch to)."""
    rows = []
    for k in sorted(windows):
        gaps = {p: window_gaps(w, bin_s, first) for p, w in windows[k].items()}
        fixed = {p: g for p, g in gaps.items() if p != adaptive and g is not None}
        if len(fixed) < 2:
            continue
        row = repeat_headroom(fixed, best, gaps.get(adaptive))
        if row is not None:
            rows.append({"repeat": k, **row})
    if not rows:
        return None
    values = [r["headroom"] for r in rows]
    return {
        "bin_s": bin_s,
        "best_fixed": best,
        "fixed_plans": sorted({p for k in windows for p in windows[k] if p != adaptive}),
        "per_repeat": rows,
        "headroom_mean": round(statistics.fmean(values), 4),
        "headroom_max": round(max(values), 4),
        # Of what switching could win, the share adaptive took (1: all of it; < 0: it lost).
        "captured": _captured(rows),
    }


def _captured(rows: Sequence[Mapping[str, Any]]) -> float | None:
    room = [r["headroom"] - 1.0 for r in rows if "adaptive_speedup" in r]
    won = [r["adaptive_speedup"] - 1.0 for r in rows if "adaptive_speedup" in r]
    if not room or math.isclose(sum(room), 0.0, abs_tol=1e-9):
        return None
    return round(sum(won) / sum(room), 3)
