"""Online calibration: the gateway's step telemetry turned into the cost model's coefficients.

The gateway traces every step (``segments.telemetry``: each stage's queue, compute wall and CPU time,
each hop's wire time and bytes). :func:`learn` maps a batch of those records onto the deployed plan's
nodes and feeds them to the pure estimators of ``policies.calibration`` against what the uncalibrated
model expects of the same step (the profile's time for that stage, the link's propagation and rate at
that moment). The state lives in ``$MECSPLIT_HOME/run/calibration.json`` (written atomically), so every
flow run and the controller (``flows.controller``) plan with the same coefficients.
"""

from __future__ import annotations

import bisect
import itertools
import os
import tempfile
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mecsplit.settings import Settings, get_settings
from policies.calibration import (
    Calibration,
    observe_concurrency,
    observe_decode,
    observe_hop,
    observe_prefill,
    observe_source,
)
from policies.problem import Problem
from policies.routes import Routes, all_routes, message_serialisation_s

# How far back a link's rate is looked up for a step (the monitor samples every 0.2 s).
RateAt = Callable[[str, str, float], float | None]


@dataclass(frozen=True)
class Snapshot:
    """What one read of ``/admin/telemetry`` gave: the records and the gateway's CPU / token counters."""

    seq: int
    at_s: float
    process_cpu_s: float
    tokens: int
    records: tuple[dict[str, Any], ...]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Snapshot:
        return cls(
            seq=int(data["seq"]), at_s=float(data["at_s"]), process_cpu_s=float(data["process_cpu_s"]),
            tokens=int(data["tokens"]), records=tuple(data.get("records", ())),
        )  # fmt: skip


def calibration_path(settings: Settings | None = None) -> Path:
    return (settings or get_settings()).run_dir / "calibration.json"


def load_calibration(settings: Settings | None = None) -> Calibration | None:
    """The saved calibration; None when there is none or it cannot be read (it is rebuilt from traffic)."""
    path = calibration_path(settings)
    try:
        return Calibration.model_validate_json(path.read_text())
    except (OSError, ValueError):
        return None


def save_calibration(cal: Calibration, settings: Settings | None = None) -> None:
    path = calibration_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".calibration-", suffix=".json")
    with os.fdopen(fd, "w") as handle:
        handle.write(cal.model_dump_json())
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class LinkHistory:
    """Each link's rate over time as the monitor read it, to price a step at the rate it met."""

    def __init__(self, horizon_s: float = 600.0) -> None:
        self.horizon_s = horizon_s
        self._t: dict[str, list[float]] = {}
        self._bw: dict[str, list[float]] = {}

    def add(self, link: str, t_s: float, bw_mbit: float) -> None:
        times, rates = self._t.setdefault(link, []), self._bw.setdefault(link, [])
        if times and t_s <= times[-1]:
            return
        times.append(t_s)
        rates.append(bw_mbit)
        cut = bisect.bisect_left(times, t_s - self.horizon_s)
        if cut > 64:
            del times[:cut], rates[:cut]

    def rate_at(self, link: str, t_s: float) -> float | None:
        times = self._t.get(link)
        if not times:
            return None
        k = bisect.bisect_right(times, t_s) - 1
        return self._bw[link][max(0, k)]

    def series(self, link: str, since_s: float) -> tuple[list[float], list[float]]:
        times, rates = self._t.get(link, []), self._bw.get(link, [])
        k = bisect.bisect_left(times, since_s)
        return times[k:], rates[k:]

    def links(self) -> list[str]:
        return sorted(self._t)


