"""The cost model's coefficients as learned from live traffic, and the estimator that learns them (pure).

A profile says how fast a node computes a layer alone; a link's configured rate and RTT say how fast it
carries bytes. What a token really pays differs: host contention stretches compute, every transfer pays
a software cost (framing, event-loop wake-ups, the kernel) that neither a profile nor a link probe sees,
and the gateway on the source node has work of its own per token. :class:`Calibration` holds those
coefficients; ``policies.analytic`` prices plans with them. The estimator updates them from what the
running system measures (``segments.telemetry``: every traced step's compute and wire times), as plain
functions of (state, observation) -> state: the caller keeps the state and feeds the observations.

Estimators, and why: exponentially weighted moving averages (EWMA), arithmetic, because what a
token pays on average is a mean (a few long preemptions matter as much as many short steps).
- Per node: the CPU time of a stage against the profile's full-speed time (``cpu_scale``), and what its
  wall time adds to it (``wait_s``: the step waiting for a CPU behind the node's and the host's other
  processes) while the node's CPU quota is not what holds it back. Measured on the testbed, that wait is
  a few milliseconds per step whatever the stage's size (SmolLM2: 1.5 ms on 2 layers, 6.6 ms on 28),
  so it is added per step, not scaled with the work. One slowly drifting number each: one EWMA tracks
  it with one parameter, its weight per sample (``NODE_ALPHA``: about 30 steps, a few seconds).
- Per directed hop: ``wire - propagation = overhead + slope x bytes x 8 / rate``. Two unknowns, seen
  through two very different transfer sizes: decode steps (a few KB, serialisation well under
  ``SLOPE_MIN_SER_MS``) pin the fixed overhead given the slope, prefills (tens of KB) the slope given
  the overhead; the two alternate and settle on the line through both sizes without the conditioning
  trouble recursive least squares has when nearly every sample has one size. The overhead is an EWMA;
  the slope is the median of the hop's latest ``SLOPE_WINDOW`` prefills, because its outliers are
  one-offs: the first burst after a link's rate rises pays a slow start (2.8x the link's time on the
  testbed, the next ones 0.9-1.1x), and an EWMA would carry that into every decode step it prices
  for the next several requests.
- The gateway's own time and CPU per token: EWMAs.
"""

from __future__ import annotations

import math
import statistics

from pydantic import BaseModel, ConfigDict, Field

# CPU a segment server's compute thread spends on a step besides its layers (taking the request apart,
# the tensors in and out): measured on the testbed as what a 2-layer SmolLM2 stage takes beyond its
# layers' profiled time, 0.5-1.0 ms. A fixed cost per step, not per layer: without it the small stage's
# ratio (1.1-1.3) would be taken for the node's speed and applied to every layer of a bigger stage.
STEP_CPU_S = 0.0008
# Stages whose profiled time is shorter than this do not teach a node's speed per layer.
SCALE_MIN_EXPECTED_S = 0.010
# EWMA weight of one new sample (memory of ~1/alpha samples).
NODE_ALPHA = 0.03
SOURCE_ALPHA = 0.03
# EWMA weight of a hop's overhead sample.
HOP_ALPHA = 0.05
# Prefill-size transfers whose median is a hop's slope.
SLOPE_WINDOW = 9
# Transfers whose serialisation at the configured rate is shorter than this inform the overhead only.
SLOPE_MIN_SER_MS = 2.0
# The wait (wall - CPU) is learned only while the node is well inside its CPU quota: a throttled step's
# wall time is the quota's doing, which the contention model prices separately.
STRETCH_MAX_UTILISATION = 0.5
# Measurements outside these ratios are taken as broken, not as information.
_RATIO_RANGE = (0.05, 20.0)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class NodeCalibration(_Frozen):
    """How a node really computes against its profile: ``cpu_scale`` x the profile's full-speed time is
    its CPU work per layer; a step's wall time adds ``wait_s`` when the node is not held by its quota."""

    cpu_scale: float = Field(default=1.0, gt=0)
    wait_s: float = Field(default=0.0, ge=0)
    prefill_scale: float = Field(default=1.0, gt=0)
    # Held by its quota, the node's compute runs this much slower than its share alone allows (the
    # quota is enforced per period, and work waiting on other processes loses part of it): the mean of
    # its steps' paces, wall / CPU x share. Below 1 the steps ran in bursts faster than the share, and the
    # contention model takes the share alone (``Quota``, at least 1).
    quota_stretch: float = Field(default=1.0, gt=0)
    samples: int = Field(default=0, ge=0)


