"""Scenario files: the declarative description of an emulated MEC network and what happens on it.

A scenario is YAML on disk and a frozen, validated :class:`Scenario` everywhere else (it travels as JSON to
the testbed daemon). :func:`load_scenario` refuses a broken file with a :class:`ScenarioError` whose every
problem names the field (``links[1].bw_mbit``) and the YAML line, and it starts nothing.

Names of nodes become parts of Linux interface names (15 characters at most, prefix included), so they are
short lower-case identifiers; :func:`iface_name` is the one place that builds such names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from testbed.trace import TRACES_DIR, bundled_trace_path, header_note, read_trace_columns

# Linux IFNAMSIZ is 16 including the terminating NUL.
MAX_IFNAME_CHARS = 15
DEFAULT_PREFIX = "mecsplit"
# prefix (8) + node name (6) + one index character = 15: every node interface fits in IFNAMSIZ.
MAX_NODE_NAME_CHARS = 6
# One base-36 character per interface index keeps names fixed-length, hence collision-free.
_INDEX_CHARS = "0123456789abcdefghijklmnopqrstuvwxyz"
NODE_NAME_PATTERN = rf"^[a-z][a-z0-9]{{0,{MAX_NODE_NAME_CHARS - 1}}}$"
SCENARIO_NAME_PATTERN = r"^[a-z][a-z0-9-]{0,31}$"

Tier = Literal["device", "edge", "mec", "cloud"]
Direction = Literal["both", "a_to_b", "b_to_a"]
NodeName = Annotated[
    str, Field(pattern=NODE_NAME_PATTERN, description="short identifier: [a-z][a-z0-9]{0,5}")
]


class IfaceNameError(ValueError):
    """An interface name would exceed Linux's 15 characters or contain characters it refuses."""


def iface_name(node: str, index: int, prefix: str = DEFAULT_PREFIX) -> str:
    """Interface name ``<prefix><node><index>`` (index in base 36, one character), unique per (node, index).

    Fixed-length index characters mean two different (node, index) pairs never give the same name.
    """
    if not re.fullmatch(NODE_NAME_PATTERN, node):
        raise IfaceNameError(f"node name {node!r} must match {NODE_NAME_PATTERN}; rename it in the scenario")
    if not 0 <= index < len(_INDEX_CHARS):
        raise IfaceNameError(f"interface index {index} out of range 0..{len(_INDEX_CHARS) - 1}")
    return check_iface_name(f"{prefix}{node}{_INDEX_CHARS[index]}")


def check_iface_name(name: str) -> str:
    """Return ``name`` if Linux accepts it as an interface name, raise :class:`IfaceNameError` otherwise."""
    if not 0 < len(name) <= MAX_IFNAME_CHARS:
        raise IfaceNameError(
            f"interface name {name!r} has {len(name)} characters, Linux allows {MAX_IFNAME_CHARS}: "
            "use a shorter node name or MECSPLIT_TESTBED__PREFIX"
        )
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise IfaceNameError(f"interface name {name!r} may only hold letters, digits, '_', '.', '-'")
    return name


def link_id(a: str, b: str) -> str:
    """The identifier of the link between ``a`` and ``b`` as used in events (``mec.link.<a>-<b>``)."""
    return f"{a}-{b}"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Node(_Frozen):
    name: NodeName
    tier: Tier
    cpus: float = Field(gt=0, le=256, description="CPU share in cores (Docker --cpus), e.g. 0.5")
    mem_mb: int = Field(gt=0, le=1024 * 1024, description="memory limit in MiB")
    trust: int = Field(
        default=0,
        ge=0,
        le=3,
        description="trust level: 0 untrusted (public), 1 operator, 2 owner-managed, 3 the user's own device;"
        " YAML true/false mean 2/0",
    )
    joins_at_s: float | None = Field(default=None, ge=0, description="absent at start, joins at this time")

    @field_validator("trust", mode="before")
    @classmethod
    def _trust_from_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):
            return 2 if value else 0
        return value

    @property
    def mem_bytes(self) -> int:
        return self.mem_mb * 1024 * 1024