def learn(
    cal: Calibration,
    problem: Problem,
    hop_nodes: dict[str, str],
    snapshots: Sequence[Snapshot],
    rate_at: RateAt | None = None,
    node_busy: dict[str, float] | None = None,
) -> Calibration:
    """``cal`` updated with the steps of ``snapshots`` (in order). ``problem`` is uncalibrated-priced
    here (its profiles and links); ``hop_nodes`` maps each segment server's ``host:port`` to its node; a
    step naming a server not in it (an old chain's) is skipped. ``rate_at(a, b, t)`` gives the rate of
    link ``a``-``b`` at time ``t`` (None: the problem's); ``node_busy`` the share of each node's CPU quota
    that everything on it used lately, as its cgroup counts it (a standby booting included), which
    overrides what the steps alone show. A node under a background load (``problem``'s) teaches only
    its pace at its quota, and a transfer to or from it nothing (``observe_decode``): on industrial,
    the hop into the MEC server learned 16-20 ms of overhead under its load (its server's event loop
    starved) and kept it after the load: 11 ms of the 157-165 ms a token the plan through the server
    was priced at afterwards (measured 124-145 before the load), and it was never returned to."""
    base = problem.model_copy(update={"calibration": None})
    routes = all_routes(base)
    costs = {c.node: c for c in base.costs}
    caps = {n.name: n.cpu_share * (1 - n.load) if n.cpu_share else None for n in base.nodes}
    loaded = {n.name for n in base.nodes if n.load > 0}
    for snap in snapshots:
        ours = _busy_share(snap.records, hop_nodes, caps, base.source, cal.source_cpu_s)
        busy = dict(ours)
        for node, share in (node_busy or {}).items():
            busy[node] = max(busy.get(node, 0.0), share)
        crowded = _crowded(base, ours, node_busy or {})
        cal = _learn_concurrency(cal, snap.records)
        for record in snap.records:
            nodes = [hop_nodes.get(stage[0], "") for stage in record["stages"]]
            if any(n not in costs for n in nodes):
                continue
            cal = _learn_record(
                cal, base, routes, costs, caps, record, nodes, busy, rate_at, crowded=crowded, loaded=loaded
            )
    return _learn_source_cpu(cal, snapshots)


def _learn_record(
    cal: Calibration,
    problem: Problem,
    routes: Routes,
    costs: dict[str, Any],
    caps: dict[str, float | None],
    record: dict[str, Any],
    nodes: list[str],
    busy: dict[str, float],
    rate_at: RateAt | None,
    crowded: Collection[str] = (),
    loaded: Collection[str] = (),
) -> Calibration:
    positions = int(record["positions"])
    num_layers = problem.num_layers
    for (_hop, first, end, _queue, compute_s, cpu_s), node in zip(record["stages"], nodes, strict=True):
        if node in crowded:
            continue
        cost = costs[node]
        if positions == 1:
            expected = sum(cost.decode_s_per_token[first:end]) + (
                cost.head_decode_s_per_token if end == num_layers else 0
            )
            cal = observe_decode(
                cal, node, expected_s=expected, wall_s=compute_s, cpu_s=cpu_s,
                utilisation=busy.get(node, 0.0), capacity=caps.get(node), loaded=node in loaded,
            )  # fmt: skip
        elif node not in loaded:
            expected = positions * (
                sum(cost.prefill_s_per_token[first:end])
                + (cost.head_prefill_s_per_token if end == num_layers else 0)
            )
            cal = observe_prefill(cal, node, expected_s=expected, wall_s=compute_s)
    ends = [problem.source, *nodes, problem.source]
    for k, (nbytes, wire_s) in enumerate(record["wires"]):
        a, b = ends[k], ends[k + 1]
        if a in loaded or b in loaded:
            continue
        route = routes.get(a, b)
        if a == b:
            cal = observe_hop(cal, a, b, delay_s=0.0, ser_s=0.0, wire_s=wire_s)
            continue
        rate = _route_rate(problem, routes, a, b, record["at_s"], rate_at) or route.bw_mbit
        started_s = record["at_s"] - record["total_s"]
        if rate <= 0 or rate != (_route_rate(problem, routes, a, b, started_s, rate_at) or route.bw_mbit):
            # The link changed rate during the step: its wire time mixes two rates. Read against the
            # rate at its end, V2X's 5G uplink (its trace changes every second) gave prefill slopes of
            # 0.23-0.63 in one run and about 5 in another, and the slope prices every decode step.
            continue
        # The wire carries the frame (header included), so its bytes are what crossed the link; those
        # beyond the link's burst are what its rate slowed.
        ser_s = message_serialisation_s(route, nbytes, rate)
        cal = observe_hop(cal, a, b, delay_s=route.delay_s, ser_s=ser_s, wire_s=wire_s)
    idle = float(record.get("idle_s", 0.0))
    if positions == 1 and idle > 0 and problem.source not in loaded:
        cal = observe_source(cal, idle_s=idle)
    return cal


