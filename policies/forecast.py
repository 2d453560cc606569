"""What the links will do over a decision's horizon, from what they just did (pure).

A re-plan pays off over time, so it must be judged against the network it will meet, not the one it
sees now. Cellular links swing both ways within seconds (the bundled traces: outages of a few seconds,
then back), while a failed backhaul or a loaded node can stay so for minutes. So "now" is a poor guess for
a minute ahead on one link and a good one on another. The forecast blends the present and the recent
past:

- today's rates persist for a while: their weight at lag ``t`` is ``exp(-t / tau)``, with ``tau`` the
  persistence time of the links' rates, estimated from the lag-1 autocorrelation ``rho`` of each link's
  1-second means over the last ``WINDOW_S`` seconds (``tau = -1 s / ln rho``, an AR(1) reading of the
  series; the shortest over the links, clipped to [``MIN_TAU_S``, ``MAX_TAU_S``]);
- the rest of the weight goes to the recent past as a whole: ``SNAPSHOTS`` joint snapshots of every
  link's rate, evenly spread over the window (joint, so links that failed together in the history fail
  together in the forecast).

A plan serves ``1 / J`` requests a second per session when a request costs it ``J`` (by default its
latency); over ``[a, b]`` the forecast expects ``P / J_now + (b - a - P) x mean_i 1 / J_i`` of them, with
``P = tau (exp(-a / tau) - exp(-b / tau))`` the present's share (``Forecast.served``). Each link's mean
and spread (10th and 90th percentiles) over the window are reported with it, and for each snapshot how
long the joint state it shows lasted (every link within ``RUN_TOLERANCE`` of its rate then): what a
controller that reacts within seconds could have followed (``policies.replan``).

Nodes' background loads are read the same way, as part of the joint state: their persistence bounds
``tau``, each snapshot holds every node's load then, and a state lasts while every load stays within
``LOAD_TOLERANCE`` of its level. Priced as lasting the whole horizon, a load seen for one second on
industrial's MEC server moved the model to the cloud, which served 20 s later, as the 40 s load was
half over, and stayed when it ended.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

WINDOW_S = 60.0
SNAPSHOTS = 8
MIN_TAU_S = 1.0
MAX_TAU_S = 120.0
# A history shorter than this many 1-second means says nothing about persistence or the past.
MIN_SAMPLES = 10
DEFAULT_TAU_S = 30.0
# Rates within this relative distance are one state (the controller's own change bar).
RUN_TOLERANCE = 0.1
# Loads (fractions of a node's CPU) within this absolute distance are one state (the controller's bar
# for a load change: a load is 0 most of the time, where no relative distance means anything).
LOAD_TOLERANCE = 0.1

Series = Mapping[str, tuple[Sequence[float], Sequence[float]]]  # name -> (times, values), oldest first


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
    """The present (``links``, ``tau_s``) and the recent past as joint snapshots of the rates.

    A plan is valued at a snapshot with two readings of the links. A decode step (one hidden state,
    about a tenth of a second) is short against the states of a cellular link (a second or more): the
    plan decodes at each moment's rate, so the token time is priced at the snapshot's own rates, and
    the mean over snapshots of requests served per second is the time average. A prompt's prefill
    (``prompt_tokens`` hidden states: 74 KB for SmolLM2 with 32 tokens, 6 s at 0.1 Mbit/s) lasts as long
    as the states: it moves at the link's mean rate over its span, so the time to first token is priced
    at ``smoothed``, each link's mean over a request around the snapshot. Priced at the moment's rate,
    every prefill that met a one-second dip counted as if it had lasted through the dip: on V2X the plan
    over the 5G link was valued at 19-22 requests a minute and served 26, and moves off it that
    promised 14-27 % lost 7-11 % against the static plan."""

    links: Mapping[str, LinkOutlook]
    tau_s: float  # how long the present persists (the most volatile link's)
    snapshots: tuple[Mapping[str, float], ...] = ()  # joint past rates (link -> Mbit/s), oldest first
    lasting_s: tuple[float, ...] = ()  # per snapshot: how long its joint state lasted (to now at most)
    # Per snapshot: each link's mean rate over a request around it, which a prompt's prefill meets
    # (empty: the snapshots' own rates).
    smoothed: tuple[Mapping[str, float], ...] = ()
    # Per snapshot: each node's background load then (empty: the loads of today persist).
    loads: tuple[Mapping[str, float], ...] = ()
    # Per snapshot: how long each link's rate (each node's load) stayed as it was then; ``lasting_s`` is
    # the shortest of them (``policies.replan`` follows the state of what sets two plans apart).
    link_runs_s: tuple[Mapping[str, float], ...] = ()
    load_runs_s: tuple[Mapping[str, float], ...] = ()
    # Each node's load's persistence (None: too short a history); the links' are in ``links``.
    load_taus_s: Mapping[str, float | None] = dataclasses.field(default_factory=dict)

    def apart(self, links: Collection[str], nodes: Collection[str]) -> Forecast:
        """This forecast with the present lasting as long as the series in ``links`` and the loads of
        ``nodes`` persist (the shortest of those known), not as long as the most volatile series: a link
        that changes every second but alike for two plans does not make the state that sets them apart
        pass sooner (``policies.replan``). Unchanged when none of them has a known persistence."""
        taus = [o.tau_s for k, o in self.links.items() if k in links]
        taus += [t for n, t in self.load_taus_s.items() if n in nodes]
        known = [t for t in taus if t is not None]
        return dataclasses.replace(self, tau_s=min(known)) if known else self

    def present_s(self, start_s: float, end_s: float) -> float:
        """How much of ``[start, end]`` today's rates are expected to hold."""
        if end_s <= start_s:
            return 0.0
        return self.tau_s * (math.exp(-start_s / self.tau_s) - math.exp(-end_s / self.tau_s))

    def served(self, cost_now_s: float, past_costs_s: Sequence[float], start_s: float, end_s: float) -> float:
        """Requests one session gets over ``[start, end]`` from a plan whose request costs
        ``cost_now_s`` at today's rates and ``past_costs_s`` at each snapshot's (no snapshot: today's)."""
        if end_s <= start_s:
            return 0.0
        present = self.present_s(start_s, end_s)
        now = requests_per_s(cost_now_s)
        past = sum(requests_per_s(c) for c in past_costs_s) / len(past_costs_s) if past_costs_s else now
        return present * now + (end_s - start_s - present) * past

    def typical_mbit(self) -> dict[str, float]:
        """Each link's rate as a transfer sees it over the recent past: the harmonic mean of the
        snapshots' rates (a transfer's time goes as ``1 / rate``, so a second at 2 Mbit/s weighs what it
        costs, not what it averages). Empty without snapshots."""
        out: dict[str, float] = {}
        for link in self.snapshots[0] if self.snapshots else ():
            rates = [max(1e-3, s.get(link, 0.0)) for s in self.snapshots]
            out[link] = len(rates) / sum(1.0 / r for r in rates)
        return out

    def pessimistic(self, links: Collection[str]) -> Forecast:
        """This forecast with ``links`` at the low end of their recent range (their 10th percentile, at
        most today's rate) now and in every snapshot, and down where the history is too short to know that
        range. For links a plan has not yet carried: what the model knows of them is a probe or the
        monitor's rate, not what they do under the plan's traffic, so a move onto them is judged on what
        they may do rather than on their best (on a fluctuating cellular link the difference is the
        whole gain)."""
        low = {
            link: 0.0 if o.tau_s is None else min(o.now_mbit, o.p10_mbit)
            for link, o in self.links.items()
            if link in links
        }
        outlooks = {
            link: dataclasses.replace(o, now_mbit=low[link]) if link in low else o
            for link, o in self.links.items()
        }
        snapshots = tuple({k: min(v, low.get(k, v)) for k, v in s.items()} for s in self.snapshots)
        smoothed = tuple({k: min(v, low.get(k, v)) for k, v in s.items()} for s in self.smoothed)
        return dataclasses.replace(self, links=outlooks, snapshots=snapshots, smoothed=smoothed)

    def now_mbit(self) -> dict[str, float]:
        return {link: o.now_mbit for link, o in self.links.items()}

    def to_dict(self) -> dict[str, object]:
        return {
            "tau_s": round(self.tau_s, 3),
            "snapshots": len(self.snapshots),
            "links": {k: vars(v) for k, v in sorted(self.links.items())},
            "loads": [dict(sorted(x.items())) for x in self.loads],
        }


