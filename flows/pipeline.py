"""The steps the flows run, as plain functions (the Prefect tasks in ``flows.reconfigure`` wrap them).

profile -> problem -> plan -> decision -> deploy. Kept free of Prefect so that each step can be tested and
reused by the experiment runner without an API server.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx

from flows.measure import admin_headers
from flows.runtime import (
    Backend,
    LinkProbe,
    RuntimeFailure,
    SegmentRequest,
    orchestrator_credentials,
    standby_range,
)
from flows.state import DeploymentState, Endpoint, NodeStart
from mecsplit.files import read_cache, write_json
from mecsplit.settings import Settings, get_settings
from policies.calibration import Calibration
from policies.plan import Plan
from policies.problem import MAX_LOAD, Constraints, Link, Node, Problem, Workload
from testbed.link import BURST_S, MIN_BURST_BYTES
from testbed.scenario import Scenario

Progress = Callable[[str], None]

# Per-tier effective flop/s, used only for nodes that could not be profiled (they then rank last).
_FALLBACK_SPEED_FLOPS = {"device": 2e9, "edge": 8e9, "mec": 8e9, "cloud": 16e9}
# What a segment process costs besides its weights: the interpreter, torch and transformers, a few
# sessions' KV (measured on the testbed, `docker stats` of SmolLM2's servers: 286-330 MiB). The weights
# are memory-mapped from the store, file pages that a node's processes share.
PROCESS_OVERHEAD_BYTES = 300 * 1024 * 1024
# The gateway on the source node: the interpreter, the tokenizer, the HTTP server (measured: 285 MiB).
GATEWAY_BYTES = 300 * 1024 * 1024
# The shared libraries (torch, transformers, Python) that a node's processes map from the image: file
# pages counted once per node, but pages its memory limit must hold while they run (measured: RssFile of
# a server before it touches its weights 110-121 MiB, of the gateway 89 MiB). Leaving them out had
# SmolLM2's gateway + a stage with the head "fit" a 768 MiB camera with 6 MiB to spare; the kernel then
# OOM-killed the camera's processes (smart city, 1572 tokens lost).
NODE_LIBRARY_BYTES = 120 * 1024 * 1024
# What every message between stages carries besides its tensors: the 16-byte frame prefix, the JSON
# header (route, sampling, the hops' step telemetry: 400-450 B for a decode step, segments.protocol) and
# the TCP/IP/Ethernet headers of its segments (66 B each; a decode step's ~2.8 KiB takes two).
FRAME_BYTES = 600


@dataclass(frozen=True)
class ModelFacts:
    name: str
    num_layers: int
    hidden_size: int
    layer_weight_bytes: tuple[int, ...]
    embed_weight_bytes: int
    head_weight_bytes: int
    kv_bytes_per_token_per_layer: int


def model_facts(settings: Settings, model: str, profiles: dict[str, dict[str, Any]]) -> ModelFacts:
    """Sizes from the store's manifest (plain JSON: no torch import in the flow process, which keeps a
    triggered run quick) and the KV size per token that the profiles measured."""
    path = settings.store_dir / model / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{model} is not in the store {settings.store_dir}: `mecsplit models prepare {model}`"
        )
    manifest = json.loads(path.read_text())
    kv_sizes = {p["kv_bytes_per_token_per_layer"] for p in profiles.values()}
    if len(kv_sizes) != 1:
        raise ValueError(f"profiles disagree on the KV bytes per token of {model}: {sorted(kv_sizes)}")
    return ModelFacts(
        name=model,
        num_layers=manifest["num_layers"],
        hidden_size=manifest["hidden_size"],
        layer_weight_bytes=tuple(manifest["layer_weight_bytes"]),
        embed_weight_bytes=manifest["embed_weight_bytes"],
        head_weight_bytes=manifest["head_weight_bytes"],
        kv_bytes_per_token_per_layer=kv_sizes.pop(),
    )


def profile_nodes(
    backend: Backend,
    nodes: Iterable[str],
    model: str,
    context: int,
    *,
    max_age_s: float,
    refresh: Iterable[str] = (),
    keep: Iterable[str] = (),
    progress: Progress = print,
    settings: Settings | None = None,
) -> dict[str, dict[str, Any]]:
    """Per-node compute profiles, measured where the cached one is older than ``max_age_s`` (or the node
    is in ``refresh``, e.g. the node an overload event named). Nodes are profiled one at a time: emulated
    nodes share the host's cores, and a request's pipeline computes on one node at a time too. A node in
    ``keep`` (its memory cannot hold the profiler beside what it serves: ``profiler_fits``) keeps any
    cached profile however old; the live calibration measures its compute meanwhile."""
    settings = settings or get_settings()
    cache_path = settings.run_dir / f"profiles-{backend.name}-{model}-{context}.json"
    cache: dict[str, dict[str, Any]] = read_cache(cache_path, progress)
    now = time.time()
    refresh = set(refresh)
    keep = {n for n in keep if n in cache}
    stale = sorted(
        n
        for n in nodes
        if n not in keep and (n in refresh or n not in cache or now - cache[n]["measured_at_s"] > max_age_s)
    )
    for node in sorted(keep & set(nodes)):
        progress(f"{node}: profile kept, its memory cannot hold the profiler beside what it serves")

    def one(node: str) -> dict[str, Any]:
        started = time.monotonic()
        profile = backend.profile_compute(node, model, context)
        progress(
            f"profiled {node}: {profile['layer_decode_s'] * 1e3:.2f} ms/layer/token "
            f"({time.monotonic() - started:.1f} s)"
        )
        return {**profile, "measured_at_s": time.time()}

    for node in stale:
        cache[node] = one(node)
    write_json(cache_path, cache, sort_keys=True)
    for node in sorted(set(nodes) - set(stale) - keep):
        progress(f"{node}: cached profile, {now - cache[node]['measured_at_s']:.0f} s old")
    return {n: cache[n] for n in sorted(nodes)}


def profile_links(
    backend: Backend,
    scenario: Scenario,
    alive: set[str],
    progress: Progress = print,
    *,
    max_age_s: float = 0.0,
    known_bw_mbit: dict[str, float] | None = None,
    reprobe_nodes: frozenset[str] = frozenset(),
    settings: Settings | None = None,
) -> list[LinkProbe]:
    """Each alive link's goodput and RTT, probed actively (about 1.5 s a link on the testbed) unless a
    probe younger than ``max_age_s`` is cached and the link touches none of ``reprobe_nodes``.
    ``known_bw_mbit`` (link key ``a-b`` -> rate) is a rate just measured elsewhere, e.g. by the testbed
    daemon that emitted the link event: that link takes it, with its cached RTT, instead of a new probe
    (a link event must not wait for its own re-measurement). A probe fills the link for its duration,
    which on a thin link stalls the traffic that crosses it: what need not be probed is not."""
    settings = settings or get_settings()
    cache_path = settings.run_dir / f"links-{backend.name}.json"
    cache: dict[str, dict[str, Any]] = read_cache(cache_path, progress)
    known = known_bw_mbit or {}
    now = time.time()
    probes = []
    for link in sorted(scenario.links, key=lambda lk: (lk.a, lk.b)):
        if link.a not in alive or link.b not in alive:
            continue
        key = f"{link.a}-{link.b}"
        cached = cache.get(key)
        if cached is not None and key in known:
            probe = LinkProbe(link.a, link.b, known[key], cached["rtt_ms"], measured=cached["measured"])
            how = "rate from the event, cached rtt"
        elif (
            cached is not None
            and now - cached["measured_at_s"] <= max_age_s
            and not reprobe_nodes & {link.a, link.b}
        ):
            probe = LinkProbe(link.a, link.b, cached["bw_mbit"], cached["rtt_ms"], cached["measured"])
            how = f"cached, {now - cached['measured_at_s']:.0f} s old"
        else:
            probe = backend.probe_link(link.a, link.b)
            how = "probed"
        if how == "probed" or key in known:
            cache[key] = {"bw_mbit": probe.bw_mbit, "rtt_ms": probe.rtt_ms, "measured": probe.measured,
                          "measured_at_s": now}  # fmt: skip
        progress(f"link {key}: {probe.bw_mbit:.2f} Mbit/s, rtt {probe.rtt_ms:.1f} ms ({how})")
        probes.append(probe)
    write_json(cache_path, cache, sort_keys=True)
    return probes


def _profiled(profile: dict[str, Any], key: str) -> float:
    """A profile's full-speed (burst) figure where it has one, its sustained one otherwise (profiles
    cached before burst figures existed)."""
    burst = profile.get(key.replace("_decode_s", "_decode_burst_s"), 0.0)
    return float(burst) if burst > 0 else float(profile[key])


def build_problem(
    scenario: Scenario,
    facts: ModelFacts,
    node_profiles: dict[str, dict[str, Any]],
    links: list[LinkProbe],
    *,
    testbed: bool = False,
    loads: dict[str, float] | None = None,
    calibration: Calibration | None = None,
) -> Problem:
    """The optimiser's problem from measured profiles and the scenario's constraints and workload.

    Decode costs are the profiles' full-speed figures. On the ``testbed`` each node's ``cpus`` is a CPU
    quota, which lets the model cap a node's work by its share over time (policies.contention), and each
    link is HTB-shaped, whose burst lets a message after a pause through at line rate
    (``testbed.link.htb_burst_bytes``). ``loads`` are the nodes' background loads as the monitor
    measures them (fraction of their CPU), and ``calibration`` what live traffic taught the model
    (policies.calibration)."""
    alive = sorted(node_profiles)
    loads = loads or {}
    nodes = [
        Node(
            name=n.name,
            tier=n.tier,
            speed_flops=_FALLBACK_SPEED_FLOPS[n.tier],
            # A segment process's own overhead and the node's libraries, and on the source the gateway.
            mem_bytes=max(
                0,
                n.mem_mb * 1024 * 1024
                - PROCESS_OVERHEAD_BYTES
                - NODE_LIBRARY_BYTES
                - GATEWAY_BYTES * (n.name == scenario.source),
            ),
            load=min(MAX_LOAD, max(0.0, loads.get(n.name, 0.0))),
            trust=n.trust / 3,
            cpu_share=n.cpus if testbed else None,
        )
        for n in scenario.nodes
        if n.name in node_profiles
    ]
    c = scenario.constraints
    w = scenario.workload
    n_layers = facts.num_layers
    burst = {"burst_bytes": MIN_BURST_BYTES, "burst_s": BURST_S} if testbed else {}
    problem = Problem.from_profiles(
        model_name=facts.name,
        layer_weight_bytes=facts.layer_weight_bytes,
        kv_bytes_per_token=facts.kv_bytes_per_token_per_layer,
        hidden_bytes_per_token=facts.hidden_size * 4,
        nodes=nodes,
        links=[Link(a=p.a, b=p.b, bw_mbit=max(p.bw_mbit, 0.01), rtt_ms=p.rtt_ms, **burst) for p in links],
        source=scenario.source,
        prefill_s={m: [node_profiles[m]["layer_prefill_s_per_token"]] * n_layers for m in alive},
        decode_s={m: [_profiled(node_profiles[m], "layer_decode_s")] * n_layers for m in alive},
        head_decode_s={
            m: _profiled(node_profiles[m], "head_decode_s") + _profiled(node_profiles[m], "embed_decode_s")
            for m in alive
        },
        # The last segment computes logits for every prompt position: one head pass per prompt token.
        head_prefill_s={m: node_profiles[m]["head_decode_s"] for m in alive},
        embed_weight_bytes=facts.embed_weight_bytes,
        head_weight_bytes=facts.head_weight_bytes,
        workload=Workload(
            prompt_tokens=w.prompt_tokens,
            gen_tokens=w.max_new_tokens,
            request_rate_rps=w.request_rate_per_s,
            concurrent_sessions=w.sessions,
        ),
        constraints=Constraints(
            trust_threshold=c.min_trust / 3,
            trusted_prefix_layers=min(c.trusted_layers, n_layers),
            private_depth=min(c.private_depth, n_layers),
            trusted_head=c.trusted_head,
            max_ttft_s=c.slo_ttft_s,
            max_tpot_s=c.slo_tpot_s,
            min_throughput_tok_s=c.min_throughput_tok_s,
        ),
        calibration=calibration,
    )
    return problem.model_copy(update={"model": problem.model.model_copy(update={"frame_bytes": FRAME_BYTES})})


# ------------------------------------------------------------------------------------------------ deploy
# What a standby holds: the interpreter, torch and transformers and one layer (measured: ~300 MB of
# anonymous memory for SmolLM2, plus ~110 MB of shared library pages a node's processes share).
STANDBY_READY_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class DeployResult:
    state: DeploymentState
    started: tuple[Endpoint, ...]
    stopped: tuple[Endpoint, ...]
    switch_s: float
    total_s: float
    # Wall clock (time.time) of the reaction's steps: every new segment serving its range, the gateway
    # switched, and the first token streamed through the new chain (None without a probe).
    ready_at_s: float = 0.0
    switched_at_s: float = 0.0
    first_token_at_s: float | None = None
    claimed: tuple[str, ...] = ()  # nodes whose stage was loaded into a warm standby
    switch_report: dict[str, Any] | None = None  # the gateway's measured switch (segments.SwitchReport)


def plan_layout(plan: Plan) -> list[tuple[str, int, int]]:
    return [(s.node, s.first, s.end) for s in plan.stages]


def trust_breaches(scenario: Scenario, layout: Iterable[tuple[str, int, int]], num_layers: int) -> list[str]:
    """Where a plan's stages break the scenario's trust constraints (empty: none). The optimiser never
    proposes such a plan; this is the check where a plan takes effect, whoever made it (a hand-written
    plan, another policy, a stale decision). Routes are the optimiser's to check: a stage here is judged
    by the node it runs on."""
    c = scenario.constraints
    trust = {n.name: n.trust for n in scenario.nodes}
    out = []
    for node, first, end in layout:
        level = trust.get(node, 0)
        if level >= c.min_trust:
            continue
        who = f"{node} (trust {level} < {c.min_trust})"
        if first < min(c.trusted_layers, num_layers):
            out.append(f"{who} would run layer {first}; layers [0, {c.trusted_layers}) stay on trusted nodes")
        elif first < min(c.private_depth, num_layers):
            out.append(f"{who} would see depth-{first} activations; private_depth is {c.private_depth}")
        if c.trusted_head and end == num_layers:
            out.append(f"{who} would run the last layer and the head; trusted_head is set")
    return out


def read_manifest(settings: Settings, model: str) -> dict[str, Any]:
    path = settings.store_dir / model / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{model} is not in the store {settings.store_dir}: `mecsplit models prepare {model}`"
        )
    return json.loads(path.read_text())


def node_bytes(
    scenario: Scenario, node: str, manifest: dict[str, Any], ranges: Iterable[tuple[int, int]]
) -> int:
    """What a node's processes hold in memory: each server's own overhead (the interpreter, torch,
    transformers, its sessions' KV) and, once, the weights of every layer any of them serves (servers map
    them from the store, so a node's processes share those pages) and the libraries, plus the gateway on
    the source."""
    spans = list(ranges)
    n = manifest["num_layers"]
    layers = sorted({layer for first, end in spans for layer in range(first, end)})
    weights = sum(manifest["layer_weight_bytes"][layer] for layer in layers)
    weights += manifest["embed_weight_bytes"] if 0 in layers else 0
    weights += manifest["head_weight_bytes"] if n - 1 in layers else 0
    gateway = GATEWAY_BYTES if node == scenario.source else 0
    libraries = NODE_LIBRARY_BYTES if spans or gateway else 0
    return len(spans) * PROCESS_OVERHEAD_BYTES + weights + gateway + libraries


def profiler_fits(scenario: Scenario, node: str, manifest: dict[str, Any], state: DeploymentState) -> bool:
    """Whether ``node``'s memory holds the compute profiler (``segments.profile``: one more process with
    the embeddings, a layer and the head; peak RSS 544 MB measured for SmolLM2) beside the deployment's
    servers and gateway there. Profiling in a node's container beside a gateway and a standby on a 768 MiB
    camera OOM-killed them (smart city: 1572 tokens lost)."""
    n = manifest["num_layers"]
    running = [(e.first, e.end) for e in (*state.segments, *state.standbys) if e.node == node]
    # Two spans for the profiler's parts, one process: take back the second span's overhead.
    need = node_bytes(scenario, node, manifest, [*running, (0, 1), (n - 1, n)]) - PROCESS_OVERHEAD_BYTES
    return need <= _mem_bytes(scenario, node)


def transition_overflow(
    scenario: Scenario, current: DeploymentState, layout: list[tuple[str, int, int]]
) -> list[str]:
    """The nodes whose memory cannot hold a move to ``layout`` while it happens, each with what it would
    run. Make-before-break: a node's old servers serve on until the gateway has switched, so a new stage
    on that node starts beside them (in its standby, if it has one, else in a new process). For the
    seconds of a switch the kernel can drop and re-read the clean file pages of the processes (weights,
    libraries), not their own memory: the move fits if that does. On the smart-city camera a new stage
    started beside the gateway and the old stage (three processes, 768 MiB) OOM-killed them."""
    full = []
    for node in sorted({n for n, _, _ in layout}):
        old = [(e.first, e.end) for e in current.segments if e.node == node]
        new = [(f, e) for n, f, e in layout if n == node and (f, e) not in old]
        if not new:
            continue
        standbys = sum(e.node == node for e in current.standbys)
        processes = len(old) + max(len(new), standbys)  # a standby claimed for a new stage becomes it
        need = processes * PROCESS_OVERHEAD_BYTES + GATEWAY_BYTES * (node == scenario.source)
        if need > _mem_bytes(scenario, node):
            gateway = " and the gateway" if node == scenario.source else ""
            full.append(
                f"{node} would run {processes} servers{gateway} at once "
                f"({need >> 20} MiB of its own memory, {_mem_bytes(scenario, node) >> 20} MiB)"
            )
    return full


def misfit(scenario: Scenario, current: DeploymentState, plan: Plan) -> str | None:
    """Why a move to ``plan`` cannot be adopted for memory (``transition_overflow``), or None."""
    full = transition_overflow(scenario, current, plan_layout(plan))
    return f"the move does not fit: {'; '.join(full)}" if full else None


def _mem_bytes(scenario: Scenario, node: str) -> int:
    return next(x for x in scenario.nodes if x.name == node).mem_mb * 1024 * 1024


def _fits(scenario: Scenario, node: str, manifest: dict[str, Any], ranges: Iterable[tuple[int, int]]) -> bool:
    return node_bytes(scenario, node, manifest, ranges) <= _mem_bytes(scenario, node)


def _serving(layout: list[tuple[str, int, int]], node: str) -> list[tuple[int, int]]:
    return [(f, e) for n, f, e in layout if n == node]


def standby_nodes(
    scenario: Scenario, alive: Iterable[str], layout: list[tuple[str, int, int]], manifest: dict[str, Any]
) -> list[str]:
    """The alive nodes whose memory holds a standby besides their stages (and the gateway on the
    source): a standby must never push a node's own segments out of memory."""
    alive = set(alive)
    span = standby_range(manifest["num_layers"])
    return [
        node.name
        for node in scenario.nodes
        if node.name in alive and _idle_fits(scenario, node.name, manifest, layout, span)
    ]