class HopCalibration(_Frozen):
    """Wire time of one directed hop beyond propagation: ``overhead_s + slope * bytes * 8 / rate``."""

    overhead_s: float
    slope: float = Field(default=1.0, gt=0)
    samples: int = Field(default=0, ge=0)
    slope_samples: int = Field(default=0, ge=0)
    slope_window: tuple[float, ...] = ()  # the latest prefills' ratios; ``slope`` is their median


class Calibration(_Frozen):
    """Everything the cost model learned from live traffic. Hops are keyed ``"a>b"`` (directed: the two
    directions of a link are shaped and loaded apart); ``"a>a"`` is a hop between two processes of one
    node (the gateway and a stage on the source). Hops never seen take the priors."""

    nodes: dict[str, NodeCalibration] = Field(default_factory=dict)
    hops: dict[str, HopCalibration] = Field(default_factory=dict)
    # Priors before any traffic: what the testbed measured for SmolLM2 (docs/policies.md); traffic replaces
    # them within seconds. Zero would make a plan's extra hops look free.
    hop_overhead_s: float = Field(default=0.0015, description="prior overhead of a hop between nodes")
    local_hop_overhead_s: float = Field(default=0.0015, ge=0, description="prior of a hop within one node")
    source_idle_s: float = Field(default=0.0007, ge=0, description="gateway time per token outside the chain")
    source_cpu_s: float = Field(default=0.0, ge=0, description="gateway CPU time per token (source node)")
    switch_stall_s: float = Field(
        default=0.3, ge=0, description="a switch's stall besides moving the sessions' KV (prior: measured)"
    )
    concurrency: float | None = Field(
        default=None, ge=1.0, description="sessions generating at once, as measured (None: the workload's)"
    )
    tokens: int = Field(default=0, ge=0, description="decode steps learned from")

    def node(self, name: str) -> NodeCalibration:
        """A node's coefficients; a node not seen yet takes the slowest of those seen, coefficient by
        coefficient. What slows one node on a shared host slows the others too, and a node priced at
        the median is chosen for being unknown whenever the seen ones were measured slower than their
        profile: on the demo the cloud, never served, was priced at the median wait of the device and
        the edge (14 ms a step), adopted, and measured 1.55x its prediction (32 ms a step). The same
        rule as for untried links: a move onto the unknown must pay even at the worst seen."""
        known = self.nodes.get(name)
        if known is not None:
            return known
        seen = [n for n in self.nodes.values() if n.samples > 0]
        if not seen:
            return NodeCalibration()
        return NodeCalibration(
            cpu_scale=max(n.cpu_scale for n in seen),
            wait_s=max(n.wait_s for n in seen),
            prefill_scale=max(n.prefill_scale for n in seen),
        )

    def hop_overhead(self, a: str, b: str) -> float:
        hop = self.hops.get(hop_key(a, b))
        if hop is not None:  # may be negative: a measured RTT that over-states propagation
            return hop.overhead_s
        return self.local_hop_overhead_s if a == b else self.hop_overhead_s

    def hop_slope(self, a: str, b: str) -> float:
        hop = self.hops.get(hop_key(a, b))
        return 1.0 if hop is None else hop.slope


def hop_key(a: str, b: str) -> str:
    return f"{a}>{b}"


def _clamp_ratio(value: float) -> float | None:
    lo, hi = _RATIO_RANGE
    return value if lo <= value <= hi and math.isfinite(value) else None


