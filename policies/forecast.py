"""How long the network's present lasts, from what the links just did (pure).

A re-plan pays off over time, so it must be judged by how long the conditions that make it better will
last. Cellular links swing both ways within seconds (the bundled traces: outages of a few seconds, then
back), while a failed backhaul or a loaded node can stay so for minutes. The forecast says, for each
link, how its rate has moved over the last ``WINDOW_S`` seconds (mean and spread: 10th and 90th
percentiles), and how long the present persists: the persistence time ``tau`` of a link's rate,
estimated from the lag-1 autocorrelation ``rho`` of its 1-second means (``tau = -1 s / ln rho``, an AR(1)
reading of the series), the shortest over the links, clipped to [``MIN_TAU_S``, ``MAX_TAU_S``]. A link
whose rate did not move persists ``MAX_TAU_S``; one that swings every second persists about a second.

Today's rates then hold with weight ``exp(-t / tau)`` at lag ``t``; over a horizon ``H`` that is
``W = tau (1 - exp(-H / tau))`` seconds of the present (``Forecast.weight_now``), which is what
``policies.replan.decide`` values a plan over.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

WINDOW_S = 60.0
MIN_TAU_S = 1.0
MAX_TAU_S = 120.0
# A history shorter than this many 1-second means says nothing about persistence.
MIN_SAMPLES = 10
DEFAULT_TAU_S = 30.0


@dataclass(frozen=True)
class LinkOutlook:
    """One link's recent past: its rate's mean and spread over the window, and its persistence."""

    now_mbit: float
    mean_mbit: float
    p10_mbit: float
    p90_mbit: float
    tau_s: float | None  # None: too short a history to tell


@dataclass(frozen=True)
class Forecast:
    links: Mapping[str, LinkOutlook]
    tau_s: float  # how long the present persists (the most volatile link's)

    def weight_now(self, horizon_s: float) -> float:
        """Seconds of ``horizon_s`` that today's rates are expected to hold (``W`` above)."""
        if horizon_s <= 0:
            return 0.0
        return self.tau_s * (1.0 - math.exp(-horizon_s / self.tau_s))

    def to_dict(self) -> dict[str, object]:
        return {"tau_s": round(self.tau_s, 3), "links": {k: vars(v) for k, v in sorted(self.links.items())}}


def persistent(now_mbit: Mapping[str, float]) -> Forecast:
    """No history: the present lasts."""
    return Forecast({k: LinkOutlook(v, v, v, v, None) for k, v in now_mbit.items()}, MAX_TAU_S)


def forecast(
    history: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    now_mbit: Mapping[str, float],
    now_s: float,
    *,
    window_s: float = WINDOW_S,
) -> Forecast:
    """The forecast from each link's ``(times, rates)`` history (the monitor's samples, oldest first)."""
    since = now_s - window_s
    outlooks = {}
    for link, now in now_mbit.items():
        times, rates = history.get(link, ((), ()))
        series = _seconds(times, rates, since)
        ordered = sorted(series) or [now]
        outlooks[link] = LinkOutlook(
            now_mbit=now,
            mean_mbit=sum(ordered) / len(ordered),
            p10_mbit=ordered[int(0.1 * (len(ordered) - 1))],
            p90_mbit=ordered[int(0.9 * (len(ordered) - 1))],
            tau_s=_persistence_s(series),
        )
    known = [o.tau_s for o in outlooks.values() if o.tau_s is not None]
    return Forecast(outlooks, min(known) if known else DEFAULT_TAU_S)


def _seconds(times: Sequence[float], rates: Sequence[float], since: float) -> list[float]:
    """The rate's mean over each whole second since ``since`` (the monitor samples every 0.2 s)."""
    bins: dict[int, list[float]] = {}
    for t, r in zip(times, rates, strict=True):
        if t >= since:
            bins.setdefault(int(t), []).append(r)
    return [sum(bins[k]) / len(bins[k]) for k in sorted(bins)]


def _persistence_s(series: list[float]) -> float | None:
    if len(series) < MIN_SAMPLES:
        return None
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