def standby_span(
    scenario: Scenario, node: str, layout: list[tuple[str, int, int]], manifest: dict[str, Any]
) -> tuple[int, int]:
    """What a new standby on ``node`` holds. On the source node, where memory allows, the whole model:
    the plan a collapsing source link falls back to (all layers at the source) is then loaded before
    it is needed, and switching to it costs a switch, not a load. Elsewhere one middle layer, which
    costs little more than the process."""
    n = manifest["num_layers"]
    fallback = node == scenario.source and (node, 0, n) not in layout
    if fallback and _idle_fits(scenario, node, manifest, layout, (0, n)):
        return (0, n)
    return standby_range(n)


def _idle_fits(
    scenario: Scenario,
    node: str,
    manifest: dict[str, Any],
    layout: list[tuple[str, int, int]],
    span: tuple[int, int],
) -> bool:
    """Whether ``node`` holds an idle server of ``span`` beside its stages. An idle server's weights are
    clean file pages it does not touch (a standby's never were; a retained server's the kernel drops
    under pressure), and once it is claimed the stage it replaces stops: what must fit is its process
    beside the node's stages, and ``span`` by itself."""
    idle = [*_serving(layout, node), standby_range(manifest["num_layers"])]
    return _fits(scenario, node, manifest, idle) and _fits(scenario, node, manifest, [span])