def _ewma(current: float, sample: float, alpha: float) -> float:
    return (1.0 - alpha) * current + alpha * sample


def _with_node(cal: Calibration, name: str, node: NodeCalibration) -> Calibration:
    return cal.model_copy(update={"nodes": {**cal.nodes, name: node}})


def observe_decode(
    cal: Calibration,
    node: str,
    *,
    expected_s: float,
    wall_s: float,
    cpu_s: float,
    utilisation: float,
    capacity: float | None,
    loaded: bool = False,
) -> Calibration:
    """One decode step's compute on ``node``: ``expected_s`` is the profile's full-speed time for the
    stage, ``wall_s`` / ``cpu_s`` what the hop measured, ``utilisation`` the share of the node's CPU
    quota (``capacity`` cores, None: none) in use over the last while: the wait is learned only where
    the quota cannot be what slowed the step (well inside it, or a quota of a core or more, which one
    compute thread cannot exceed); at the quota, how much slower than the quota alone allows.

    ``loaded``: the node carries a background load. The contention model prices a load from its share
    and ``quota_stretch``, so such a step teaches the stretch alone: learned into the unloaded
    coefficients, a load's pace stays with the node after the load ends, and a plan that left the node
    never serves there again to unlearn it."""
    if expected_s <= 0 or cpu_s <= 0 or wall_s <= 0:
        return cal
    ratio = _clamp_ratio(max(0.0, cpu_s - STEP_CPU_S) / expected_s)
    if ratio is None:
        return cal
    old = cal.nodes.get(node) or cal.node(node)  # a node's first samples start from the others' worst
    alpha = max(NODE_ALPHA, 1.0 / (old.samples + 1))  # the first samples weigh in fully
    cores = math.inf if capacity is None else capacity
    at_quota = utilisation > STRETCH_MAX_UTILISATION and cores < 1.0
    if loaded and not at_quota:
        return cal
    update: dict[str, float | int] = {"samples": old.samples + 1}
    if at_quota:
        # The mean of the paces themselves: a mean of paces each clipped at 1 reads a node whose steps
        # alternate between bursts and throttled waits as slower than its share (on the demo's device,
        # whole-model plans were predicted 1.2x what they measured).
        update["quota_stretch"] = _ewma(old.quota_stretch, wall_s / cpu_s * cores, alpha)
    else:
        update["wait_s"] = max(0.0, _ewma(old.wait_s, max(0.0, wall_s - cpu_s), alpha))
    # A stage of a few milliseconds says little about the node's speed per layer (its fixed cost and the
    # host's noise are as large as its layers): its samples teach the wait, not the scale.
    if not loaded and expected_s >= SCALE_MIN_EXPECTED_S:
        update["cpu_scale"] = _ewma(old.cpu_scale, ratio, alpha)
    return _with_node(cal, node, old.model_copy(update=update))


def observe_prefill(cal: Calibration, node: str, *, expected_s: float, wall_s: float) -> Calibration:
    """One prefill's compute on ``node`` against the profile's (sustained) prefill time for it."""
    if expected_s <= 0 or wall_s <= 0:
        return cal
    ratio = _clamp_ratio(wall_s / expected_s)
    if ratio is None:
        return cal
    old = cal.nodes.get(node) or cal.node(node)
    new = old.model_copy(update={"prefill_scale": _ewma(old.prefill_scale, ratio, 0.2)})
    return _with_node(cal, node, new)


