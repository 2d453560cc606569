"""What the links will do over a decision's horizon, from what they just did (pure).

A re-plan pays off over time, so it must be judged against the network it will meet, not the one it
sees now. Cellular links swing both ways within seconds (the bundled traces: outages of a few seconds,
then back), so "now" is a poor guess for a minute ahead and the long-run average a poor guess for the
next second. The forecast blends them:

- the link rates right now persist for a while: their weight at lag ``t`` is ``exp(-t / tau)``, with
  ``tau`` the persistence time estimated from the recent history (lag-1 autocorrelation of each link's
  rate, ``tau = -step / ln(rho)``, the shortest over the links, clipped to [``MIN_TAU_S``, ``MAX_TAU_S``]);
- the rest of the weight goes to the recent past as a whole: ``SCENARIOS`` joint snapshots of every
  link's rate, evenly spread over the last ``WINDOW_S`` seconds (joint, so links that fail together in
  the history fail together in the forecast).

A plan's value over the horizon ``H`` is the tokens it serves per session: the integral of ``1 / TPOT``
over the forecast (a session in a closed loop makes ``1 / TPOT`` tokens a second, and the mean per-token
latency over a run is the harmonic mean over time of TPOT, which is what this maximises). With the
weights above that integral is ``W / TPOT(now) + (H - W) * mean_i 1 / TPOT(snapshot_i)`` with
``W = tau (1 - exp(-H / tau))``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

WINDOW_S = 60.0
SCENARIOS = 8
MIN_TAU_S = 1.0
MAX_TAU_S = 120.0
# A history shorter than this says nothing about persistence: assume the present lasts this long.
DEFAULT_TAU_S = 30.0
MIN_SAMPLES = 10


@dataclass(frozen=True)
class Forecast:
    """Link rates now, the recent past as joint snapshots, and how long the present persists."""

    now_mbit: Mapping[str, float]  # link id "a-b" -> rate now
    snapshots: tuple[Mapping[str, float], ...]  # joint past rates, oldest first
    tau_s: float

    def weight_now(self, horizon_s: float) -> float:
        """The integral over [0, horizon] of the present's weight (``W`` in the module docstring)."""
        if horizon_s <= 0:
            return 0.0
        return self.tau_s * (1.0 - math.exp(-horizon_s / self.tau_s))

    def tokens(self, tpot_now_s: float, tpot_snapshots_s: Sequence[float], horizon_s: float) -> float:
        """Tokens one session gets over ``horizon_s`` from a plan with these per-token latencies."""
        w = self.weight_now(horizon_s)
        rest = horizon_s - w
        now = 0.0 if not math.isfinite(tpot_now_s) or tpot_now_s <= 0 else w / tpot_now_s
        if not tpot_snapshots_s or rest <= 0:
            return now + (rest / tpot_now_s if rest > 0 and 0 < tpot_now_s < math.inf else 0.0)
        rates = [0.0 if not math.isfinite(t) or t <= 0 else 1.0 / t for t in tpot_snapshots_s]
        return now + rest * sum(rates) / len(rates)


def persistent(now_mbit: Mapping[str, float]) -> Forecast:
    """The present forever (no history)."""
    return Forecast(dict(now_mbit), (), MAX_TAU_S)


def forecast(
    history: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    now_mbit: Mapping[str, float],
    now_s: float,
    *,
    window_s: float = WINDOW_S,
    scenarios: int = SCENARIOS,
) -> Forecast:
    """The forecast from each link's ``(times, rates)`` history (the monitor's samples, oldest first)."""
    since = now_s - window_s
    taus = []
    for times, rates in history.values():
        recent = [r for t, r in zip(times, rates, strict=True) if t >= since]
        tau = _persistence_s(list(zip(times, rates, strict=True)), since)
        if tau is not None and len(recent) >= MIN_SAMPLES:
            taus.append(tau)
    tau = min(taus) if taus else DEFAULT_TAU_S
    covered = [times[0] <= since + window_s / 2 for times, _ in history.values() if len(times) >= MIN_SAMPLES]
    if not history or not any(covered):
        return Forecast(dict(now_mbit), (), tau)
    picks = [since + window_s * (i + 0.5) / scenarios for i in range(scenarios)]
    snaps = tuple(_snapshot(history, now_mbit, t) for t in picks)
    return Forecast(dict(now_mbit), snaps, tau)


def _snapshot(
    history: Mapping[str, tuple[Sequence[float], Sequence[float]]], now_mbit: Mapping[str, float], t: float
) -> dict[str, float]:
    """Every link's rate at time ``t`` (a link with no sample by then: its rate now)."""
    snap = {link: now_mbit[link] for link in now_mbit}
    for link, (times, rates) in history.items():
        rate = _rate_at(times, rates, t)
        snap[link] = rate if rate is not None else now_mbit.get(link, 0.0)
    return snap


def _rate_at(times: Sequence[float], rates: Sequence[float], t: float) -> float | None:
    best = None
    for ti, ri in zip(times, rates, strict=True):
        if ti > t:
            break
        best = ri
    return best


def _persistence_s(samples: list[tuple[float, float]], since: float) -> float | None:
    """Persistence time of a link's rate from the lag-1 autocorrelation of its 1-second means."""
    seconds: dict[int, list[float]] = {}
    for t, r in samples:
        if t >= since:
            seconds.setdefault(int(t), []).append(r)
    keys = sorted(seconds)
    if len(keys) < MIN_SAMPLES:
        return None
    series = [sum(seconds[k]) / len(seconds[k]) for k in keys]
    mean = sum(series) / len(series)
    dev = [x - mean for x in series]
    var = sum(d * d for d in dev)
    if var <= 1e-12 * max(1.0, mean * mean):
        return MAX_TAU_S  # a steady link: its present lasts
    rho = sum(a * b for a, b in itertools.pairwise(dev)) / var
    if rho <= 0:
        return MIN_TAU_S
    if rho >= 1:
        return MAX_TAU_S
    return min(MAX_TAU_S, max(MIN_TAU_S, -1.0 / math.log(rho)))
