"""``mecsplit bench overload``: what admission control keeps when demand is ``factor`` times capacity.

testbed up (or the local backend) -> deploy the scenario's plan -> warm-up: ``WARMUP_SESSIONS``
generate for ``warmup_s`` while the serve controller (observing only, admission control on) learns the
plan's pace and sets the gateway's admission limit L, the most sessions the plan holds within the SLO
(``policies.capacity.sessions_within_slo``) -> phase "admission": ``factor`` x L closed-loop users, each
coming back after a refusal's Retry-After, the controller keeping the limit current; the first
``SETTLE_S`` are dropped, then ``runs`` windows of ``seconds`` are measured -> phase "no_admission": the
limit lifted and the controller stopped, the same users, the same windows -> teardown.

Per phase, over the requests begun in its windows: requests admitted, refused (429) and failed; aggregate
tokens/s; TTFT and TPOT p50/p95 of the admitted ones and the share of them within the scenario's SLO
(its TTFT and TPOT bounds, where set); goodput (requests within the SLO per second); the longest request;
the users whose request had not ended ``DRAIN_S`` after the phase (hung); and each node's peak RSS (the
resident memory of everything in the node's cgroup, sampled every ``MEMORY_EVERY_S``; testbed only: the
local backend's processes share one host with nothing to tell them apart by node).
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from flows.measure import admin_headers
from flows.predictions import clear_run_learning
from flows.throughput_bench import batching, window_figures
from flows.workload import ChatSession, RequestRecord, start_bench, teardown, testbed_up
from mecsplit.settings import Settings, get_settings
from testbed.scenario import Scenario

SETTLE_S = 10.0  # before a phase's windows: the users' first requests queue and the limit takes hold
WARMUP_SESSIONS = 2  # a queue nearly empty: the steps' own pace, which the model's queueing starts from
DRAIN_S = 60.0  # after a phase: a user whose request has not ended by then is counted as hung
MEMORY_EVERY_S = 0.5


def _say(message: str) -> None:
    print(f"[bench overload {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class PeakMemory:
    """Each node's peak resident memory while it runs: the ``total_rss`` of the node's cgroup (every
    process of its containers), sampled in a thread of its own. Testbed only (cgroup v1 memory)."""

    def __init__(self, prefix: str, nodes: Sequence[str]) -> None:
        from testbed.node import MEM_CONTROLLER, NodeCgroup

        self._paths = {n: NodeCgroup(f"{prefix}-{n}").path(MEM_CONTROLLER) / "memory.stat" for n in nodes}
        self.peaks_bytes: dict[str, int] = dict.fromkeys(nodes, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mecsplit-memory", daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(MEMORY_EVERY_S):
            for node, path in self._paths.items():
                rss = rss_bytes(path)
                if rss is not None:
                    self.peaks_bytes[node] = max(self.peaks_bytes[node], rss)

    def peaks_mb(self) -> dict[str, float]:
        return {n: round(b / 2**20, 1) for n, b in self.peaks_bytes.items()}


def rss_bytes(memory_stat: Path) -> int | None:
    """``total_rss`` of a cgroup v1 ``memory.stat`` (its own and its children's); None where unreadable."""
    try:
        for line in memory_stat.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "total_rss":
                return int(value)
    except OSError:
        return None
    return None


class _Limits:
    """The serve controller's observing half in a thread: it learns the plan's pace from live traffic and
    keeps the gateway's admission limit at what the plan holds within the SLO (``Controller._admit``)."""

    def __init__(self, scenario_path: Path, settings: Settings) -> None:
        from flows.controller import Controller, ControllerConfig

        flows = settings.flows.model_copy(update={"admission_control": True})
        admitting = settings.model_copy(update={"flows": flows})
        config = ControllerConfig.from_settings(admitting, "latency_dp", observe_only=True)
        self.control = Controller(
            scenario_path, config, lambda _p: None, lambda: False, settings=admitting
        )  # fmt: skip
        self._every_s = settings.flows.evaluate_every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mecsplit-limits", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._every_s):
            self.control.tick()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def gateway_limit(gateway_url: str) -> int | None:
    with httpx.Client(timeout=5.0, headers=admin_headers()) as http:
        return http.get(f"{gateway_url}/admin/chain").raise_for_status().json().get("max_live_sessions")


def set_gateway_limit(gateway_url: str, limit: int | None) -> None:
    with httpx.Client(timeout=5.0, headers=admin_headers()) as http:
        http.post(f"{gateway_url}/admin/limits", json={"max_live_sessions": limit}).raise_for_status()


def phase_figures(
    records: Sequence[RequestRecord],
    windows: Sequence[tuple[float, float]],
    scenario: Scenario,
) -> dict[str, Any]:
    """What the users of one phase got: see the module docstring."""
    inside = [r for r in records if any(a <= r.started_at_s < b for a, b in windows)]
    admitted = [r for r in records if not r.refused]
    served = [r for r in inside if not r.refused]
    slo = scenario.constraints
    good = [r for r in served if r.within_slo(slo.slo_ttft_s, slo.slo_tpot_s)]
    span_s = sum(b - a for a, b in windows)
    lasted = [r.duration_s for r in inside]
    return {
        **window_figures(admitted, windows),  # tokens/s and percentiles of the admitted requests alone
        "requests": len(inside),
        "admitted": len(served),
        "refused": len(inside) - len(served),
        "within_slo_share": round(len(good) / len(served), 3) if served else None,
        "goodput_requests_per_s": round(len(good) / span_s, 3) if span_s else None,
        "longest_request_s": round(max(lasted), 2) if lasted else None,
    }


def _phase(
    url: str, scenario: Scenario, users: int, seconds: float, runs: int, memory: PeakMemory | None
) -> dict[str, Any]:
    chats = [ChatSession(url, scenario.workload.max_new_tokens, first_prompt=i) for i in range(users)]
    for chat in chats:
        chat.start()
    try:
        time.sleep(SETTLE_S)
        t0 = time.time()
        time.sleep(seconds * runs)
    finally:
        for chat in chats:
            chat.halt()
        deadline = time.monotonic() + DRAIN_S
        hung = sum(not chat.stop(timeout_s=max(0.1, deadline - time.monotonic())) for chat in chats)
    windows = [(t0 + i * seconds, t0 + (i + 1) * seconds) for i in range(runs)]
    figures = phase_figures([r for c in chats for r in c.records], windows, scenario)
    peaks = memory.peaks_mb() if memory is not None else None
    return {"users": users, **figures, "hung_users": hung, "peak_rss_mb": peaks}


def run_overload_bench(
    scenario_path: Path,
    *,
    factor: float = 4.0,
    seconds: float = 20.0,
    runs: int = 3,
    warmup_s: float = 30.0,
    most_users: int = 128,
    max_batch: int | None = None,
    backend: str = "auto",
) -> dict[str, Any]:
    """See the module docstring."""
    start = start_bench(scenario_path, backend)
    settings, scenario, chosen = start.settings, start.scenario, start.backend
    clear_run_learning(settings)
    phases: dict[str, dict[str, Any]] = {}
    limits: _Limits | None = None
    try:
        testbed_up(start, scenario_path, _say)
        from flows.reconfigure import deploy_flow

        with batching(max_batch):
            _say(f"deploying (servers' max batch {get_settings().segments.max_batch})")
            first = deploy_flow(
                scenario=str(scenario_path), backend=chosen, model=scenario.model, measure_tokens=0
            )
        url = first["gateway_url"]
        limits = _Limits(scenario_path, settings)
        limits.start()
        limit = _warm_up(url, scenario, warmup_s)
        users = min(most_users, max(1, round(factor * limit)))
        for name in ("admission", "no_admission"):
            if name == "no_admission":
                limits.stop()
                limits = None
                set_gateway_limit(url, None)
            _say(f"{name}: {users} users, the gateway's limit {gateway_limit(url)}")
            with _memory(chosen, settings, scenario) as memory:
                phases[name] = _phase(url, scenario, users, seconds, runs, memory)
            phases[name]["limit_after"] = gateway_limit(url)
            _say_phase(phases[name])
    finally:
        if limits is not None:
            limits.stop()
        teardown(chosen, scenario)
    return _report(scenario, chosen, first["plan"], limit, users, factor, phases, seconds, runs)


def _warm_up(url: str, scenario: Scenario, warmup_s: float) -> int:
    """A few sessions generate while the controller learns; the admission limit it then set."""
    from flows.runtime import RuntimeFailure

    sessions = WARMUP_SESSIONS
    _say(f"warm-up: {sessions} sessions for {warmup_s:.0f} s while the controller learns the plan's pace")
    chats = [ChatSession(url, scenario.workload.max_new_tokens, first_prompt=i) for i in range(sessions)]
    for chat in chats:
        chat.start()
    time.sleep(warmup_s)
    for chat in chats:
        chat.stop()
    limit = gateway_limit(url)
    if limit is None:
        raise RuntimeFailure(
            f"the controller set no admission limit in {warmup_s:.0f} s of traffic: the plan's pace was "
            "not learned (see the deployment's predictions.json); try a longer --warmup"
        )
    return int(limit)


def _memory(backend: str, settings: Settings, scenario: Scenario) -> Any:
    if backend != "testbed":
        return contextlib.nullcontext(None)
    return PeakMemory(settings.testbed.prefix, [n.name for n in scenario.nodes])


def _say_phase(row: dict[str, Any]) -> None:
    _say(
        f"  {row['admitted']} admitted, {row['refused']} refused, {row['hung_users']} hung; TTFT p95 "
        f"{row['ttft_p95_ms']} ms, TPOT p95 {row['tpot_p95_ms']} ms; {row['within_slo_share']} within the SLO"
    )


def _report(
    scenario: Scenario,
    backend: str,
    plan: Any,
    limit: int,
    users: int,
    factor: float,
    phases: dict[str, dict[str, Any]],
    seconds: float,
    runs: int,
) -> dict[str, Any]:
    slo = scenario.constraints
    with_, without = phases["admission"], phases["no_admission"]
    good, bad = with_["goodput_requests_per_s"], without["goodput_requests_per_s"]
    return {
        "bench": "overload", "scenario": scenario.name, "backend": backend, "plan": plan,
        "admission_limit": limit, "factor": factor, "users": users, "seconds": seconds, "runs": runs,
        "settle_s": SETTLE_S, "max_new_tokens": scenario.workload.max_new_tokens,
        "max_batch": get_settings().segments.max_batch,
        "slo_ttft_ms": None if slo.slo_ttft_s is None else slo.slo_ttft_s * 1e3,
        "slo_tpot_ms": None if slo.slo_tpot_s is None else slo.slo_tpot_s * 1e3,
        "phases": phases,
        "goodput_ratio": round(good / bad, 3) if good is not None and bad else None,
    }  # fmt: skip
