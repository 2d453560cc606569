"""The joint placement-partitioning problem: profiles in, one frozen value that travels as JSON.

Units are in the names: seconds (``_s``), bytes (``_bytes``), megabit/s (``_mbit``), milliseconds (``_ms``),
floating-point operations (``flops``). Layer ranges are half-open ``[first, end)`` over the model's
transformer layers; the first stage also holds the embeddings and the last one the final norm and head.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from policies.calibration import Calibration
from policies.errors import ProblemError

Tier = Literal["device", "edge", "mec", "cloud"]
MetricName = Literal["ttft", "tpot", "bottleneck", "privacy"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Layer(_Frozen):
    """One transformer layer. ``act_bytes_per_token`` is the hidden state it emits (its output boundary)."""

    weight_bytes: int = Field(ge=0)
    kv_bytes_per_token: int = Field(ge=0)
    act_bytes_per_token: int = Field(ge=0)
    flops_per_token: float = Field(default=0.0, ge=0)


class ModelSpec(_Frozen):
    name: str
    layers: tuple[Layer, ...] = Field(min_length=1)
    embed_weight_bytes: int = Field(default=0, ge=0)
    head_weight_bytes: int = Field(default=0, ge=0)
    head_flops_per_token: float = Field(default=0.0, ge=0)
    # Token ids travel from the source to the first stage ...
    input_bytes_per_token: int = Field(default=4, ge=0)
    # ... and, by default, only the sampled token id travels back from the last stage to the source.
    output_bytes_per_token: int = Field(default=4, ge=0)
    # What every message carries besides its tensors (the wire frame and its header, TCP/IP): next to a
    # decode step's few KiB of hidden state it is not negligible.
    frame_bytes: int = Field(default=0, ge=0)

    @property
    def num_layers(self) -> int:
        return len(self.layers)


# The busiest a node's background load is priced: a load the monitor reads as the whole CPU still
# leaves the node's own processes some of it (CFS shares the quota), and ``Node.load`` must stay below 1.
MAX_LOAD = 0.95


class Node(_Frozen):
    name: str = Field(min_length=1)
    tier: Tier
    speed_flops: float = Field(gt=0, description="effective flop/s, used where no measured cost is given")
    mem_bytes: int = Field(ge=0, description="memory available to model segments")
    load: float = Field(default=0.0, ge=0, lt=1, description="fraction of compute taken by other work")
    trust: float = Field(default=1.0, ge=0, le=1)
    cpu_share: float | None = Field(
        default=None, gt=0, description="cores its processes may use over time (a CPU quota); None: no cap"
    )


class Link(_Frozen):
    a: str
    b: str
    bw_mbit: float = Field(gt=0)
    rtt_ms: float = Field(ge=0)
    # A link that was idle passes its first bytes at line rate: a rate shaper's bucket (HTB's burst), the
    # larger of ``burst_bytes`` and ``burst_s`` at the rate. A message that fits is not slowed by the
    # rate; only its bytes beyond it are. Over time the link carries no more than its rate either way.
    burst_bytes: int = Field(default=0, ge=0)
    burst_s: float = Field(default=0.0, ge=0)

    def free_bytes(self, bw_mbit: float | None = None) -> float:
        """Bytes the link passes at line rate after a pause, at ``bw_mbit`` (default: its own rate)."""
        rate = self.bw_mbit if bw_mbit is None else bw_mbit
        return max(float(self.burst_bytes), self.burst_s * rate * 1e6 / 8.0)


class NodeCost(_Frozen):
    """Measured per-token seconds of each layer on one node, at zero background load."""

    node: str
    prefill_s_per_token: tuple[float, ...]
    decode_s_per_token: tuple[float, ...]
    head_prefill_s_per_token: float = Field(default=0.0, ge=0)
    head_decode_s_per_token: float = Field(default=0.0, ge=0)

    @model_validator(mode="after")
    def _non_negative(self) -> NodeCost:
        if any(t < 0 for t in self.prefill_s_per_token + self.decode_s_per_token):
            raise ProblemError(f"node cost of {self.node!r} has a negative time; profile it again")
        return self


class Workload(_Frozen):
    prompt_tokens: int = Field(default=128, ge=1)
    gen_tokens: int = Field(default=64, ge=1)
    request_rate_rps: float = Field(default=0.0, ge=0)
    concurrent_sessions: int = Field(default=1, ge=1, description="sessions whose KV must fit at once")

    @property
    def context_tokens(self) -> int:
        return self.prompt_tokens + self.gen_tokens


class Constraints(_Frozen):
    check_memory: bool = True
    trust_threshold: float = Field(default=1.0, ge=0, le=1, description="trusted iff node.trust >= this")
    trusted_prefix_layers: int = Field(default=0, ge=0, description="layers [0, k) only on trusted nodes")
    trusted_head: bool = Field(default=False, description="the last layer and head only on trusted nodes")
    private_depth: int = Field(
        default=0, ge=0, description="activations at depth < d never leave the trusted domain (nodes+routes)"
    )
    max_ttft_s: float | None = Field(default=None, gt=0)
    max_tpot_s: float | None = Field(default=None, gt=0)
    min_throughput_tok_s: float | None = Field(default=None, gt=0)


class Objective(_Frozen):
    """Weights of the metrics (all minimised; ``bottleneck`` = 1 / throughput, ``privacy`` = exposure).

    ``tpot=None`` means ``gen_tokens - 1``, so that the default objective is the request latency
    TTFT + (gen_tokens - 1) x TPOT. In ``lexicographic`` mode ``order`` ranks the metrics instead.
    """

    mode: Literal["weighted", "lexicographic"] = "weighted"
    ttft: float = Field(default=1.0, ge=0)
    tpot: float | None = Field(default=None, ge=0)
    bottleneck: float = Field(default=0.0, ge=0)
    privacy: float = Field(default=0.0, ge=0)
    order: tuple[MetricName, ...] = ("ttft", "tpot", "bottleneck", "privacy")


class Problem(_Frozen):
    model: ModelSpec
    nodes: tuple[Node, ...] = Field(min_length=1)
    links: tuple[Link, ...] = ()
    costs: tuple[NodeCost, ...] = ()
    source: str
    workload: Workload = Workload()
    constraints: Constraints = Constraints()
    objective: Objective = Objective()
    # Learned from live traffic (policies.calibration). With it, plans are priced by the full model:
    # learned compute and wire coefficients, the gateway's own work, queueing between the workload's
    # concurrent sessions and CPU quotas (policies.contention). Without it, the plain analytic model.
    calibration: Calibration | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Problem:
        names = [n.name for n in self.nodes]
        if len(set(names)) != len(names):
            raise ProblemError(f"node names must be unique, got {names}")
        known = set(names)
        if self.source not in known:
            raise ProblemError(f"source {self.source!r} is not a node; add it to nodes or fix source")
        pairs: set[tuple[str, str]] = set()
        for link in self.links:
            for end in (link.a, link.b):
                if end not in known:
                    raise ProblemError(f"link {link.a}-{link.b} names unknown node {end!r}")
            if link.a == link.b:
                raise ProblemError(f"link {link.a}-{link.b} is a self loop; remove it")
            key = (min(link.a, link.b), max(link.a, link.b))
            if key in pairs:
                raise ProblemError(f"link {key[0]}-{key[1]} is given twice; keep one")
            pairs.add(key)
        num_layers = self.model.num_layers
        seen: set[str] = set()
        for cost in self.costs:
            if cost.node not in known or cost.node in seen:
                raise ProblemError(f"costs for {cost.node!r}: unknown node or given twice")
            seen.add(cost.node)
            if len(cost.prefill_s_per_token) != num_layers or len(cost.decode_s_per_token) != num_layers:
                raise ProblemError(f"costs for {cost.node!r} must have {num_layers} entries per phase")
        c = self.constraints
        if c.trusted_prefix_layers > num_layers or c.private_depth > num_layers:
            raise ProblemError(f"trust depths must be <= num_layers ({num_layers})")
        return self

    @property
    def num_layers(self) -> int:
        return self.model.num_layers

    @property
    def node_names(self) -> tuple[str, ...]:
        return tuple(n.name for n in self.nodes)

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise ProblemError(f"unknown node {name!r}; known: {', '.join(self.node_names)}")

    def is_trusted(self, name: str) -> bool:
        return self.node(name).trust >= self.constraints.trust_threshold

    def tpot_weight(self) -> float:
        if self.objective.tpot is not None:
            return self.objective.tpot
        return float(self.workload.gen_tokens - 1)

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    @classmethod
    def from_json(cls, text: str) -> Problem:
        return cls.model_validate_json(text)

    @classmethod
    def from_profiles(
        cls,
        *,
        model_name: str,
        layer_weight_bytes: Sequence[int],
        kv_bytes_per_token: int | Sequence[int],
        hidden_bytes_per_token: int,
        nodes: Sequence[Node],
        links: Sequence[Link],
        source: str,
        prefill_s: Mapping[str, Sequence[float]],
        decode_s: Mapping[str, Sequence[float]],
        head_prefill_s: Mapping[str, float] | None = None,
        head_decode_s: Mapping[str, float] | None = None,
        embed_weight_bytes: int = 0,
        head_weight_bytes: int = 0,
        layer_flops_per_token: Sequence[float] | None = None,
        head_flops_per_token: float = 0.0,
        workload: Workload | None = None,
        constraints: Constraints | None = None,
        objective: Objective | None = None,
        calibration: Calibration | None = None,
    ) -> Problem:
        """Build a problem from measured profiles (what ``flows.profile`` produces) and model facts.

        ``prefill_s[node]`` / ``decode_s[node]`` hold per-layer seconds per token measured on that node;
        nodes without a profile fall back to ``layer_flops_per_token / speed_flops``. Measured times are
        taken as they are, so give those nodes ``load=0`` unless the load changed after profiling.
        """
        num_layers = len(layer_weight_bytes)
        kv = (
            [int(kv_bytes_per_token)] * num_layers
            if isinstance(kv_bytes_per_token, int)
            else [int(v) for v in kv_bytes_per_token]
        )
        flops = list(layer_flops_per_token) if layer_flops_per_token is not None else [0.0] * num_layers
        if len(kv) != num_layers or len(flops) != num_layers:
            raise ProblemError("kv_bytes_per_token and layer_flops_per_token need one entry per layer")
        layers = tuple(
            Layer(
                weight_bytes=int(layer_weight_bytes[i]),
                kv_bytes_per_token=kv[i],
                act_bytes_per_token=int(hidden_bytes_per_token),
                flops_per_token=float(flops[i]),
            )
            for i in range(num_layers)
        )
        head_p = dict(head_prefill_s or {})
        head_d = dict(head_decode_s or {})
        costs = tuple(
            NodeCost(
                node=name,
                prefill_s_per_token=tuple(float(t) for t in prefill_s[name]),
                decode_s_per_token=tuple(float(t) for t in decode_s[name]),
                head_prefill_s_per_token=float(head_p.get(name, 0.0)),
                head_decode_s_per_token=float(head_d.get(name, 0.0)),
            )
            for name in sorted(prefill_s)
        )
        missing = sorted(set(prefill_s) ^ set(decode_s))
        if missing:
            raise ProblemError(f"nodes {missing} have prefill or decode profiles but not both")
        return cls(
            model=ModelSpec(
                name=model_name,
                layers=layers,
                embed_weight_bytes=embed_weight_bytes,
                head_weight_bytes=head_weight_bytes,
                head_flops_per_token=head_flops_per_token,
            ),
            nodes=tuple(nodes),
            links=tuple(links),
            costs=costs,
            source=source,
            workload=workload or Workload(),
            constraints=constraints or Constraints(),
            objective=objective or Objective(),
            calibration=calibration,
        )