def weight_bytes(manifest: dict[str, Any], first: int, end: int) -> int:
    weights = sum(manifest["layer_weight_bytes"][first:end])
    weights += manifest["embed_weight_bytes"] if first == 0 else 0
    return weights + (manifest["head_weight_bytes"] if end == manifest["num_layers"] else 0)


def retained_servers(
    scenario: Scenario,
    alive: Iterable[str],
    layout: list[tuple[str, int, int]],
    manifest: dict[str, Any],
    replaced: Iterable[Endpoint],
    spare: dict[str, Endpoint],
) -> dict[str, Endpoint]:
    """Old servers kept running, idle, as their node's standby (at most one per node) where the node's
    memory holds them idle beside its new stages (``_idle_fits``): moving back to a plan that used them
    (a link that recovers, a load that ends) then costs a switch, not a cold start of the process and its
    layers (29 s on the default scenario's edge; on a source at its CPU quota a fresh standby's boot would
    also eat the quota its serving stage needs). Among a node's old servers the one holding the most
    layers is kept."""
    alive = set(alive)
    by_node: dict[str, Endpoint] = {}
    for endpoint in replaced:
        best = by_node.get(endpoint.node)
        if endpoint.node in alive and (best is None or endpoint.end - endpoint.first > best.end - best.first):
            by_node[endpoint.node] = endpoint
    return {
        node: endpoint
        for node, endpoint in by_node.items()
        if _idle_fits(scenario, node, manifest, layout, (endpoint.first, endpoint.end))
    }


