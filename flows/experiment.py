"""Experiments: one scenario, its workload and timeline, under each chosen policy, side by side.

For every policy, from the same start: a fresh testbed, the deploy flow with that policy, the served
reconfigure deployment, the scenario's concurrent chat sessions streaming through the gateway, and the
scenario's timeline replayed by the testbed daemon (bandwidth traces, CPU load, failures).

- ``adaptive`` starts from the best plan (``latency_dp``) and its served deployment re-plans on every
  event, adopting a new plan when the predicted gain beats the migration cost.
- ``static`` is the best plan for the start, kept for the whole run.
- a baseline name (``neurosurgeon``, ``exo``, ``petals``, ``edgeshard``, ...) deploys that policy's plan
  and keeps it.

Static plans and baselines are served with ``failover_only``: they re-plan (with their own policy, on
the surviving nodes) only when a node of their chain dies, so a node failure costs them a rebuild, not
the rest of the run; they never adapt to the network otherwise.

``results/<run>/``: scenario.yaml, meta.json, summary.json, ``<policy>/samples.parquet`` (one row per
streamed token), ``<policy>/requests.json`` (every request: asked, received, lost, error),
``<policy>/policy.json`` (its figures, reconfigurations with their times), latency.png (per-token
latency over time, one panel per policy, timeline events marked) and bars.png (the per-policy figures).
Every figure is defined in docs/experiments.md.
"""

from __future__ import annotations

import json
import shutil
import statistics
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows import results
from flows.prefect_server import ensure_server
from flows.state import load_state
from flows.workload import (
    ChatSession,
    RequestRecord,
    choose_backend,
    prepare_model,
    serve_process,
    stop_process,
    teardown,
)
from mecsplit.settings import get_settings
from testbed.scenario import load_scenario

ADAPTIVE = "adaptive"
STATIC = "static"
BASE_POLICY = "latency_dp"  # what adaptive and static start from, and what adaptive re-plans with
STALL_FACTOR = 2.0  # a token gap longer than this many times the policy's median gap is a stall
GOAL_SPEEDUP = 1.3  # adaptive's mean per-token latency against the best static-like policy's
DRAIN_TIMEOUT_S = 180.0  # a reconfiguration still running when the workload ends may finish this long