class Link(_Frozen):
    a: NodeName
    b: NodeName
    bw_mbit: float = Field(gt=0, le=10_000, description="rate in Mbit/s (10^6 bit/s), each direction")
    delay_ms: float = Field(default=0.0, ge=0, le=10_000, description="one-way delay in ms, each direction")
    loss_pct: float = Field(default=0.0, ge=0, lt=100, description="random loss in percent, each direction")

    @model_validator(mode="after")
    def _distinct_ends(self) -> Link:
        if self.a == self.b:
            raise ValueError(f"a link needs two different nodes, got {self.a!r} twice")
        return self

    @property
    def id(self) -> str:
        return link_id(self.a, self.b)

    @property
    def rtt_ms(self) -> float:
        return 2 * self.delay_ms


class Workload(_Frozen):
    sessions: int = Field(default=1, ge=1, le=10_000, description="concurrent generation sessions")
    prompt_tokens: int = Field(default=32, ge=1, le=32_768)
    max_new_tokens: int = Field(default=16, ge=1, le=32_768)
    request_rate_per_s: float = Field(default=0.5, gt=0, le=10_000, description="new requests per second")
    arrivals: Literal["closed", "poisson"] = Field(
        default="closed",
        description="closed: each session sends its next request when the last ended (after a think "
        "time); poisson: requests arrive at request_rate_per_s whatever the service (open loop), at "
        "most `sessions` in flight",
    )
    think_time_s: float = Field(
        default=0.0,
        ge=0,
        le=3600,
        description="closed: mean pause between a session's requests (exponential)",
    )
    lengths: Literal["prompts", "lognormal"] = Field(
        default="prompts",
        description="prompts: the bundled short chat prompts, max_new_tokens each; lognormal: each "
        "request's prompt and answer lengths drawn around prompt_tokens and max_new_tokens",
    )


class Constraints(_Frozen):
    slo_ttft_s: float | None = Field(default=None, gt=0, description="time-to-first-token SLO")
    slo_tpot_s: float | None = Field(default=None, gt=0, description="per-output-token latency SLO")
    min_throughput_tok_s: float | None = Field(default=None, gt=0)
    trusted_layers: int = Field(
        default=0, ge=0, description="the first N layers (and the raw input) must stay on trusted nodes"
    )
    min_trust: int = Field(default=2, ge=0, le=3, description="trust level a node needs to count as trusted")
    private_depth: int = Field(
        default=0, ge=0, description="activations before layer N never reach an untrusted node or route"
    )
    trusted_head: bool = Field(default=False, description="the last layer and the LM head on trusted nodes")


def _parse_link_ref(value: Any) -> Any:
    """Accept ``a-b`` or ``[a, b]``; keep anything else for the type check to reject."""
    if isinstance(value, str) and value.count("-") == 1:
        return tuple(value.split("-"))
    if isinstance(value, list):
        return tuple(value)
    return value


LinkRef = tuple[NodeName, NodeName]


class _Event(_Frozen):
    at_s: float = Field(ge=0, description="seconds after the scenario starts")