def control(endpoint: Endpoint, secret: str, op: str, timeout_s: float = 30.0, **args: Any) -> dict[str, Any]:
    """One control operation on a segment server, from the flow's process."""
    import asyncio

    from segments.client import control_once

    credentials = orchestrator_credentials(secret)
    return asyncio.run(
        control_once(endpoint.control_address, endpoint.port, credentials, op, timeout_s, **args)
    )


def wait_ready(endpoint: Endpoint, secret: str, timeout_s: float = STANDBY_READY_TIMEOUT_S) -> None:
    """Until the server answers a health check (it listens only once its range is loaded)."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            control(endpoint, secret, "health", timeout_s=5.0)
            return
        except Exception as exc:  # not listening yet
            last = exc
            time.sleep(0.1)
    raise RuntimeFailure(
        f"standby on {endpoint.node} ({endpoint.handle}) not ready within {timeout_s:.0f} s: {last}"
    )


def _claim(backend: Backend, standby: Endpoint, request: SegmentRequest, secret: str) -> Endpoint:
    """A standby loads the request's range with its node's whole CPU (beside a serving stage it boots
    under a cap of its own, which ``promote`` lifts)."""
    backend.promote(standby)
    return claim_standby(standby, request, secret)


def claim_standby(standby: Endpoint, request: SegmentRequest, secret: str) -> Endpoint:
    """Load the request's range into a started standby server: no process start, no imports; the store
    is per layer, so the server reads only the tensors of its range."""
    wait_ready(standby, secret)
    if (standby.first, standby.end) != (request.first, request.end):  # a retained server may hold it
        control(standby, secret, "load_range", timeout_s=300.0, model=request.model, first=request.first,
                end=request.end)  # fmt: skip
    return standby.model_copy(update={"first": request.first, "end": request.end})


@dataclass(frozen=True)
class BroughtUp:
    """The new chain's servers: endpoints in layer order, nodes whose standby took a stage, standbys
    left, and each node's cold start."""

    endpoints: list[Endpoint]
    claimed: list[str]
    spare: dict[str, Endpoint]
    starts: dict[str, NodeStart]