def _deploy_policy(policy: str) -> str:
    return BASE_POLICY if policy in (ADAPTIVE, STATIC) else policy


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 1]) of already sorted values."""
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _ms(value_s: float | None) -> float | None:
    return None if value_s is None else round(value_s * 1e3, 2)


def policy_stats(
    records: Sequence[RequestRecord], window_s: float, *, stall_factor: float = STALL_FACTOR
) -> dict[str, Any]:
    """The figures of one policy's run (docs/experiments.md defines each).

    Per-token latency is the gap between two streamed tokens of a request; TTFT the time from sending a
    request to its first token. A stall is a token gap longer than ``stall_factor`` times the policy's
    median gap, or a TTFT longer than ``stall_factor`` times its median TTFT; ``total_stall_s`` sums, over
    stalls, the wait minus the median (the waiting beyond normal), plus each failed request's wait from
    its last token (or its start) to the failure, minus the median gap.
    Tokens lost are the tokens a request asked for and never got (none when the model ended the answer
    itself)."""
    gaps = sorted(g for r in records for g in r.token_gaps_s)
    ttfts = sorted(r.ttft_s for r in records if r.ttft_s is not None)
    median_gap = statistics.median(gaps) if gaps else None
    median_ttft = statistics.median(ttfts) if ttfts else None
    stalls = [] if median_gap is None else [g - median_gap for g in gaps if g > stall_factor * median_gap]
    # A request held before its first token (a chain being rebuilt) stalls its user just the same, and so
    # does a failed request's wait from its last token to the failure (beyond the median gap).
    first_stalls = (
        [] if median_ttft is None else [t - median_ttft for t in ttfts if t > stall_factor * median_ttft]
    )
    reference = median_gap or median_ttft or 0.0
    failed_waits = [
        max(0.0, r.waited_before_failure_s - reference) for r in records if r.failed_after_s is not None
    ]
    return {
        "requests": len(records),
        "failed_requests": sum(1 for r in records if r.error is not None),
        "tokens": sum(r.received for r in records),
        "tokens_asked": sum(r.asked for r in records),
        "tokens_lost": sum(r.lost for r in records),
        "mean_tpot_ms": _ms(statistics.fmean(gaps)) if gaps else None,
        "median_tpot_ms": _ms(median_gap),
        "p95_tpot_ms": _ms(_percentile(gaps, 0.95)) if gaps else None,
        "mean_ttft_ms": _ms(statistics.fmean(ttfts)) if ttfts else None,
        "p95_ttft_ms": _ms(_percentile(ttfts, 0.95)) if ttfts else None,
        "throughput_tok_s": round(sum(r.received for r in records) / window_s, 3) if window_s > 0 else None,
        "stalls": len(stalls) + len(first_stalls) + len(failed_waits),
        "total_stall_s": round(sum(stalls) + sum(first_stalls) + sum(failed_waits), 3),
        "token_stall_s": round(sum(stalls), 3),
        "first_token_stall_s": round(sum(first_stalls), 3),
        "failed_wait_s": round(sum(failed_waits), 3),
        "longest_gap_ms": _ms(gaps[-1]) if gaps else None,
    }


def compare(per_policy: dict[str, dict[str, Any]], goal: float = GOAL_SPEEDUP) -> dict[str, Any] | None:
    """Adaptive's mean per-token latency against the best static-like policy's (every other policy) in the
    same run: ``speedup`` > 1 means adaptive was faster. None without adaptive or anything to compare."""
    adaptive = per_policy.get(ADAPTIVE)
    others = {p: s for p, s in per_policy.items() if p != ADAPTIVE and s.get("mean_tpot_ms")}
    if not adaptive or not adaptive.get("mean_tpot_ms") or not others:
        return None
    best = min(sorted(others), key=lambda p: others[p]["mean_tpot_ms"])
    speedup = others[best]["mean_tpot_ms"] / adaptive["mean_tpot_ms"]
    return {
        "best_static": best,
        "best_static_mean_tpot_ms": others[best]["mean_tpot_ms"],
        "adaptive_mean_tpot_ms": adaptive["mean_tpot_ms"],
        "speedup_mean_tpot": round(speedup, 3),
        "goal": goal,
        "goal_met": speedup >= goal,
    }


class PlanWatcher:
    """Polls the deployment state and records every change of revision (an adopted reconfiguration):
    when, relative to the workload's start, and which plan it brought."""

    def __init__(self, t0_wall_s: float, interval_s: float = 0.5) -> None:
        self.t0 = t0_wall_s
        self.interval_s = interval_s
        self.changes: list[dict[str, Any]] = []
        self._stop = threading.Event()
        state = load_state()
        self._revision = None if state is None else state.revision
        self._thread = threading.Thread(target=self._run, name="mecsplit-plan-watch", daemon=True)

    def start(self) -> PlanWatcher:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def poll(self) -> None:
        try:
            state = load_state()
        except Exception:  # mid-write by another process: the next poll reads it
            return
        if state is not None and state.revision != self._revision:
            self._revision = state.revision
            self.changes.append({
                "t_s": round(time.time() - self.t0, 2),
                "revision": state.revision,
                "plan": [[s["node"], s["first"], s["end"]] for s in state.plan["stages"]],
            })  # fmt: skip

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.poll()


def _deployment_name() -> str:
    from flows.serve import DEPLOYMENT_NAME

    return f"reconfigure/{DEPLOYMENT_NAME}"