class TraceEvent(_Event):
    """Replay a bandwidth trace on a link, one rate per CSV row."""

    kind: Literal["trace"]
    link: LinkRef = Field(description="'a-b' or [a, b]")
    csv: Path | None = Field(default=None, description="CSV path, relative to the scenario file")
    trace: str | None = Field(default=None, description="name of a trace bundled in testbed/traces/")
    column: str = Field(default="bw_mbit", description="CSV column with Mbit/s values")
    scale: float = Field(default=1.0, gt=0, description="multiply every rate by this")
    max_mbit: float | None = Field(default=None, gt=0, description="clip rates above this")
    loop: bool = False
    direction: Direction = "both"

    @field_validator("link", mode="before")
    @classmethod
    def _link_ref(cls, value: Any) -> Any:
        return _parse_link_ref(value)

    @model_validator(mode="after")
    def _one_source(self) -> TraceEvent:
        if (self.csv is None) == (self.trace is None):
            raise ValueError("give exactly one of 'csv' (a path) or 'trace' (a bundled trace name)")
        return self

    @field_validator("csv")
    @classmethod
    def _resolve_csv(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None:
            return None
        base = (info.context or {}).get("base_dir")
        folder = Path(base if base is not None else Path.cwd()).resolve()
        path = (value if value.is_absolute() else folder / value).resolve()
        # Only the scenario's own folder and the bundled traces: a scenario names no other file of the
        # host (links resolved first, so one pointing out is refused too).
        if not (path.is_relative_to(folder) or path.is_relative_to(TRACES_DIR)):
            raise ValueError(
                f"trace file {value} must lie in the scenario's folder ({folder}) or be a bundled trace"
            )
        if not path.is_file():
            raise ValueError(f"trace file {path} does not exist")
        return path

    @field_validator("trace")
    @classmethod
    def _known_trace(cls, value: str | None) -> str | None:
        if value is not None:
            bundled_trace_path(value)  # raises TraceError (a ValueError) naming the available traces
        return value

    @field_validator("column")
    @classmethod
    def _column_exists(cls, value: str, info: ValidationInfo) -> str:
        # csv and trace are declared before column, so info.data holds them when they were valid.
        csv, trace = info.data.get("csv"), info.data.get("trace")
        path = csv if csv is not None else bundled_trace_path(trace) if trace is not None else None
        if path is None:
            return value
        columns = read_trace_columns(path)
        if value not in columns:
            raise ValueError(f"column {value!r} not in {path.name}{header_note(path, columns)}")
        return value

    @property
    def path(self) -> Path:
        """The CSV file this event replays (absolute)."""
        if self.csv is not None:
            return self.csv
        assert self.trace is not None  # guaranteed by _one_source
        return bundled_trace_path(self.trace)


class CpuLoadEvent(_Event):
    """Background CPU load on a node, as a percentage of its CPU share (0 stops it)."""

    kind: Literal["cpu_load"]
    node: NodeName
    pct: float = Field(ge=0, le=100)
    duration_s: float | None = Field(default=None, gt=0, description="stop the load after this long")


class FailEvent(_Event):
    kind: Literal["fail"]
    node: NodeName


class RestoreEvent(_Event):
    kind: Literal["restore"]
    node: NodeName


class JoinEvent(_Event):
    kind: Literal["join"]
    node: NodeName


class SetLinkEvent(_Event):
    """Change a link's shaping in place; unset fields keep their value."""

    kind: Literal["set_link"]
    link: LinkRef = Field(description="'a-b' or [a, b]")
    bw_mbit: float | None = Field(default=None, gt=0, le=10_000)
    delay_ms: float | None = Field(default=None, ge=0, le=10_000)
    loss_pct: float | None = Field(default=None, ge=0, lt=100)
    direction: Direction = "both"

    @field_validator("link", mode="before")
    @classmethod
    def _link_ref(cls, value: Any) -> Any:
        return _parse_link_ref(value)


AnyEvent = TraceEvent | CpuLoadEvent | FailEvent | RestoreEvent | JoinEvent | SetLinkEvent
Event = Annotated[AnyEvent, Field(discriminator="kind")]


class ScenarioReferenceError(Exception):
    """Cross-field problems (unknown node, duplicate link...) with their locations.

    Deliberately not a ValueError: pydantic would flatten it into one location-less error, and the loader
    needs each problem's own location to name its YAML line.
    """

    def __init__(self, problems: Sequence[tuple[tuple[str | int, ...], str]]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(f"{_loc_str(loc)}: {msg}" for loc, msg in self.problems))


class Scenario(_Frozen):
    name: str = Field(pattern=SCENARIO_NAME_PATTERN)
    description: str = ""
    source: NodeName = Field(description="the node that holds the raw input (where requests start)")
    duration_s: float = Field(default=120.0, gt=0, description="how long an experiment on it runs")
    nodes: tuple[Node, ...] = Field(min_length=1, max_length=36)
    links: tuple[Link, ...] = ()
    model: str = Field(default="smollm2-135m", pattern=r"^[a-z0-9][a-z0-9.-]*$", description="store preset")
    workload: Workload = Workload()
    constraints: Constraints = Constraints()
    timeline: tuple[Event, ...] = ()

    @model_validator(mode="after")
    def _references(self) -> Scenario:
        problems = list(_reference_problems(self))
        if problems:
            raise ScenarioReferenceError(problems)
        return self

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(f"scenario {self.name!r} has no node {name!r}")

    def link(self, a: str, b: str) -> Link:
        """The link between ``a`` and ``b`` (either order)."""
        for link in self.links:
            if {link.a, link.b} == {a, b}:
                return link
        raise KeyError(f"scenario {self.name!r} has no link between {a!r} and {b!r}")

    def initial_nodes(self) -> tuple[Node, ...]:
        """Nodes present when the scenario starts (late joiners excluded)."""
        late = self.late_nodes()
        return tuple(n for n in self.nodes if n.name not in late)

    def late_nodes(self) -> frozenset[str]:
        joined = {e.node for e in self.timeline if isinstance(e, JoinEvent)}
        return frozenset(joined | {n.name for n in self.nodes if n.joins_at_s is not None})

    def events(self) -> tuple[AnyEvent, ...]:
        """The timeline in time order, including a join event for every node with ``joins_at_s``.

        Sorting is stable, so events at the same time keep their file order.
        """
        explicit_joins = {e.node for e in self.timeline if isinstance(e, JoinEvent)}
        implicit = [
            JoinEvent(kind="join", at_s=n.joins_at_s, node=n.name)
            for n in self.nodes
            if n.joins_at_s is not None and n.name not in explicit_joins
        ]
        return tuple(sorted([*self.timeline, *implicit], key=lambda e: e.at_s))


def _reference_problems(s: Scenario) -> Iterable[tuple[tuple[str | int, ...], str]]:
    names = [n.name for n in s.nodes]
    known = set(names)
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name in seen:
            yield ("nodes", i, "name"), f"duplicate node name {name!r}"
        seen.add(name)
    listing = ", ".join(names)
    if s.source not in known:
        yield ("source",), f"unknown node {s.source!r} (nodes: {listing})"
    elif s.node(s.source).joins_at_s is not None:
        yield ("source",), f"source node {s.source!r} must be present from the start (it has joins_at_s)"
    pairs: set[frozenset[str]] = set()
    for i, link in enumerate(s.links):
        for end in ("a", "b"):
            if getattr(link, end) not in known:
                yield ("links", i, end), f"unknown node {getattr(link, end)!r} (nodes: {listing})"
        pair = frozenset((link.a, link.b))
        if pair in pairs:
            yield ("links", i), f"second link between {link.a!r} and {link.b!r}; a pair has one link"
        pairs.add(pair)
    for i, event in enumerate(s.timeline):
        node = getattr(event, "node", None)
        if node is not None and node not in known:
            yield ("timeline", i, "node"), f"unknown node {node!r} (nodes: {listing})"
        ref = getattr(event, "link", None)
        if ref is not None and frozenset(ref) not in pairs:
            yield ("timeline", i, "link"), f"no link between {ref[0]!r} and {ref[1]!r} in 'links'"
        if isinstance(event, _Event) and event.at_s > s.duration_s:
            yield ("timeline", i, "at_s"), f"at_s {event.at_s} is after duration_s {s.duration_s}"
    if all(link.a in known and link.b in known for link in s.links):
        yield from _connectivity_problems(s, known)


def _connectivity_problems(s: Scenario, known: set[str]) -> Iterable[tuple[tuple[str | int, ...], str]]:
    """Every node must be reachable from the source: the optimiser needs a path between any two nodes."""
    if s.source not in known:
        return
    adjacent: dict[str, set[str]] = {n: set() for n in known}
    for link in s.links:
        if link.a in known and link.b in known:
            adjacent[link.a].add(link.b)
            adjacent[link.b].add(link.a)
    reached, todo = {s.source}, [s.source]
    while todo:
        for nxt in adjacent[todo.pop()] - reached:
            reached.add(nxt)
            todo.append(nxt)
    for i, node in enumerate(s.nodes):
        if node.name not in reached:
            yield ("nodes", i, "name"), f"node {node.name!r} has no path of links to source {s.source!r}"


# ---------------------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class ScenarioProblem:
    """One thing wrong with a scenario file: where (field path and line) and what."""

    field: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line is not None else ""
        return f"{where}{self.field}: {self.message}"


class ScenarioError(ValueError):
    """A scenario file that cannot be used; ``problems`` lists every field at fault with its line."""

    def __init__(self, path: Path | str, problems: Sequence[ScenarioProblem]) -> None:
        self.path = Path(path)
        self.problems = tuple(problems)
        lines = "\n".join(f"  {self.path}:{p}" for p in self.problems)
        super().__init__(f"invalid scenario {self.path} ({len(self.problems)} problem(s)):\n{lines}")


def load_scenario(path: Path | str) -> Scenario:
    """Read and validate a scenario YAML file; CSV paths are resolved against the file's folder."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ScenarioError(path, [ScenarioProblem("<file>", None, f"cannot read: {exc.strerror}")]) from exc
    return parse_scenario(text, path)


def parse_scenario(text: str, path: Path | str = "<string>") -> Scenario:
    """Validate scenario YAML ``text``; ``path`` names it in errors and anchors relative CSV paths."""
    path = Path(path)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise ScenarioError(path, [ScenarioProblem("<yaml>", line, f"bad YAML syntax: {problem}")]) from exc
    if not isinstance(data, dict):
        raise ScenarioError(path, [ScenarioProblem("<root>", 1, "the file must be a YAML mapping of fields")])
    context = {"base_dir": str(path.parent.resolve())}
    try:
        return Scenario.model_validate(data, context=context)
    except ValidationError as exc:
        problems = [_problem(root, err["loc"], _error_message(err)) for err in exc.errors()]
        raise ScenarioError(path, _dedupe(problems)) from None
    except ScenarioReferenceError as exc:
        raise ScenarioError(path, [_problem(root, loc, msg) for loc, msg in exc.problems]) from None


def _error_message(err: Mapping[str, Any]) -> str:
    msg = str(err["msg"])
    # pydantic prefixes messages of ValueErrors raised in validators; the prefix adds nothing for users.
    msg = msg.removeprefix("Value error, ")
    if err.get("type") == "extra_forbidden":
        return "unknown field (check its spelling; `mecsplit testbed schema` lists the fields)"
    if "input" in err and err.get("type") not in ("missing",) and not isinstance(err["input"], dict | list):
        return f"{msg} (got {err['input']!r})"
    return msg


def _dedupe(problems: list[ScenarioProblem]) -> list[ScenarioProblem]:
    seen: set[tuple[str, int | None, str]] = set()
    out = []
    for p in problems:
        key = (p.field, p.line, p.message)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def _problem(root: yaml.Node | None, loc: Sequence[str | int], message: str) -> ScenarioProblem:
    field, line = _locate(root, loc)
    return ScenarioProblem(field, line, message)


def _locate(root: yaml.Node | None, loc: Sequence[str | int]) -> tuple[str, int | None]:
    """Field path (``timeline[2].csv``) and 1-based YAML line of a pydantic error location.

    Walks the composed YAML along ``loc``; elements that are not in the document (the discriminator tag
    pydantic inserts for tagged unions, a missing field) are left out of the path walk, so the line is
    that of the deepest node that exists: the field itself, or the mapping that lacks it.
    """
    node = root
    parts: list[str] = []
    tagged: set[int] = set()
    for item in loc:
        # The tag comes first after the list index, before any field of the event (even one named like
        # the tag, as the `trace` field of a `trace` event).
        if id(node) not in tagged and _is_union_tag(node, item):
            tagged.add(id(node))
            continue
        child = _child(node, item)
        if child is None:
            parts.append(_loc_part(item))
            continue
        parts.append(_loc_part(item))
        node = child
    line = node.start_mark.line + 1 if node is not None else None
    return _join_parts(parts) or "<root>", line


def _child(node: yaml.Node | None, item: str | int) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode) and isinstance(item, str):
        for key, value in node.value:
            if key.value == item:
                # A scalar field points at its value; a missing value (null) at its key.
                return value if value.start_mark.line == key.start_mark.line or value.value else key
        return None
    if isinstance(node, yaml.SequenceNode) and isinstance(item, int) and 0 <= item < len(node.value):
        return node.value[item]
    return None


def _is_union_tag(node: yaml.Node | None, item: str | int) -> bool:
    """pydantic puts the discriminator value (``trace``, ``fail``...) into the location of union errors."""
    if not isinstance(node, yaml.MappingNode) or not isinstance(item, str):
        return False
    return any(k.value == "kind" and getattr(v, "value", None) == item for k, v in node.value)


def _loc_part(item: str | int) -> str:
    return f"[{item}]" if isinstance(item, int) else str(item)


def _join_parts(parts: Sequence[str]) -> str:
    out = ""
    for part in parts:
        out += part if part.startswith("[") or not out else f".{part}"
    return out


def _loc_str(loc: Sequence[str | int]) -> str:
    return _join_parts([_loc_part(i) for i in loc]) or "<root>"


def scenario_json_schema() -> dict[str, Any]:
    """JSON schema of scenario files (what `mecsplit testbed schema` prints)."""
    return Scenario.model_json_schema()