def _timed(fn: Callable[[], Endpoint], load: float | None) -> tuple[Endpoint, NodeStart]:
    started = time.monotonic()
    endpoint = fn()
    return endpoint, NodeStart(took_s=time.monotonic() - started, ended_at_s=time.time(), load=load)


def _loads(backend: Backend) -> dict[str, float]:
    """The nodes' background loads now; none where the backend cannot say (a start is then priced as
    if the load had not changed since)."""
    try:
        return backend.node_loads()
    except Exception:  # the monitor is away: the starts go on, unpriced by load
        return {}


def _bring_up(
    backend: Backend, requests: list[SegmentRequest], spare: dict[str, Endpoint], secret: str
) -> BroughtUp:
    """Every request's server, all at once (their loads overlap): a node's standby for its first stage,
    a fresh server otherwise."""
    spare = dict(spare)
    if not requests:
        return BroughtUp([], [], spare, {})
    jobs = []
    for request in requests:
        standby = spare.pop(request.node, None)
        jobs.append((request, standby))
    loads = _loads(backend)
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = [
            pool.submit(_timed, partial(_claim, backend, standby, request, secret), loads.get(request.node))
            if standby is not None
            else pool.submit(_timed, partial(backend.start_segment, request, secret), loads.get(request.node))
            for request, standby in jobs
        ]
    failures = [f.exception() for f in futures if f.exception() is not None]
    endpoints = [f.result()[0] for f in futures if f.exception() is None]
    if failures:
        for endpoint in endpoints:  # nothing half-done: the old chain keeps serving
            backend.stop_segment(endpoint)
        for (_, standby), future in zip(jobs, futures, strict=True):
            if standby is not None and future.exception() is not None:
                backend.stop_segment(standby)  # a standby that failed to load is of no further use
        raise RuntimeFailure(f"starting the new segments failed: {failures[0]}") from failures[0]
    claimed = [request.node for request, standby in jobs if standby is not None]
    starts = {
        request.node: future.result()[1]
        for (request, standby), future in zip(jobs, futures, strict=True)
        if standby is None
    }
    return BroughtUp(endpoints, claimed, spare, starts)


def _unchanged_servers(
    current: DeploymentState | None,
    layout: list[tuple[str, int, int]],
    model: str,
    alive: set[str],
    secret: str,
) -> dict[tuple[str, int, int], Endpoint]:
    """The current chain's servers that serve a stage of ``layout`` unchanged and still answer."""
    if current is None or current.model != model:
        return {}
    wanted = set(layout)
    kept = {}
    for endpoint in current.segments:
        stage = (endpoint.node, endpoint.first, endpoint.end)
        if stage in wanted and endpoint.node in alive and _answers(endpoint, secret):
            kept[stage] = endpoint
    return kept


