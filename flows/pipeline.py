"""The steps the flows run, as plain functions (the Prefect tasks in ``flows.tasks`` wrap them).

profile -> problem -> plan -> decision -> deploy. Kept free of Prefect so that each step can be tested and
reused by the experiment runner without an API server.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
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


def model_facts(settings: Settings, model: str) -> ModelFacts:
    from segments import store
    from segments.runner import kv_width

    manifest = store.read_manifest(settings.store_dir, model)
    config = store.load_config(settings.store_dir, manifest)
    return ModelFacts(
        name=model,
        num_layers=manifest.num_layers,
        hidden_size=manifest.hidden_size,
        layer_weight_bytes=tuple(manifest.layer_weight_bytes),
        embed_weight_bytes=manifest.embed_weight_bytes,
        head_weight_bytes=manifest.head_weight_bytes,
        kv_bytes_per_token_per_layer=2 * kv_width(config) * 4,  # fp32 K and V
    )


def profile_nodes(
    backend: Backend, nodes: Iterable[str], model: str, context: int, progress: Progress = print
) -> dict[str, dict[str, Any]]:
    profiles = {}
    for node in sorted(nodes):
        started = time.monotonic()
        profiles[node] = backend.profile_compute(node, model, context)
        progress(
            f"profiled {node}: {profiles[node]['layer_decode_s'] * 1e3:.2f} ms/layer/token "
            f"({time.monotonic() - started:.1f} s)"
        )
    return profiles


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
    reused: tuple[Endpoint, ...]
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
    """Make-before-break: start what the new plan lacks, switch the gateway's sessions, stop the rest."""
    settings = settings or get_settings()
    started_at = time.monotonic()
    revision = 0 if current is None else current.revision + 1
    secret = current_secret(current, settings)
    have = {(e.node, e.first, e.end): e for e in (current.segments if current else ())}
    endpoints: list[Endpoint] = []
    started: list[Endpoint] = []
    try:
        for node, first, end in plan_layout(plan):
            if (node, first, end) in have:
                endpoints.append(have[(node, first, end)])
                continue
            progress(f"starting segment [{first}, {end}) on {node}")
            endpoint = backend.start_segment(SegmentRequest(node, model, first, end, revision), secret)
            started.append(endpoint)
            endpoints.append(endpoint)
    except BaseException:
        for endpoint in started:  # nothing half-done: the old chain keeps serving
            backend.stop_segment(endpoint)
        raise
    if current is None:
        gateway_url, gateway_handle = backend.start_gateway(model, secret, settings.segments.gateway_port)
    else:
        gateway_url, gateway_handle = current.gateway_url, current.gateway_handle
    switch_started = time.monotonic()
    set_gateway_chain(gateway_url, model, endpoints, mode=switch_mode)
    switch_s = time.monotonic() - switch_started
    kept = {(e.node, e.first, e.end) for e in endpoints}
    stopped = [e for key, e in have.items() if key not in kept]
    for endpoint in stopped:
        progress(f"stopping segment [{endpoint.first}, {endpoint.end}) on {endpoint.node}")
        backend.stop_segment(endpoint)
    state = DeploymentState(
        scenario=scenario_path, model=model, backend=backend.name, revision=revision,
        plan=plan.model_dump(mode="json"), segments=tuple(endpoints), gateway_url=gateway_url,
        gateway_handle=gateway_handle, secret=secret, updated_at_s=time.time(),
    )  # fmt: skip
    return DeployResult(
        state=state,
        started=tuple(started),
        stopped=tuple(stopped),
        reused=tuple(e for e in endpoints if e not in started),
        switch_s=switch_s,
        total_s=time.monotonic() - started_at,
    )


def current_secret(current: DeploymentState | None, settings: Settings) -> str:
    del settings
    return current.secret if current is not None else secrets.token_hex(32)


def set_gateway_chain(
    gateway_url: str, model: str, endpoints: list[Endpoint], *, mode: str
) -> dict[str, Any]:
    chain = {
        "model": model,
        "hops": [{"host": e.host, "port": e.port, "first": e.first, "end": e.end} for e in endpoints],
    }
    response = httpx.post(f"{gateway_url}/admin/chain", json={"chain": chain, "mode": mode}, timeout=300)
    response.raise_for_status()
    return response.json()


def teardown(backend: Backend, state: DeploymentState) -> None:
    backend.stop_gateway(state.gateway_handle)
    for endpoint in state.segments:
        backend.stop_segment(endpoint)


def pairwise_hops(endpoints: list[Endpoint]) -> list[tuple[str, str]]:
    return [(a.node, b.node) for a, b in itertools.pairwise(endpoints) if a.node != b.node]