def observe_hop(
    cal: Calibration, a: str, b: str, *, delay_s: float, ser_s: float, wire_s: float
) -> Calibration:
    """One transfer from ``a`` to ``b``: ``delay_s`` the route's one-way propagation, ``ser_s`` its bytes
    at the configured rate, ``wire_s`` what was measured."""
    if not (math.isfinite(delay_s) and math.isfinite(ser_s) and math.isfinite(wire_s)) or wire_s < 0:
        return cal
    key = hop_key(a, b)
    old = cal.hops.get(key) or HopCalibration(overhead_s=cal.hop_overhead(a, b))
    beyond = wire_s - delay_s
    if ser_s * 1e3 < SLOPE_MIN_SER_MS:
        # Too few bytes to tell a slower link from a fixed cost: the overhead, given the slope.
        alpha = max(HOP_ALPHA, 1.0 / (old.samples + 1))
        sample = beyond - old.slope * ser_s
        new = old.model_copy(
            update={"overhead_s": _ewma(old.overhead_s, sample, alpha), "samples": old.samples + 1}
        )
    else:
        ratio = _clamp_ratio((beyond - old.overhead_s) / ser_s)
        if ratio is None:
            return cal
        window = (*old.slope_window, ratio)[-SLOPE_WINDOW:]
        new = old.model_copy(
            update={
                "slope": max(0.5, statistics.median(window)),
                "slope_samples": old.slope_samples + 1,
                "slope_window": window,
            }
        )
    hops = {**cal.hops, key: new}
    return cal.model_copy(update={"hops": hops, **_priors(hops)})


def _priors(hops: dict[str, HopCalibration]) -> dict[str, float]:
    """Priors for hops not seen yet: the median learned overhead of hops between nodes, and of hops
    within a node (software cost does not depend much on which link a hop takes)."""
    between: list[float] = []
    within: list[float] = []
    for key, hop in hops.items():
        if hop.samples >= 5:
            a, b = _split(key)
            (within if a == b else between).append(hop.overhead_s)
    between.sort()
    within.sort()
    out: dict[str, float] = {}
    if between:
        out["hop_overhead_s"] = max(0.0, between[len(between) // 2])
    if within:
        out["local_hop_overhead_s"] = max(0.0, within[len(within) // 2])
    if within and not between:
        out["hop_overhead_s"] = out["local_hop_overhead_s"]
    if between and not within:
        out["local_hop_overhead_s"] = out["hop_overhead_s"]
    return out


def _split(key: str) -> tuple[str, str]:
    a, _, b = key.partition(">")
    return a, b


def observe_switch(cal: Calibration, *, stall_s: float, kv_s: float) -> Calibration:
    """One switch as the gateway measured it: its stall less what the model predicted for the KV."""
    if not (math.isfinite(stall_s) and math.isfinite(kv_s)) or stall_s < 0:
        return cal
    sample = max(0.0, stall_s - max(0.0, kv_s))
    return cal.model_copy(update={"switch_stall_s": _ewma(cal.switch_stall_s, sample, 0.3)})


def observe_concurrency(cal: Calibration, sessions: float) -> Calibration:
    """Sessions generating at once over a batch (Little's law: steps per second x seconds per step)."""
    if not math.isfinite(sessions) or sessions <= 0:
        return cal
    sample = max(1.0, sessions)
    value = sample if cal.concurrency is None else _ewma(cal.concurrency, sample, 0.2)
    return cal.model_copy(update={"concurrency": value})


def observe_source(
    cal: Calibration, *, idle_s: float | None = None, cpu_s_per_token: float | None = None
) -> Calibration:
    """The gateway's time outside the chain between two steps of a session, and its CPU per token."""
    update: dict[str, float | int] = {}
    if idle_s is not None and 0 <= idle_s < 1.0:  # longer: the client paused, not the gateway's work
        alpha = max(SOURCE_ALPHA, 1.0 / (cal.tokens + 1))
        update["source_idle_s"] = (1 - alpha) * cal.source_idle_s + alpha * idle_s
        update["tokens"] = cal.tokens + 1
    if cpu_s_per_token is not None and 0 <= cpu_s_per_token < 1.0:
        first = cal.source_cpu_s == 0.0
        update["source_cpu_s"] = cpu_s_per_token if first else 0.8 * cal.source_cpu_s + 0.2 * cpu_s_per_token
    return cal.model_copy(update=update) if update else cal