def _answers(endpoint: Endpoint, secret: str) -> bool:
    try:
        control(endpoint, secret, "health", timeout_s=3.0)
    except Exception:  # dead, hung or unreachable: a server that cannot be kept
        return False
    return True


def _abandon_new_chain(
    backend: Backend,
    current: DeploymentState,
    endpoints: list[Endpoint],
    claimed: list[str],
    settings: Settings,
    progress: Progress,
) -> None:
    """The gateway refused the new chain and keeps the old one: stop the new segments (a later attempt
    reuses this revision's names) and forget the standbys they took."""
    from flows.state import save_state

    for endpoint in endpoints:
        progress(
            f"switch failed: stopping the new segment [{endpoint.first}, {endpoint.end}) on {endpoint.node}"
        )
        backend.stop_segment(endpoint)
    left = tuple(e for e in current.standbys if e.node not in set(claimed))
    save_state(current.model_copy(update={"standbys": left}), settings)


@contextlib.contextmanager
def deploy_lock(settings: Settings) -> Iterator[None]:
    """One deploy at a time on this machine's deployment, whichever process runs it (a controller's run
    in the serve process, a run the deployment's trigger started in its own): an exclusive lock on a file
    in the run directory, released when the deploy ends (or its process dies)."""
    import fcntl

    settings.run_dir.mkdir(parents=True, exist_ok=True)
    with (settings.run_dir / "deploy.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def deploy(
    backend: Backend,
    scenario_path: str,
    model: str,
    plan: Plan,
    current: DeploymentState | None,
    *,
    switch_mode: str = "kv",
    recompute_hops: int = 0,
    old_chain_broken: bool = False,
    progress: Progress = print,
    settings: Settings | None = None,
    probe: Callable[[str], float] | None = None,
    switch_timeout_s: float | None = None,
) -> DeployResult:
    """Make-before-break: bring up the new plan's segments, switch the gateway's sessions, stop the old ones.

    A stage the old chain already serves unchanged (same node, same range) from a server that answers
    keeps that server: the gateway keeps the sessions' KV on a hop both chains share, and no copy starts
    beside it (on a small node two copies and the gateway do not fit). With ``warm_standby`` a node's
    started standby takes its stage (a ``load_range``, seconds instead of a cold process start), and
    afterwards every node whose memory allows it gets a fresh standby, started in the background.

    ``old_chain_broken`` (a hop died; the switch is a replay): the old servers on live nodes that are not
    kept are stopped before the new ones start. Their KV is lost to the replay anyway, and their memory
    is what the new stages need.

    ``probe(gateway_url)`` (optional) runs right after the switch and returns the wall clock of the first
    token streamed through the new chain: when the new plan is serving.

    ``switch_timeout_s`` bounds the gateway's switch: past it the sessions stay on the old chain and the
    deploy fails, stopping what it started (a move whose KV must cross a link that collapsed meanwhile).
    """
    settings = settings or get_settings()
    started_at = time.monotonic()
    revision = 0 if current is None else current.revision + 1
    secret = current_secret(current)
    layout = plan_layout(plan)
    manifest = read_manifest(settings, model)
    breaches = trust_breaches(backend.scenario, layout, manifest["num_layers"])
    if breaches:
        raise RuntimeFailure(f"refusing a plan that breaks the trust constraints: {'; '.join(breaches)}")
    alive = set(backend.alive_nodes())
    spare = {
        e.node: e
        for e in (current.standbys if current is not None else ())
        if settings.flows.warm_standby and e.node in alive
    }
    kept = _unchanged_servers(current, layout, model, alive, secret)
    replaced = [e for e in (current.segments if current is not None else ()) if e not in kept.values()]
    # A broken chain's replaced servers on live nodes go first: their memory is what the new stages need.
    # Those on dead nodes wait until after the switch (stopping a paused container can take seconds).
    first_stopped = [e for e in replaced if old_chain_broken and e.node in alive]
    for endpoint in first_stopped:
        progress(
            f"the chain is broken: stopping segment [{endpoint.first}, {endpoint.end}) on {endpoint.node}"
        )
        backend.stop_segment(endpoint)
    requests = []
    for node, first, end in layout:
        if (node, first, end) in kept:
            progress(f"segment [{first}, {end}) on {node}: kept")
            continue
        how = "loading it into the standby" if node in spare else "starting a server"
        progress(f"segment [{first}, {end}) on {node}: {how}")
        requests.append(SegmentRequest(node, model, first, end, revision))
    try:
        brought = _bring_up(backend, requests, spare, secret)
    except RuntimeFailure:
        if current is not None:  # the old chain serves on; the standbys offered to the new one are gone
            from flows.state import save_state

            gone = set(spare) & {node for node, _, _ in layout}
            left = tuple(e for e in current.standbys if e.node not in gone)
            save_state(current.model_copy(update={"standbys": left}), settings)
        raise
    started, claimed, spare = brought.endpoints, brought.claimed, brought.spare
    ready_at = time.time()
    progress(f"the new plan's segments serve {time.monotonic() - started_at:.2f} s after the deploy began")
    fresh = {(e.node, e.first, e.end): e for e in started}
    endpoints = [kept.get(stage) or fresh[stage] for stage in layout]
    chain = chain_dict(model, endpoints)
    switch_started = time.monotonic()
    switch_report = None
    if current is None:
        gateway_url, gateway_handle = backend.start_gateway(
            model, secret, settings.segments.gateway_port, chain
        )
    else:
        gateway_url, gateway_handle = current.gateway_url, current.gateway_handle
        try:
            switch_report = set_gateway_chain(
                gateway_url,
                chain,
                mode=switch_mode,
                recompute_hops=recompute_hops,
                timeout_s=switch_timeout_s,
            )
        except httpx.HTTPError:
            _abandon_new_chain(backend, current, started, claimed, settings, progress)
            raise
    switch_s = time.monotonic() - switch_started
    switched_at = time.time()
    if current is not None:
        progress(f"sessions switched to the new chain in {switch_s:.2f} s")
    first_token_at = probe(gateway_url) if probe is not None else None
    # A server stopped already (a broken chain's) is not kept; the others may be, as warm standbys.
    stoppable = [e for e in replaced if e not in first_stopped]
    retained = (
        retained_servers(backend.scenario, alive, layout, manifest, stoppable, spare)
        if settings.flows.warm_standby
        else {}
    )
    stopped = [e for e in replaced if retained.get(e.node) != e]
    for endpoint in replaced:
        if endpoint in first_stopped:
            continue
        if retained.get(endpoint.node) == endpoint:
            progress(
                f"keeping segment [{endpoint.first}, {endpoint.end}) on {endpoint.node} as its warm standby"
            )
            continue
        progress(f"stopping segment [{endpoint.first}, {endpoint.end}) on {endpoint.node}")
        backend.stop_segment(endpoint)
    for node in sorted(set(spare) - alive):  # standbys on nodes that went away
        backend.stop_segment(spare.pop(node))
    for node in sorted(set(spare) & set(retained)):  # a retained server is the better standby
        backend.stop_segment(spare.pop(node))
    spare.update(retained)
    standbys = list(spare.values())
    if settings.flows.warm_standby:
        serving = {node for node, _, _ in layout}
        for node in standby_nodes(backend.scenario, alive, layout, manifest):
            if node not in spare:
                span = standby_span(backend.scenario, node, layout, manifest)
                # Beside a stage that serves sessions already, it boots capped (``promote`` lifts it).
                background = current is not None and node in serving
                progress(f"starting a standby server on {node} holding [{span[0]}, {span[1]})")
                standbys.append(
                    backend.start_standby(
                        node, model, manifest["num_layers"], revision, secret, span, background=background
                    )
                )
    state = DeploymentState(
        scenario=str(Path(scenario_path).resolve()), model=model, backend=backend.name, revision=revision,
        plan=plan.model_dump(mode="json"), segments=tuple(endpoints), gateway_url=gateway_url,
        gateway_handle=gateway_handle, secret=secret, updated_at_s=time.time(), standbys=tuple(standbys),
        starts={**(current.starts if current is not None else {}), **brought.starts},
    )  # fmt: skip
    return DeployResult(
        state=state,
        started=tuple(started),
        stopped=tuple(stopped),
        switch_s=switch_s,
        total_s=time.monotonic() - started_at,
        ready_at_s=ready_at,
        switched_at_s=switched_at,
        first_token_at_s=first_token_at,
        claimed=tuple(claimed),
        switch_report=switch_report,
    )


