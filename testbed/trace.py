"""Bandwidth traces: CSV files of measured link rates, replayed one row per second on an emulated link.

A trace CSV has a ``t_s`` column (seconds from the start, increasing) and one or more rate columns in
Mbit/s (``bw_mbit``, or ``down_mbit``/``up_mbit``). The real traces the scenarios use are bundled in
``testbed/traces/`` with their licences (see the README there).

Rates are floored at :data:`MIN_BW_MBIT`: tc refuses a rate of 0, and an outage emulated with a rate of a
few bit/s would leave the packets already queued in HTB stuck for minutes after the outage ends, which real
radio links do not do (they drop or deliver within a few hundred ms). 0.1 Mbit/s keeps such a second an
effective outage for the model's traffic (a 64-token activation of SmolLM2 needs ~12 s at that rate)
while the link recovers as soon as the trace does.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

MIN_BW_MBIT = 0.1
TRACES_DIR = Path(__file__).resolve().parent / "traces"


class TraceError(ValueError):
    """A trace file that cannot be replayed (missing, no such column, bad numbers)."""


@dataclass(frozen=True)
class Trace:
    """A loaded trace: rates ``bw_mbit[i]`` hold from ``t_s[i]`` until ``t_s[i + 1]``."""

    path: Path
    column: str
    t_s: tuple[float, ...]
    bw_mbit: tuple[float, ...]

    @property
    def step_s(self) -> float:
        """Duration of the last sample (the median spacing), so a looped trace keeps its rhythm."""
        if len(self.t_s) < 2:
            return 1.0
        gaps = sorted(b - a for a, b in zip(self.t_s, self.t_s[1:], strict=False))
        return gaps[len(gaps) // 2]

    @property
    def duration_s(self) -> float:
        return self.t_s[-1] - self.t_s[0] + self.step_s

    def mean_mbit(self) -> float:
        return math.fsum(self.bw_mbit) / len(self.bw_mbit)


def bundled_trace_names() -> list[str]:
    return sorted(p.stem for p in TRACES_DIR.glob("*.csv"))


def bundled_trace_path(name: str) -> Path:
    """Path of the bundled trace ``name`` (file name without ``.csv``)."""
    path = TRACES_DIR / f"{name}.csv"
    if not path.is_file():
        raise TraceError(f"no bundled trace {name!r}; available: {', '.join(bundled_trace_names())}")
    return path


def is_bundled(path: Path) -> bool:
    return path.resolve().parent == TRACES_DIR


def header_note(path: Path, header: Sequence[str]) -> str:
    """``; it has a, b`` for a bundled trace; nothing for a user's file, whose contents an error must not
    echo (a scenario could otherwise name any file and read its first line in the error)."""
    return f"; it has {', '.join(header)}" if is_bundled(path) else ""


def read_trace_columns(path: Path) -> list[str]:
    """Rate columns of a trace CSV (every column but ``t_s``)."""
    header = _read_rows(path)[0]
    return [c for c in header if c != "t_s"]


def load_trace(
    path: Path | str,
    column: str = "bw_mbit",
    *,
    scale: float = 1.0,
    max_mbit: float | None = None,
    min_mbit: float = MIN_BW_MBIT,
) -> Trace:
    """Load one rate column of a trace CSV, multiplied by ``scale``, clipped to [min_mbit, max_mbit]."""
    path = Path(path)
    if scale <= 0 or min_mbit <= 0 or (max_mbit is not None and max_mbit < min_mbit):
        raise TraceError(f"need scale > 0 and 0 < min_mbit <= max_mbit, got {scale}, {min_mbit}, {max_mbit}")
    rows = _read_rows(path)
    header, body = rows[0], rows[1:]
    if "t_s" not in header or column not in header:
        raise TraceError(f"{path} needs columns 't_s' and {column!r}{header_note(path, header)}")
    it, ic = header.index("t_s"), header.index(column)
    times: list[float] = []
    rates: list[float] = []
    for lineno, row in enumerate(body, start=2):
        t_s, bw = _number(path, lineno, row, it), _number(path, lineno, row, ic)
        if bw < 0 or (times and t_s <= times[-1]):
            raise TraceError(f"{path}:{lineno}: rates must be >= 0 and t_s increasing")
        times.append(t_s)
        rates.append(clip_rate(bw * scale, min_mbit=min_mbit, max_mbit=max_mbit))
    if not times:
        raise TraceError(f"{path} has no data rows")
    return Trace(path=path, column=column, t_s=tuple(times), bw_mbit=tuple(rates))


def clip_rate(bw_mbit: float, *, min_mbit: float = MIN_BW_MBIT, max_mbit: float | None = None) -> float:
    bw = max(bw_mbit, min_mbit)
    return min(bw, max_mbit) if max_mbit is not None else bw


def iter_rates(trace: Trace, *, loop: bool = False) -> Iterator[tuple[float, float]]:
    """Yield ``(t_s, bw_mbit)`` from time 0 (the first row's ``t_s`` becomes 0); endless when ``loop``."""
    t0 = trace.t_s[0]
    offset = 0.0
    while True:
        for t_s, bw in zip(trace.t_s, trace.bw_mbit, strict=True):
            yield offset + t_s - t0, bw
        if not loop:
            return
        offset += trace.duration_s


def _read_rows(path: Path) -> list[list[str]]:
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            rows = [row for row in csv.reader(fh) if row]
    except OSError as exc:
        raise TraceError(f"cannot read trace {path}: {exc.strerror}") from exc
    except UnicodeDecodeError:
        raise TraceError(f"trace {path} is not a UTF-8 CSV") from None
    if not rows:
        raise TraceError(f"trace {path} is empty")
    rows[0] = [c.strip() for c in rows[0]]
    return rows


def _number(path: Path, lineno: int, row: list[str], index: int) -> float:
    try:
        value = float(row[index])
    except (IndexError, ValueError):
        raise TraceError(f"{path}:{lineno}: not a number in column {index + 1}") from None
    if not math.isfinite(value):
        raise TraceError(f"{path}:{lineno}: value must be finite, got {value}")
    return value
