"""The steps the flows run, as plain functions (the Prefect tasks in ``flows.tasks`` wrap them).

profile -> problem -> plan -> decision -> deploy. Kept free of Prefect so that each step can be tested and
reused by the experiment runner without an API server.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from flows.runtime import Backend, LinkProbe, SegmentRequest
from flows.state import DeploymentState, Endpoint
from mecsplit.settings import Settings, get_settings
from policies.plan import Plan
from policies.problem import Constraints, Link, Node, Problem, Workload
from testbed.scenario import Scenario

Progress = Callable[[str], None]

# Per-tier effective flop/s, used only for nodes that could not be profiled (they then rank last).
_FALLBACK_SPEED_FLOPS = {"device": 2e9, "edge": 8e9, "mec": 8e9, "cloud": 16e9}
# What a segment process costs besides its weights: the interpreter, torch and transformers.
PROCESS_OVERHEAD_BYTES = 320 * 1024 * 1024


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
    progress: Progress = print,
    settings: Settings | None = None,
) -> dict[str, dict[str, Any]]:
    """Per-node compute profiles, measured where the cached one is older than ``max_age_s`` (or the node
    is in ``refresh``, e.g. the node an overload event named). Nodes are profiled one at a time: emulated
    nodes share the host's cores, and a request's pipeline computes on one node at a time too."""
    settings = settings or get_settings()
    cache_path = settings.run_dir / f"profiles-{backend.name}-{model}-{context}.json"
    cache: dict[str, dict[str, Any]] = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    now = time.time()
    refresh = set(refresh)
    stale = sorted(
        n for n in nodes if n in refresh or n not in cache or now - cache[n]["measured_at_s"] > max_age_s
    )

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
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    cache_path.write_text(json.dumps(cache, sort_keys=True))
    for node in sorted(set(nodes) - set(stale)):
        progress(f"{node}: cached profile, {now - cache[node]['measured_at_s']:.0f} s old")
    return {n: cache[n] for n in sorted(nodes)}


def profile_links(
    backend: Backend, scenario: Scenario, alive: set[str], progress: Progress = print
) -> list[LinkProbe]:
    probes = []
    for link in sorted(scenario.links, key=lambda lk: (lk.a, lk.b)):
        if link.a in alive and link.b in alive:
            probe = backend.probe_link(link.a, link.b)
            progress(f"link {link.a}-{link.b}: {probe.bw_mbit:.1f} Mbit/s, rtt {probe.rtt_ms:.1f} ms")
            probes.append(probe)
    return probes


def build_problem(
    scenario: Scenario,
    facts: ModelFacts,
    node_profiles: dict[str, dict[str, Any]],
    links: list[LinkProbe],
) -> Problem:
    """The optimiser's problem from measured profiles and the scenario's constraints and workload."""
    alive = sorted(node_profiles)
    nodes = [
        Node(
            name=n.name,
            tier=n.tier,
            speed_flops=_FALLBACK_SPEED_FLOPS[n.tier],
            mem_bytes=max(0, n.mem_mb * 1024 * 1024 - PROCESS_OVERHEAD_BYTES),
            load=0.0,  # the profile ran under the node's current load, so it is already in the times
            trust=n.trust / 3,
        )
        for n in scenario.nodes
        if n.name in node_profiles
    ]
    c = scenario.constraints
    w = scenario.workload
    n_layers = facts.num_layers
    return Problem.from_profiles(
        model_name=facts.name,
        layer_weight_bytes=facts.layer_weight_bytes,
        kv_bytes_per_token=facts.kv_bytes_per_token_per_layer,
        hidden_bytes_per_token=facts.hidden_size * 4,
        nodes=nodes,
        links=[Link(a=p.a, b=p.b, bw_mbit=max(p.bw_mbit, 0.01), rtt_ms=p.rtt_ms) for p in links],
        source=scenario.source,
        prefill_s={m: [node_profiles[m]["layer_prefill_s_per_token"]] * n_layers for m in alive},
        decode_s={m: [node_profiles[m]["layer_decode_s"]] * n_layers for m in alive},
        head_decode_s={
            m: node_profiles[m]["head_decode_s"] + node_profiles[m]["embed_decode_s"] for m in alive
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
            max_ttft_s=c.slo_ttft_s,
            max_tpot_s=c.slo_tpot_s,
            min_throughput_tok_s=c.min_throughput_tok_s,
        ),
    )


# ------------------------------------------------------------------------------------------------ deploy
@dataclass(frozen=True)
class DeployResult:
    state: DeploymentState
    started: tuple[Endpoint, ...]
    stopped: tuple[Endpoint, ...]
    switch_s: float
    total_s: float


def plan_layout(plan: Plan) -> list[tuple[str, int, int]]:
    return [(s.node, s.first, s.end) for s in plan.stages]


def deploy(
    backend: Backend,
    scenario_path: str,
    model: str,
    plan: Plan,
    current: DeploymentState | None,
    *,
    switch_mode: str = "kv",
    progress: Progress = print,
    settings: Settings | None = None,
) -> DeployResult:
    """Make-before-break: start the new plan's segments, switch the gateway's sessions, stop the old ones.

    Every stage gets a fresh server even where the old plan had the same range on the same node: the
    gateway moves each session's KV from the old chain to the new one and then drops it from the old
    servers, which would drop it from a server that both chains share.
    """
    settings = settings or get_settings()
    started_at = time.monotonic()
    revision = 0 if current is None else current.revision + 1
    secret = current_secret(current)
    layout = plan_layout(plan)
    for node, first, end in layout:
        progress(f"starting segment [{first}, {end}) on {node}")
    # Started together: their model loads overlap, and a plan change costs one load time, not K.
    requests = [SegmentRequest(node, model, first, end, revision) for node, first, end in layout]
    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        futures = [pool.submit(backend.start_segment, request, secret) for request in requests]
    failures = [f.exception() for f in futures if f.exception() is not None]
    endpoints = [f.result() for f in futures if f.exception() is None]
    if failures:
        for endpoint in endpoints:  # nothing half-done: the old chain keeps serving
            backend.stop_segment(endpoint)
        raise failures[0]  # type: ignore[misc]
    chain = chain_dict(model, endpoints)
    switch_started = time.monotonic()
    if current is None:
        gateway_url, gateway_handle = backend.start_gateway(
            model, secret, settings.segments.gateway_port, chain
        )
    else:
        gateway_url, gateway_handle = current.gateway_url, current.gateway_handle
        set_gateway_chain(gateway_url, chain, mode=switch_mode)
    switch_s = time.monotonic() - switch_started
    stopped = list(current.segments) if current is not None else []
    for endpoint in stopped:
        progress(f"stopping segment [{endpoint.first}, {endpoint.end}) on {endpoint.node}")
        backend.stop_segment(endpoint)
    state = DeploymentState(
        scenario=str(Path(scenario_path).resolve()), model=model, backend=backend.name, revision=revision,
        plan=plan.model_dump(mode="json"), segments=tuple(endpoints), gateway_url=gateway_url,
        gateway_handle=gateway_handle, secret=secret, updated_at_s=time.time(),
    )  # fmt: skip
    return DeployResult(
        state=state,
        started=tuple(endpoints),
        stopped=tuple(stopped),
        switch_s=switch_s,
        total_s=time.monotonic() - started_at,
    )


def current_secret(current: DeploymentState | None) -> str:
    return current.secret if current is not None else secrets.token_hex(32)


def chain_dict(model: str, endpoints: list[Endpoint]) -> dict[str, Any]:
    """The gateway's chain (``segments.client.Chain.to_dict()``) for these endpoints, in layer order."""
    hops = [{"host": e.host, "port": e.port, "first": e.first, "end": e.end} for e in endpoints]
    return {"model": model, "hops": hops}


def chain_health(gateway_url: str) -> tuple[bool, str]:
    """Whether every hop of the gateway's chain answers; (False, why) when one does not."""
    try:
        response = httpx.get(f"{gateway_url}/admin/health", timeout=15)
    except httpx.HTTPError as exc:
        return False, f"gateway unreachable: {exc}"
    if response.status_code == 200:
        return True, "all hops answer"
    return False, str(response.json().get("error", response.text))


def set_gateway_chain(gateway_url: str, chain: dict[str, Any], *, mode: str) -> dict[str, Any]:
    response = httpx.post(f"{gateway_url}/admin/chain", json={"chain": chain, "mode": mode}, timeout=300)
    response.raise_for_status()
    return response.json()


def teardown(backend: Backend, state: DeploymentState) -> None:
    backend.stop_gateway(state.gateway_handle)
    for endpoint in state.segments:
        backend.stop_segment(endpoint)