# ---------------------------------------------------------------------------------------------- reaction
# The steps of a reaction, as (step, stamp that ends it), in order from the change. A run the served
# deployment's trigger started profiles and decides itself; a run the controller started carries its
# decision (``flows.controller``), taken before the run.
FLOW_STAMPS: tuple[tuple[str, str], ...] = (
    ("detection_s", "event"),  # the link's rate changed -> the daemon emitted the event
    ("event_to_run_start_s", "run_started"),  # event -> the flow run started (trigger, runner, process)
    ("flow_setup_s", "body"),  # flow run started -> its body began
    ("profile_s", "profiled"),  # node profiles (cached on a link event) and link rates
    ("optimise_s", "decided"),  # problem, solve, chain health, decision
    ("deploy_s", "ready"),  # every new segment serving its range (standby load_range or cold start)
    ("switch_s", "switched"),  # gateway /admin/chain: live sessions moved to the new chain
    ("first_token_s", "first_token"),  # switched -> first token through the new chain
)
CONTROLLER_STAMPS: tuple[tuple[str, str], ...] = (
    ("detection_s", "event"),
    ("decide_s", "decided"),  # event -> the controller's calibrated solve and forecast decision
    ("run_start_s", "run_started"),  # decision -> the flow run started
    ("flow_setup_s", "body"),
    ("deploy_s", "ready"),
    ("switch_s", "switched"),
    ("first_token_s", "first_token"),
)
REACTION_STEPS = tuple(step for step, _ in FLOW_STAMPS)