def requests_per_s(cost_s: float) -> float:
    """Requests a second one session gets from a plan whose request costs ``cost_s`` (0: never served)."""
    return 0.0 if not math.isfinite(cost_s) or cost_s <= 0 else 1.0 / cost_s


def persistent(now_mbit: Mapping[str, float]) -> Forecast:
    """No history: the present lasts."""
    return Forecast({k: LinkOutlook(v, v, v, v, None) for k, v in now_mbit.items()}, MAX_TAU_S)


def forecast(
    history: Series,
    now_mbit: Mapping[str, float],
    now_s: float,
    *,
    load_history: Series | None = None,
    now_load: Mapping[str, float] | None = None,
    window_s: float = WINDOW_S,
    snapshots: int = SNAPSHOTS,
    request_s: float = 0.0,
) -> Forecast:
    """The forecast from each link's ``(times, rates)`` history (the monitor's samples, oldest first) and
    each node's ``(times, loads)`` (``load_history``; ``now_load`` its load now).

    ``request_s``: how long a request takes; each snapshot then also has each link's mean rate over
    that long around it (``smoothed``, see ``Forecast``). 0: none."""
    since = now_s - window_s
    load_history, now_load = load_history or {}, now_load or {}
    outlooks = {}
    covered = False
    taus = []
    for link, now in now_mbit.items():
        times, rates = history.get(link, ((), ()))
        series = _seconds(times, rates, since)
        covered = covered or len(series) >= MIN_SAMPLES
        ordered = sorted(series) or [now]
        tau = _longest(_persistence_s(series), _mean_run_s(times, rates, since, now, _same_state))
        outlooks[link] = LinkOutlook(
            now_mbit=now,
            mean_mbit=sum(ordered) / len(ordered),
            p10_mbit=ordered[int(0.1 * (len(ordered) - 1))],
            p90_mbit=ordered[int(0.9 * (len(ordered) - 1))],
            tau_s=tau,
        )
        taus.append(tau)
    load_taus: dict[str, float | None] = {}
    for node, now in now_load.items():
        times, loads = load_history.get(node, ((), ()))
        series = _seconds(times, loads, since)
        covered = covered or len(series) >= MIN_SAMPLES
        load_taus[node] = _longest(_persistence_s(series), _mean_run_s(times, loads, since, now, _same_load))
        taus.append(load_taus[node])
    known = [t for t in taus if t is not None]
    tau = min(known) if known else DEFAULT_TAU_S
    if not covered:
        return Forecast(outlooks, tau, load_taus_s=load_taus)
    picks = [since + window_s * (i + 0.5) / snapshots for i in range(snapshots)]
    link_runs = tuple(_runs_s(history, now_mbit, t, now_s, _same_state) for t in picks)
    load_runs = tuple(_runs_s(load_history, now_load, t, now_s, _same_load) for t in picks)
    return Forecast(
        outlooks,
        tau,
        snapshots=tuple(_snapshot(history, now_mbit, t) for t in picks),
        lasting_s=tuple(
            min([*links.values(), *loads.values()], default=math.inf)
            for links, loads in zip(link_runs, load_runs, strict=True)
        ),
        smoothed=tuple(_snapshot(history, now_mbit, t, request_s, now_s) for t in picks if request_s > 0),
        loads=tuple(_snapshot(load_history, now_load, t) for t in picks) if now_load else (),
        link_runs_s=link_runs,
        load_runs_s=load_runs,
        load_taus_s=load_taus,
    )


