"""Testbed events: a pure detector that turns measured samples into Prefect events, and their emitter.

The daemon measures once per ``monitor_interval_s`` (link rate set in the kernel and goodput observed on
the bridge ports, node CPU use and liveness) and feeds the samples to :class:`Detector`, which is pure
(no clock, no I/O) and decides with thresholds and hysteresis:

- ``mec.link.degraded``: the link's rate has been below ``link_degraded_ratio`` x its nominal rate
  (the scenario's) for ``event_samples`` consecutive samples; ``mec.link.recovered`` once it is back at
  or above ``link_recovered_ratio`` x nominal for as many samples. The gap between the two ratios is the
  hysteresis: a rate that wobbles around one threshold fires nothing.
- ``mec.node.overloaded``: CPU use above ``node_overloaded_pct`` % of the node's share for
  ``event_samples`` samples; ``mec.node.recovered`` below ``node_recovered_pct`` % (or after a restore).
- ``mec.node.failed``: the node's containers stop running (one sample: a failure is not noise).

Resources follow the project's convention: ``mec.link.<a>-<b>`` and ``mec.node.<name>``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LINK_DEGRADED = "mec.link.degraded"
LINK_RECOVERED = "mec.link.recovered"
NODE_OVERLOADED = "mec.node.overloaded"
NODE_FAILED = "mec.node.failed"
NODE_RECOVERED = "mec.node.recovered"


@dataclass(frozen=True)
class Thresholds:
    link_degraded_ratio: float = 0.7
    link_recovered_ratio: float = 0.9
    node_overloaded_pct: float = 75.0
    node_recovered_pct: float = 60.0
    samples: int = 3

    def __post_init__(self) -> None:
        if not 0 < self.link_degraded_ratio < self.link_recovered_ratio <= 1:
            raise ValueError("need 0 < link_degraded_ratio < link_recovered_ratio <= 1 (hysteresis band)")
        if not 0 <= self.node_recovered_pct < self.node_overloaded_pct <= 100:
            raise ValueError("need 0 <= node_recovered_pct < node_overloaded_pct <= 100 (hysteresis band)")
        if self.samples < 1:
            raise ValueError("samples must be >= 1")


@dataclass(frozen=True)
class TestbedEvent:
    """A Prefect event as the daemon emits it (JSON-able)."""

    __test__ = False  # not a pytest class despite its name

    event: str
    resource_id: str
    payload: dict[str, Any]
    t_s: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "event": self.event,
            "resource_id": self.resource_id,
            "payload": self.payload,
            "t_s": self.t_s,
        }


@dataclass(frozen=True)
class LinkSample:
    link: str  # "a-b"
    t_s: float
    bw_mbit: float  # rate set in the kernel (HTB) now
    nominal_bw_mbit: float  # the scenario's rate
    observed_mbit: float = 0.0  # goodput carried over the last interval (both directions, max)
    # Wall clock (time.time) at which the daemon last changed this link's shaping, where it did: lets a
    # reaction be timed from the change itself, not from its detection.
    changed_at_s: float | None = None


@dataclass(frozen=True)
class NodeSample:
    node: str
    t_s: float
    alive: bool
    cpu_pct: float  # CPU use as % of the node's share over the last interval


@dataclass
class _LinkState:
    degraded: bool = False
    streak: int = 0
    last_bw_mbit: float | None = None
    bw_at_change: float | None = None


@dataclass
class _NodeState:
    failed: bool = False
    overloaded: bool = False
    streak: int = 0


@dataclass
class Detector:
    """Pure: samples in, events out; the state is the hysteresis memory."""

    thresholds: Thresholds = field(default_factory=Thresholds)
    _links: dict[str, _LinkState] = field(default_factory=dict)
    _nodes: dict[str, _NodeState] = field(default_factory=dict)

    def link(self, s: LinkSample) -> list[TestbedEvent]:
        st = self._links.setdefault(s.link, _LinkState())
        th = self.thresholds
        previous = st.last_bw_mbit if st.last_bw_mbit is not None else s.nominal_bw_mbit
        st.last_bw_mbit = s.bw_mbit
        crossing = (
            s.bw_mbit < th.link_degraded_ratio * s.nominal_bw_mbit
            if not st.degraded
            else s.bw_mbit >= th.link_recovered_ratio * s.nominal_bw_mbit
        )
        if not crossing:
            st.streak = 0
            st.bw_at_change = None
            return []
        if st.streak == 0:
            st.bw_at_change = previous
        st.streak += 1
        if st.streak < th.samples:
            return []
        st.streak = 0
        st.degraded = not st.degraded
        payload = {
            "link": s.link,
            "bw_mbit": round(s.bw_mbit, 3),
            "previous_bw_mbit": round(st.bw_at_change if st.bw_at_change is not None else previous, 3),
            "nominal_bw_mbit": s.nominal_bw_mbit,
            "observed_mbit": round(s.observed_mbit, 3),
            "ratio": round(s.bw_mbit / s.nominal_bw_mbit, 4),
        }
        if s.changed_at_s is not None:
            payload["changed_at_s"] = round(s.changed_at_s, 6)
        name = LINK_DEGRADED if st.degraded else LINK_RECOVERED
        return [TestbedEvent(name, f"mec.link.{s.link}", payload, s.t_s)]

    def node(self, s: NodeSample) -> list[TestbedEvent]:
        st = self._nodes.setdefault(s.node, _NodeState())
        th = self.thresholds
        resource = f"mec.node.{s.node}"
        payload = {"node": s.node, "cpu_pct": round(s.cpu_pct, 2), "alive": s.alive}
        if not s.alive:
            st.streak = 0
            if st.failed:
                return []
            st.failed, st.overloaded = True, False
            return [TestbedEvent(NODE_FAILED, resource, payload, s.t_s)]
        if st.failed:
            st.failed = False
            st.streak = 0
            return [TestbedEvent(NODE_RECOVERED, resource, {**payload, "after": "failure"}, s.t_s)]
        crossing = (
            s.cpu_pct > th.node_overloaded_pct if not st.overloaded else s.cpu_pct < th.node_recovered_pct
        )
        if not crossing:
            st.streak = 0
            return []
        st.streak += 1
        if st.streak < th.samples:
            return []
        st.streak = 0
        st.overloaded = not st.overloaded
        if st.overloaded:
            return [TestbedEvent(NODE_OVERLOADED, resource, payload, s.t_s)]
        return [TestbedEvent(NODE_RECOVERED, resource, {**payload, "after": "overload"}, s.t_s)]


class EventSink:
    """Publishes events to Prefect when PREFECT_API_URL is set; always appends them to a JSONL log."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.use_prefect = bool(os.environ.get("PREFECT_API_URL"))

    def publish(self, event: TestbedEvent) -> None:
        with self.log_path.open("a") as f:
            f.write(json.dumps({**event.as_dict(), "wall_time": time.time()}) + "\n")
        if not self.use_prefect:
            return
        try:
            from prefect.events import emit_event

            emit_event(
                event=event.event,
                resource={"prefect.resource.id": event.resource_id},
                payload=event.payload,
            )
        except Exception as exc:  # the testbed must keep running when the Prefect server is away
            log.warning("could not emit %s to Prefect: %s", event.event, exc)