def reaction_timing(
    stamps: dict[str, float | None], order: tuple[tuple[str, str], ...] = FLOW_STAMPS
) -> dict[str, float | None]:
    """Per-step seconds of one reaction from the wall-clock stamps of its steps (time.time(): the daemon,
    the Prefect server and the flow run share this machine's clock). Stamps: ``changed`` (the link rate
    set) and then those ``order`` names; a missing stamp leaves the step it ends None, and the next step
    runs from the last stamp there is (a decision the controller took on a periodic evaluation has no
    event). ``end_to_end_s``: from the change (or, without it, the first stamp there is) to the first
    token on the new chain."""

    def span(a: str | None, b: str) -> float | None:
        x, y = (None if a is None else stamps.get(a)), stamps.get(b)
        return None if x is None or y is None else round(y - x, 4)

    steps: dict[str, float | None] = {}
    previous: str | None = "changed" if stamps.get("changed") is not None else None
    for step, stamp in order:
        steps[step] = span(previous, stamp)
        if stamps.get(stamp) is not None:
            previous = stamp
    names = ["changed", *(stamp for _, stamp in order)]
    origin = next((n for n in names if stamps.get(n) is not None), "changed")
    steps["end_to_end_s"] = span(origin, "first_token")
    steps["end_to_end_from"] = origin  # type: ignore[assignment]
    return steps


def first_live_token_at(gateway_url: str, timeout_s: float = 2.0) -> float | None:
    """Wall clock of the first token a live session got from the gateway's current chain (its step
    telemetry, ``segments.telemetry``); None when none came within ``timeout_s`` (no session running)."""
    deadline = time.monotonic() + timeout_s
    seq = 0
    with httpx.Client(timeout=5.0, headers=admin_headers()) as http:
        while time.monotonic() < deadline:
            data = http.get(f"{gateway_url}/admin/telemetry", params={"since": seq}).json()
            fresh = [r["at_s"] for r in data["records"] if r["generation"] == data["generation"]]
            if fresh:
                return min(fresh)
            seq = data["seq"]
            time.sleep(0.01)
    return None


def first_token_at(gateway_url: str, prompt: str) -> float:
    """Wall clock of the first token of a one-token completion through the gateway."""
    from flows.measure import stream_completion

    sample = stream_completion(gateway_url, prompt, 1, timeout_s=120.0)
    return sample.started_at_s + sample.ttft_s


def current_secret(current: DeploymentState | None) -> str:
    return current.secret if current is not None else secrets.token_hex(32)


def chain_dict(model: str, endpoints: list[Endpoint]) -> dict[str, Any]:
    """The gateway's chain (``segments.client.Chain.to_dict()``) for these endpoints, in layer order."""
    hops = [{"host": e.host, "port": e.port, "first": e.first, "end": e.end} for e in endpoints]
    return {"model": model, "hops": hops}


def chain_health(gateway_url: str) -> tuple[bool, str]:
    """Whether every hop of the gateway's chain answers; (False, why) when one does not."""
    try:
        response = httpx.get(f"{gateway_url}/admin/health", timeout=15, headers=admin_headers())
    except httpx.HTTPError as exc:
        return False, f"gateway unreachable: {exc}"
    if response.status_code == 200:
        return True, "all hops answer"
    return False, str(response.json().get("error", response.text))


def switch_of(decision: dict[str, Any]) -> tuple[str, int]:
    """How the decision priced the sessions' move cheapest: (gateway switch mode, stages recomputed)."""
    cost = decision.get("cost", {})
    if cost.get("kv_mode") == "recompute":
        return "replay", 0
    return "push", int(cost.get("recompute_stages", 0))


def foreseen_chain(state: DeploymentState, layout: list[tuple[str, int, int]]) -> dict[str, Any] | None:
    """The gateway chain a deploy of ``layout`` will switch to, where it is known before the deploy:
    every stage is served by the server serving it now or by its node's standby already holding its
    range (the source's whole-model fallback). None where a stage needs a load or a new server."""
    servers = {(e.node, e.first, e.end): e for e in (*state.standbys, *state.segments)}  # serving first
    if any(stage not in servers for stage in layout):
        return None
    return chain_dict(state.model, [servers[stage] for stage in layout])


def prepare_gateway_chain(
    client: httpx.Client, gateway_url: str, chain: dict[str, Any], *, mode: str, recompute_hops: int
) -> bool:
    """Have the gateway open ``chain`` and prefill its live sessions there ahead of the switch a deploy
    will make (``/admin/prepare``: it returns at once). Returns whether it is preparing."""
    body = {"chain": chain, "mode": mode, "recompute_hops": recompute_hops}
    response = client.post(f"{gateway_url}/admin/prepare", json=body, timeout=2.0, headers=admin_headers())
    response.raise_for_status()
    return bool(response.json().get("preparing"))


def set_gateway_chain(
    gateway_url: str,
    chain: dict[str, Any],
    *,
    mode: str,
    recompute_hops: int = 0,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """Switch the gateway's live sessions to ``chain``; returns its switch report (what moved, how long).
    ``timeout_s``: the switch's budget, past which the gateway keeps the old chain (None: unbounded)."""
    body: dict[str, Any] = {"chain": chain, "mode": mode, "recompute_hops": recompute_hops}
    if timeout_s is not None:
        body["timeout_s"] = timeout_s
    response = httpx.post(f"{gateway_url}/admin/chain", json=body, timeout=300, headers=admin_headers())
    if response.is_error:  # keep the gateway's reason (raise_for_status drops the body)
        raise httpx.HTTPStatusError(
            f"the gateway refused the new chain ({response.status_code}): {response.text[:500]}",
            request=response.request,
            response=response,
        )
    return response.json()


def teardown(backend: Backend, state: DeploymentState) -> None:
    backend.stop_gateway(state.gateway_handle)
    for endpoint in (*state.segments, *state.standbys):
        backend.stop_segment(endpoint)