def _runs_s(
    history: Series, now: Mapping[str, float], t: float, now_s: float, same: Callable[[float, float], bool]
) -> dict[str, float]:
    """For each series named in ``now``, how long the run of samples around ``t`` that stay the ``same``
    as the value at ``t`` lasted (a run still going counts to ``now_s``)."""
    runs = {}
    for name, (times, rates) in history.items():
        if name not in now or not times:
            continue
        k = max(0, bisect.bisect_right(times, t) - 1)
        lo = hi = k
        while lo > 0 and same(rates[lo - 1], rates[k]):
            lo -= 1
        while hi + 1 < len(rates) and same(rates[hi + 1], rates[k]):
            hi += 1
        end = now_s if hi + 1 == len(rates) else times[hi + 1]
        runs[name] = end - times[lo]
    return runs


def _snapshot(
    history: Series,
    now_mbit: Mapping[str, float],
    t: float,
    span_s: float = 0.0,
    now_s: float = math.inf,
) -> dict[str, float]:
    """Every link's rate at time ``t``, or with ``span_s`` its time-weighted mean over the ``span_s``
    around ``t`` (up to ``now_s``; each sample's rate holds until the next); a link with no sample by
    then: its rate now."""
    snap = dict(now_mbit)
    for link, (times, rates) in history.items():
        if link not in snap:
            continue
        rate = _mean_rate(times, rates, t - span_s / 2, min(t + span_s / 2, now_s)) if span_s > 0 else None
        if rate is None:
            k = bisect.bisect_right(times, t) - 1
            rate = rates[k] if k >= 0 else None
        if rate is not None:
            snap[link] = rate
    return snap