def _wait_for_served(policy: str, failover_only: bool, since: datetime, timeout_s: float = 180.0) -> None:
    """Until the served deployment carries this policy's parameters (a deployment left by the previous
    policy's serve has the same name, and events would otherwise run with its parameters)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            try:
                d = client.read_deployment_by_name(_deployment_name())
            except ObjectNotFound:
                d = None
            if (
                d is not None
                and d.parameters.get("policy") == policy
                and d.parameters.get("failover_only") == failover_only
                and d.updated is not None
                and d.updated >= since
            ):
                time.sleep(3.0)  # the runner's first poll
                return
            time.sleep(1.0)
    raise TimeoutError(f"the served reconfigure deployment did not come up within {timeout_s:.0f} s")


def _reconfigure_runs(states: list[Any]) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )

    from flows.serve import DEPLOYMENT_NAME

    with get_client(sync_client=True) as client:
        return list(
            client.read_flow_runs(
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[DEPLOYMENT_NAME])),
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=states))
                ),
            )
        )


def _drain_reconfigure_runs(timeout_s: float) -> list[str]:
    """Wait for a reconfiguration still running to finish (a run killed mid-deploy would hold the
    deployment's concurrency slot for the next policy). Returns the runs still running at the timeout."""
    from prefect.client.schemas.objects import StateType

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        running = _reconfigure_runs([StateType.RUNNING, StateType.PENDING])
        if not running:
            return []
        time.sleep(1.0)
    return [str(r.id) for r in _reconfigure_runs([StateType.RUNNING, StateType.PENDING])]


def _close_reconfigure_runs() -> int:
    """After the serve process is stopped: end every reconfigure run it left, so none holds the
    deployment's concurrency slot or runs later against the next policy's network."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelled

    left = _reconfigure_runs([StateType.RUNNING, StateType.PENDING, StateType.SCHEDULED])
    with get_client(sync_client=True) as client:
        for run in left:
            client.set_flow_run_state(
                run.id, Cancelled(message="the experiment's policy window ended"), force=True
            )
    return len(left)


def _timeline(scenario_path: Path) -> list[dict[str, Any]]:
    """The scenario's timeline events, for the plot: time and a short label."""
    items = []
    for e in load_scenario(scenario_path).events():
        what = getattr(e, "node", None) or getattr(e, "link", None) or ""
        items.append({"at_s": e.at_s, "kind": e.kind, "what": what})
    return items


def run_policy(
    scenario_path: Path, policy: str, backend: str, duration_s: float, out_dir: Path
) -> dict[str, Any]:
    log = get_run_logger()
    settings = get_settings()
    scenario = load_scenario(scenario_path)
    server = ensure_server(settings)
    serve = None
    sessions: list[ChatSession] = []
    watcher: PlanWatcher | None = None
    failover_only = policy != ADAPTIVE
    try:
        if backend == "testbed":
            from testbed.api import TestbedClient, start_daemon

            start_daemon(scenario_path, env=server.env(), progress=lambda m: log.info(f"testbed: {m}"))
        from flows.reconfigure import deploy_flow

        first = deploy_flow(scenario=str(scenario_path), backend=backend, policy=_deploy_policy(policy))
        log.info(f"{policy}: initial plan {first['plan']}")
        if backend == "testbed":
            # Without the testbed nothing replays the timeline, so no event would ever reach a served run.
            since = datetime.now(UTC)
            serve = serve_process(
                settings, server, scenario_path, log_name=f"serve-{policy}.log",
                policy=_deploy_policy(policy), failover_only=failover_only,
            )  # fmt: skip
            _wait_for_served(_deploy_policy(policy), failover_only, since)
            with TestbedClient() as client:
                client.replay_start()
        t0 = time.time()
        watcher = PlanWatcher(t0).start()
        w = scenario.workload
        sessions = [
            ChatSession(first["gateway_url"], w.max_new_tokens, first_prompt=i) for i in range(w.sessions)
        ]
        for s in sessions:
            s.start()
        time.sleep(duration_s)
        for s in sessions:
            s.stop()  # the request in flight finishes
        window_s = time.time() - t0
        still_running = _drain_reconfigure_runs(DRAIN_TIMEOUT_S) if serve is not None else []
        if still_running:
            log.warning(f"{policy}: reconfigure runs still running after the drain: {still_running}")
        watcher.stop()
        records = [r for s in sessions for r in s.records]
        stats = policy_stats(records, window_s)
        state = load_state()
        stats.update(
            policy=policy,
            deployed_policy=_deploy_policy(policy),
            failover_only=failover_only,
            window_s=round(window_s, 2),
            initial_plan=first["plan"],
            final_plan=None
            if state is None
            else [[st["node"], st["first"], st["end"]] for st in state.plan["stages"]],
            # Every adopted reconfiguration of the run, including one triggered in the window whose deploy
            # step finished during the drain (stopping a failed node's old segments can take 20 s).
            reconfigurations=len(watcher.changes),
            predicted_tpot_ms=_ms(first["predicted_tpot_s"]),
        )
        policy_dir = out_dir / policy
        policy_dir.mkdir(parents=True, exist_ok=True)
        results.write_samples(policy_dir / "samples.parquet", [x for s in sessions for x in s.samples])
        (policy_dir / "requests.json").write_text(
            json.dumps([{**vars(r), "lost": r.lost} for r in records], indent=1)
        )
        (policy_dir / "policy.json").write_text(
            json.dumps({"t0_wall_s": t0, "stats": stats, "plan_changes": watcher.changes}, indent=2)
        )
        log.info(f"{policy}: {json.dumps(stats)}")
        return stats
    finally:
        for s in sessions:
            s.stop()
        if watcher is not None:
            watcher.stop()
        stop_process(serve)
        if serve is not None:
            _close_reconfigure_runs()
        teardown(backend, scenario)  # type: ignore[arg-type]


@flow(name="experiment", log_prints=True)
def experiment(
    scenario: str,
    policies: list[str],
    backend: str = "auto",
    duration_s: float | None = None,
    results_root: str = "results",
) -> dict[str, Any]:
    """Run the scenario under each policy in turn and compare them in ``results/<run>/``."""
    scenario_path = Path(scenario)
    sc = load_scenario(scenario_path)
    prepare_model(sc.model, get_settings())
    chosen = choose_backend(backend)
    if chosen != "testbed":
        get_run_logger().warning(
            "local backend: no emulated network, so the scenario's timeline (traces, load, failures) is not "
            "replayed and no reconfiguration is served; the comparison shows placement effects only"
        )
    duration = duration_s if duration_s is not None else sc.duration_s
    out_dir = Path(results_root) / f"{time.strftime('%Y%m%d-%H%M%S')}-experiment-{sc.name}"
    out_dir.mkdir(parents=True)
    shutil.copy(scenario_path, out_dir / "scenario.yaml")
    (out_dir / "meta.json").write_text(json.dumps(results.meta(), indent=2))
    per_policy: dict[str, dict[str, Any]] = {}
    for p in policies:
        try:
            per_policy[p] = run_policy(scenario_path, p, chosen, duration, out_dir)
        except Exception as exc:  # one policy that cannot run (no feasible plan) is a finding, not the end
            get_run_logger().error(f"{p}: could not run: {type(exc).__name__}: {exc}")
            per_policy[p] = {"policy": p, "error": f"{type(exc).__name__}: {exc}"}
    return write_summary(out_dir, scenario_path, chosen, duration, per_policy)


def write_summary(
    out_dir: Path, scenario_path: Path, backend: str, duration_s: float, per_policy: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """summary.json, latency.png and bars.png of a run from its per-policy figures."""
    sc = load_scenario(scenario_path)
    summary: dict[str, Any] = {
        "scenario": sc.name,
        "backend": backend,
        "duration_s": duration_s,
        "scenario_duration_s": sc.duration_s,
        "timeline_replayed": backend == "testbed",
        "stall_definition": (
            f"a token gap (or TTFT) > {STALL_FACTOR:g} x the policy's median gap (median TTFT); "
            "total_stall_s sums the wait minus the median over stalls"
        ),
        "results_dir": str(out_dir),
        "policies": per_policy,
        "adaptive_vs_best_static": compare(per_policy),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    results.plot_policies(out_dir, _timeline(scenario_path) if backend == "testbed" else [])
    results.plot_policy_bars(out_dir, per_policy)
    return summary


def summarise_run(run_dir: Path) -> dict[str, Any]:
    """Recompute a finished run's figures from what it kept (``<policy>/requests.json`` and
    ``policy.json``) and rewrite its summary and plots: the same definitions as a fresh run."""
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        old = json.loads(summary_path.read_text())
    else:  # a run cut short: the policies that finished, in the order they ran
        done = sorted(run_dir.glob("*/policy.json"), key=lambda f: f.stat().st_mtime)
        windows = [json.loads(f.read_text())["stats"]["window_s"] for f in done]
        old = {"policies": {f.parent.name: {} for f in done}, "backend": "testbed",
               "duration_s": round(min(windows, default=0.0))}  # fmt: skip
    per_policy: dict[str, dict[str, Any]] = {}
    for name, previous in old["policies"].items():
        if "error" in previous:
            per_policy[name] = previous
            continue
        info = json.loads((run_dir / name / "policy.json").read_text())
        kept = {**info["stats"], "reconfigurations": len(info["plan_changes"])}
        raw = json.loads((run_dir / name / "requests.json").read_text())
        records = [
            RequestRecord(
                **{**{k: v for k, v in r.items() if k != "lost"}, "token_gaps_s": tuple(r["token_gaps_s"])}
            )
            for r in raw
        ]
        per_policy[name] = {**kept, **policy_stats(records, kept["window_s"])}
    return write_summary(run_dir, run_dir / "scenario.yaml", old["backend"], old["duration_s"], per_policy)