def _route_rate(
    problem: Problem, routes: Routes, a: str, b: str, t_s: float, rate_at: RateAt | None
) -> float | None:
    """The narrowest rate along the route a -> b at time ``t_s`` from the monitor's history."""
    if rate_at is None:
        return None
    path = routes.get(a, b).nodes
    rates = [rate_at(x, y, t_s) for x, y in itertools.pairwise(path)]
    known = [r for r in rates if r is not None]
    return min(known) if len(known) == len(rates) and known else None


# CPU beyond the node's background load and the chain's steps, as a share of the node's quota, that marks
# a process of ours starting beside the stages (a server, a standby loading): the steps' CPU misses only
# the servers' event loops, a few percent.
CROWDED_SHARE = 0.15


def _crowded(problem: Problem, ours: dict[str, float], node_busy: dict[str, float]) -> set[str]:
    """Nodes whose cgroup counted more CPU than their background load and the chain's steps explain by
    ``CROWDED_SHARE`` of their quota: a start runs beside the stages. Their steps teach the node's pace
    nothing: the decision rule prices a start beside a plan by itself (``policies.replan``), and a pace
    learned meanwhile stays with the node after the start; on smart city the pole, slowed twofold beside
    a start under load, kept being priced so after the load ended, and the plan it had left was never
    returned to."""
    out = set()
    for node in problem.nodes:
        if node.name not in node_busy or not node.cpu_share:
            continue
        steps = ours.get(node.name, 0.0) * (1.0 - node.load)  # ``ours`` is a share of what the load leaves
        if node_busy[node.name] - node.load - steps > CROWDED_SHARE:
            out.add(node.name)
    return out


def _busy_share(
    records: Sequence[dict[str, Any]],
    hop_nodes: dict[str, str],
    caps: dict[str, float | None],
    source: str,
    source_cpu_s: float,
) -> dict[str, float]:
    """Each node's CPU use over the batch's span as a share of its quota (1.0: at its quota): every
    step's CPU, prefills included (a quarter of a node's work when requests are 16 tokens)."""
    if len(records) < 2:
        return {}
    # From the first step's start to the last one's end: the steps' end times alone miss one step.
    span = max(r["at_s"] for r in records) - min(r["at_s"] - r["total_s"] - r["idle_s"] for r in records)
    if span <= 0:
        return {}
    cpu: dict[str, float] = {source: source_cpu_s * len(records)}
    for record in records:
        for stage in record["stages"]:
            node = hop_nodes.get(stage[0])
            if node is not None:
                cpu[node] = cpu.get(node, 0.0) + stage[5]
    return {n: c / span / cap for n, c in cpu.items() if (cap := caps.get(n))}


def _learn_concurrency(cal: Calibration, records: Sequence[dict[str, Any]]) -> Calibration:
    """Sessions generating at once (Little's law): steps per second x the mean time a step keeps its
    session (its step time plus the gateway's time before it)."""
    steps = [r for r in records if r["positions"] == 1 and r.get("idle_s", 0) > 0]
    if len(steps) < 10:
        return cal
    span = max(r["at_s"] for r in records) - min(r["at_s"] for r in records)
    if span <= 1.0:
        return cal
    per_step = sum(r["total_s"] + r["idle_s"] for r in steps) / len(steps)
    busy = sum(r["total_s"] for r in records) + sum(r["idle_s"] for r in steps)
    return observe_concurrency(cal, busy / span if per_step > 0 else 1.0)


def _learn_source_cpu(cal: Calibration, snapshots: Sequence[Snapshot]) -> Calibration:
    """The gateway's CPU per token between the first and the last snapshot (its counters grow)."""
    if len(snapshots) < 2:
        return cal
    first, last = snapshots[0], snapshots[-1]
    tokens = last.tokens - first.tokens
    if tokens < 5:
        return cal
    return observe_source(cal, cpu_s_per_token=(last.process_cpu_s - first.process_cpu_s) / tokens)


def hop_nodes_of(state_segments: Sequence[Any]) -> dict[str, str]:
    """``host:port`` of every deployed segment server -> its node (from the deployment state)."""
    return {f"{e.host}:{e.port}": e.node for e in state_segments}