def _mean_rate(times: Sequence[float], rates: Sequence[float], start_s: float, end_s: float) -> float | None:
    """The time-weighted mean of the step series over ``[start, end]`` (from its first sample on)."""
    start_s = max(start_s, times[0]) if times else start_s
    if not times or end_s <= start_s:
        return None
    total = 0.0
    for k, (ti, ri) in enumerate(zip(times, rates, strict=True)):
        nxt = times[k + 1] if k + 1 < len(times) else math.inf
        overlap = min(nxt, end_s) - max(ti, start_s)
        if overlap > 0:
            total += ri * overlap
    return total / (end_s - start_s)


def _seconds(times: Sequence[float], rates: Sequence[float], since: float) -> list[float]:
    """The rate's mean over each whole second since ``since`` (the monitor samples every 0.1 s)."""
    bins: dict[int, list[float]] = {}
    for t, r in zip(times, rates, strict=True):
        if t >= since:
            bins.setdefault(int(t), []).append(r)
    return [sum(bins[k]) / len(bins[k]) for k in sorted(bins)]


def _same_state(rate: float, level: float) -> bool:
    return abs(rate - level) <= RUN_TOLERANCE * max(abs(level), 1e-9)


def _same_load(load: float, level: float) -> bool:
    return abs(load - level) <= LOAD_TOLERANCE


def _longest(ar1_s: float | None, runs_s: float | None) -> float | None:
    """A link's persistence by the estimator that sees it longer. They fail in opposite cases: the AR(1)
    reading takes a fresh step of a piecewise-constant rate (a link that just came back) for noise (its
    lag-1 correlation is near 0 at a change point: a few seconds), and the states' lengths take a rate
    that wobbles by more than ``RUN_TOLERANCE`` every second for many short states."""
    if ar1_s is None or runs_s is None:
        return ar1_s
    return min(MAX_TAU_S, max(ar1_s, runs_s))


def _mean_run_s(
    times: Sequence[float],
    rates: Sequence[float],
    since: float,
    now: float,
    same: Callable[[float, float], bool],
) -> float | None:
    """How long the series' states at today's value lasted: the mean length of its runs of samples the
    ``same`` as one level, at a level the same as ``now``, that ended within the window (the first
    counted from the window's start). None when no such state ended there (a steady link, or a rate not
    seen before)."""
    runs: list[tuple[float, float]] = []  # (start, level)
    for t, r in zip(times, rates, strict=True):
        if t >= since and (not runs or not same(r, runs[-1][1])):
            runs.append((t, r))
    lengths = [b[0] - a[0] for a, b in itertools.pairwise(runs) if same(a[1], now)]
    return sum(lengths) / len(lengths) if lengths else None


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
