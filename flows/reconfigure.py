"""The Prefect flows: profile, optimise, deploy and reconfigure (= profile -> optimise -> decide -> deploy).

Flows stay thin; each step is a task with retries and a timeout, calling into ``flows.pipeline``. The
deployment that a reconfiguration changes is read from the state file, so any flow run (a subprocess of
``mecsplit serve``) can pick it up.
"""

from __future__ import annotations

import math
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows import pipeline, report
from flows.calibrate import load_calibration
from flows.measure import stream_completion
from flows.runtime import Backend, LinkProbe, RuntimeFailure, backend_for
from flows.state import BackendName, DeploymentState, load_state, save_state
from mecsplit.settings import get_settings
from policies.calibration import Calibration
from policies.plan import Plan
from policies.problem import Problem
from testbed.scenario import Scenario, load_scenario

DEFAULT_SCENARIO = "scenarios/default.yaml"
STANDBY_BOOT_TIMEOUT_S = 180.0
MEASURE_PROMPT = "The three most important ideas in distributed systems are"


def _log(message: str) -> None:
    get_run_logger().info(message)


@task(name="profile-nodes", retries=1, retry_delay_seconds=2, timeout_seconds=900)
def profile_nodes_task(
    backend_name: BackendName,
    scenario_path: str,
    model: str,
    refresh: list[str],
    max_age_s: float | None = None,
    serving: DeploymentState | None = None,
) -> dict[str, dict[str, Any]]:
    scenario = load_scenario(Path(scenario_path))
    backend = backend_for(backend_name, scenario)
    settings = get_settings()
    age = settings.flows.profile_max_age_s if max_age_s is None else max_age_s
    alive = backend.alive_nodes()
    keep = []
    if serving is not None:  # the profiler runs in a node's container beside the deployment's processes
        manifest = pipeline.read_manifest(settings, model)
        keep = [n for n in alive if not pipeline.profiler_fits(scenario, n, manifest, serving)]
    return pipeline.profile_nodes(
        backend, alive, model, scenario.workload.prompt_tokens,
        max_age_s=age, refresh=refresh, keep=keep, progress=get_run_logger().info,
    )  # fmt: skip


@task(name="profile-links", retries=2, retry_delay_seconds=1, timeout_seconds=300)
def profile_links_task(
    backend_name: BackendName,
    scenario_path: str,
    alive: list[str],
    max_age_s: float = 0.0,
    known_bw_mbit: dict[str, float] | None = None,
    reprobe_nodes: list[str] | None = None,
) -> list[LinkProbe]:
    scenario = load_scenario(Path(scenario_path))
    return pipeline.profile_links(
        backend_for(backend_name, scenario), scenario, set(alive), progress=get_run_logger().info,
        max_age_s=max_age_s, known_bw_mbit=known_bw_mbit, reprobe_nodes=frozenset(reprobe_nodes or ()),
    )  # fmt: skip


SLO_FIELDS = ("max_ttft_s", "max_tpot_s", "min_throughput_tok_s")


@task(name="optimise", timeout_seconds=120)
def optimise_task(problem: Problem, policy: str) -> Plan:
    """The policy's plan; where no plan meets the service-level objectives, the best plan without them
    (serving slower beats not serving), said loudly. Memory and trust stay hard constraints."""
    plan = _solve_relaxing_slo(problem, policy)
    _log(f"{policy}: {plan.layout()} predicted tpot {plan.predicted.tpot_s * 1e3:.1f} ms")
    return plan


@task(name="optimise", timeout_seconds=120)
def replan_task(problem: Problem, policy: str) -> Plan | str:
    """``optimise_task`` on the nodes up now, or why no plan fits them (memory or trust binds: a node
    the model needs is down), which is no failure of the run: the deployment waits for a node to come
    back, whose event re-plans."""
    from policies import InfeasibleError

    try:
        return optimise_task.fn(problem, policy)
    except InfeasibleError as exc:
        return str(exc)


def _solve_relaxing_slo(problem: Problem, policy: str) -> Plan:
    from policies import InfeasibleError, solve

    try:
        return solve(problem, policy)
    except InfeasibleError as exc:
        constraints = problem.constraints
        if all(getattr(constraints, f) is None for f in SLO_FIELDS):
            raise
        relaxed = problem.model_copy(
            update={"constraints": constraints.model_copy(update=dict.fromkeys(SLO_FIELDS))}
        )
        plan = solve(relaxed, policy)  # still infeasible here: memory or trust binds, and that is raised
        get_run_logger().warning(f"SLO cannot be met ({exc}); serving the best plan without it")
        return plan


@task(name="decide", timeout_seconds=60)
def decide_task(problem: Problem, current: Plan | None, candidate: Plan, horizon_s: float) -> dict[str, Any]:
    if current is None:
        return {"adopt": True, "reason": "nothing deployed yet"}
    from policies.replan import decide

    p = get_settings().policies
    decision = decide(
        problem, current, candidate, horizon_s=horizon_s, switch_stall_s=p.replan_switch_stall_s,
        min_gain_ratio=p.replan_min_gain_ratio, hysteresis=p.replan_hysteresis,
    )  # fmt: skip
    return decision.model_dump(mode="json")


class StaleDecisionError(RuntimeError):
    """A decision taken on a deployment that has changed since (another run deployed meanwhile)."""


def _first_token_probe(gateway_url: str) -> float | None:
    """When the new chain serves: the first token a live session got from it, or, with no session
    running, the first token of a one-token completion right after the switch. None (and a warning)
    where it fails: the switch is done, and a broken chain is the next run's."""
    try:
        live = pipeline.first_live_token_at(gateway_url)
        return live if live is not None else pipeline.first_token_at(gateway_url, MEASURE_PROMPT)
    except Exception as exc:
        get_run_logger().warning(f"first-token probe on the new chain failed: {exc}")
        return None


@task(name="deploy", retries=0, timeout_seconds=900)
def deploy_task(
    backend_name: BackendName,
    scenario_path: str,
    model: str,
    plan: Plan,
    switch_mode: str,
    recompute_hops: int = 0,
    old_chain_broken: bool = False,
    expected_revision: int | None = None,
    switch_timeout_s: float | None = None,
) -> dict[str, Any]:
    """Deploy ``plan`` under the deployment lock. ``expected_revision``: the revision the decision was
    taken on; if another run has deployed since, the decision is stale and nothing is done.
    ``switch_timeout_s``: the sessions' move's budget (``pipeline.deploy``)."""
    backend: Backend = backend_for(backend_name, load_scenario(Path(scenario_path)))
    with pipeline.deploy_lock(get_settings()):
        current = load_state()
        if expected_revision is not None and (current is None or current.revision != expected_revision):
            raise StaleDecisionError(
                f"the deployment changed since the decision (revision {expected_revision} -> "
                f"{None if current is None else current.revision}); the controller decides again"
            )
        result = pipeline.deploy(
            backend,
            scenario_path,
            model,
            plan,
            current,
            switch_mode=switch_mode,
            recompute_hops=recompute_hops,
            old_chain_broken=old_chain_broken,
            progress=get_run_logger().info,
            probe=_first_token_probe,
            switch_timeout_s=switch_timeout_s,
        )
        save_state(result.state)
    return {
        "revision": result.state.revision,
        "started": [e.model_dump() for e in result.started],
        "stopped": [e.model_dump() for e in result.stopped],
        "standbys": [e.node for e in result.state.standbys],
        "claimed_standbys": list(result.claimed),
        "switch_s": result.switch_s,
        "switch_report": result.switch_report,
        "total_s": result.total_s,
        "ready_at_s": result.ready_at_s,
        "switched_at_s": result.switched_at_s,
        "first_token_at_s": result.first_token_at_s,
    }


@task(name="measure", retries=1, timeout_seconds=600)
def measure_task(gateway_url: str, tokens: int) -> dict[str, float] | None:
    """One streamed completion through the gateway; None (and a warning) where it fails: the
    reconfiguration itself is done, and a broken chain is the next run's to repair."""
    try:
        sample = stream_completion(gateway_url, MEASURE_PROMPT, tokens)
    except Exception as exc:
        get_run_logger().warning(f"measurement failed: {exc}")
        return None
    return {"ttft_s": sample.ttft_s, "tpot_s": sample.tpot_s, "throughput_tok_s": 1.0 / sample.tpot_s}


@task(name="check-chain", timeout_seconds=60)
def check_chain_task(gateway_url: str) -> tuple[bool, str]:
    healthy, detail = pipeline.chain_health(gateway_url)
    if not healthy:
        get_run_logger().warning(f"the deployed chain is broken: {detail}")
    return healthy, detail


def _chosen_switch(decision: dict[str, Any], switch_mode: str) -> tuple[str, int]:
    return pipeline.switch_of(decision) if switch_mode == "auto" else (switch_mode, 0)


def _epoch_s(value: Any) -> float | None:
    """A time as seconds since the epoch from a number or an ISO 8601 string (a templated event time);
    None where it is neither."""
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and value:
        try:
            return datetime.fromisoformat(value).timestamp()
        except ValueError:
            return None
    return None


def _run_started_s() -> float | None:
    """This flow run's start time as Prefect's server recorded it (None outside a flow run)."""
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return None
    try:
        with get_client(sync_client=True) as client:
            start = client.read_flow_run(ctx.flow_run.id).start_time
    except Exception:
        return None
    return None if start is None else start.timestamp()


def _reaction(
    stamps: dict[str, float | None], order: tuple[tuple[str, str], ...] = pipeline.FLOW_STAMPS
) -> dict[str, Any]:
    steps = pipeline.reaction_timing(stamps, order)
    return {"steps": steps, "stamps": {k: v for k, v in stamps.items() if v is not None}}


def _publish_reaction(reaction: dict[str, Any], reason: str) -> None:
    rows = [f"| {name.removesuffix('_s')} | {value:.3f} |" for name, value in reaction["steps"].items()
            if isinstance(value, float)]  # fmt: skip
    origin = reaction["steps"].get("end_to_end_from", "change")
    create_markdown_artifact(
        key="reaction",
        markdown="\n".join([f"# Reaction to `{reason}`", "", "| step | seconds |", "|---|---|", *rows, "",
                            f"End to end: from the {origin} to the first token on the new chain."]),
        description="time spent in each step, from the change to the new plan serving",
    )  # fmt: skip


def _adopts_by_replay(
    decision: dict[str, Any] | None, before: Plan | None, candidate: Plan, switch_mode: str
) -> bool:
    if decision is None or not decision["adopt"] or before is None or candidate.layout() == before.layout():
        return False
    return _chosen_switch(decision, switch_mode)[0] == "replay"


def _plan_of(state: DeploymentState | None) -> Plan | None:
    return None if state is None else Plan.model_validate(state.plan)


def _publish(
    scenario: Scenario, reason: str, resource: str | None, decision: dict[str, Any], before: Plan | None,
    after: Plan, measured: dict[str, float] | None, switch: dict[str, Any] | None = None,
) -> None:  # fmt: skip
    tiers = {n.name: n.tier for n in scenario.nodes}
    create_table_artifact(
        key="placement", table=report.placement_rows(after, tiers),
        description=f"Placement after `{reason}` ({after.policy})",
    )  # fmt: skip
    create_markdown_artifact(
        key="reconfiguration",
        markdown=report.metrics_markdown(
            reason=reason,
            resource=resource,
            decision=decision,
            before=before,
            after=after,
            measured=measured,
            switch=switch,
        ),
        description="reason, decision, predicted vs measured",
    )


@flow(name="reconfigure", log_prints=True, persist_result=True)
def reconfigure(
    scenario: str = DEFAULT_SCENARIO,
    reason: str = "manual",
    resource: str | None = None,
    bw_mbit: float | None = None,
    policy: str = "latency_dp",
    horizon_s: float = 60.0,
    switch_mode: str = "auto",
    measure_tokens: int = 8,
    failover_only: bool = False,
    event_occurred: str | float | None = None,
    trigger: dict[str, Any] | None = None,
    plan: dict[str, Any] | None = None,
    decision: dict[str, Any] | None = None,
    decided_at_s: float | None = None,
    decided_on_revision: int | None = None,
) -> dict[str, Any]:
    """Profile nodes and links, re-solve the placement, and redeploy only if the gain beats the cost.

    ``failover_only`` (what the experiments give static plans and baselines): re-plan only when the
    deployed chain is broken (a dead hop), with the same ``policy`` on the surviving nodes; otherwise keep
    the plan whatever the network does.

    ``switch_mode`` auto moves live sessions the way the decision priced cheaper: their KV pushed from
    the old segments to the new ones (``push``), or rebuilt from the token history (``replay``), which
    wins when the KV would have to cross a slow link.

    ``event_occurred`` and ``trigger`` (the triggering event's time and payload, filled in by the served
    deployment's triggers) time the reaction: the result's ``reaction`` has the seconds of each step,
    from the change the event reports (``changed_at_s`` in the payload) to the first token on the new
    chain.

    ``plan`` and ``decision`` (what ``mecsplit serve``'s controller chose, ``decided_at_s`` when): the
    decision is already taken on the calibrated model and the forecast, so the run deploys ``plan``
    (make-before-break) without profiling or solving again."""
    started = time.monotonic()
    body_started = time.time()
    current = load_state()
    if current is None:
        raise RuntimeError("nothing is deployed: run `mecsplit deploy --scenario F` (or the demo) first")
    if plan is not None:
        stamps = {"changed": _epoch_s((trigger or {}).get("changed_at_s")), "event": _epoch_s(event_occurred),
                  "decided": decided_at_s, "run_started": _run_started_s(), "body": body_started}  # fmt: skip
        chosen = Plan.model_validate(plan)
        return _deploy_decided(
            scenario,
            current,
            chosen,
            decision or {},
            reason,
            switch_mode,
            stamps,
            started,
            decided_on_revision,
        )
    if failover_only and check_chain_task(current.gateway_url)[0]:
        _log(f"reconfigure (failover only): {reason} {resource or ''}: the chain is healthy, plan kept")
        return _kept(current, reason, resource, "failover only and the deployed chain is healthy", started)
    sc = load_scenario(Path(scenario))
    _log(f"reconfigure: {reason} {resource or ''} {'' if bw_mbit is None else f'bw={bw_mbit} Mbit/s'}")
    # A node event invalidates that node's compute profile; a link event leaves compute profiles valid.
    refresh = [resource.removeprefix("mec.node.")] if resource and resource.startswith("mec.node.") else []
    profiles = profile_nodes_task(current.backend, scenario, current.model, refresh, serving=current)
    # A link event carries the rate the daemon just read back: that link takes it, the others keep a
    # recent probe. A node event re-probes that node's links only. A run without an event probes all.
    link_event = bool(resource and resource.startswith("mec.link.") and bw_mbit is not None)
    known = {resource.removeprefix("mec.link."): bw_mbit} if link_event else None  # type: ignore[union-attr]
    max_age_s = get_settings().flows.link_probe_max_age_s if link_event or refresh else 0.0
    probes = profile_links_task(current.backend, scenario, sorted(profiles), max_age_s, known, refresh)
    profiled = time.time()
    problem = pipeline.build_problem(
        sc, pipeline.model_facts(get_settings(), current.model, profiles), profiles, probes,
        testbed=current.backend == "testbed", calibration=load_calibration() or Calibration(),
    )  # fmt: skip
    candidate = replan_task(problem, policy)
    if isinstance(candidate, str):
        why = f"no plan fits the nodes up now ({candidate}): the deployment is kept until one comes back"
        get_run_logger().warning(why)
        return _kept(current, reason, resource, why, started)
    before = _plan_of(current)
    deployed: dict[str, Any] | None = None
    planned = None if failover_only else decide_task(problem, before, candidate, horizon_s)
    why = pipeline.misfit(sc, current, candidate) if planned is not None and planned["adopt"] else None
    if why is not None:
        planned = {**planned, "adopt": False, "reason": why}
    if _adopts_by_replay(planned, before, candidate, switch_mode):
        # Replay rebuilds every session from its token history, which a broken chain needs too: the
        # chain's health (a round trip over the degraded link, seconds when it is collapsed) changes
        # nothing here, so the reaction does not wait for it.
        healthy, detail = True, "not checked: the sessions are rebuilt by replay"
    else:
        healthy, detail = check_chain_task(current.gateway_url)
    if not healthy:
        # A dead hop holds KV that cannot be exported: rebuild every session by replaying its history.
        decision = {"adopt": True, "reason": f"the deployed chain is broken ({detail}): rebuilt by replay"}
        decided = time.time()
        # Retried: a switch tried just after a node died can be refused (its replacement not reachable
        # yet); with no further event nothing else would repair the chain.
        rebuild = deploy_task.with_options(retries=2, retry_delay_seconds=10)
        deployed = rebuild(
            current.backend, scenario, current.model, candidate, "replay", old_chain_broken=True
        )
    elif failover_only:
        decision = {"adopt": False, "reason": "failover only and the deployed chain is healthy"}
    else:
        assert planned is not None
        decision = planned
        if decision["adopt"] and before is not None and candidate.layout() != before.layout():
            mode, recompute = _chosen_switch(decision, switch_mode)
            decided = time.time()
            deployed = deploy_task(current.backend, scenario, current.model, candidate, mode, recompute)
    after = candidate if deployed is not None else before
    assert after is not None
    # Only a new chain is measured: a completion injected into a kept one would only slow its sessions.
    measured = measure_task(current.gateway_url, measure_tokens) if deployed and measure_tokens > 0 else None
    switch = None if deployed is None else deployed["switch_report"]
    _publish(sc, reason, resource, decision, before, after, measured, switch)
    reaction = None
    if deployed is not None:
        reaction = _reaction({
            "changed": _epoch_s((trigger or {}).get("changed_at_s")), "event": _epoch_s(event_occurred),
            "run_started": _run_started_s(), "body": body_started, "profiled": profiled,
            "decided": decided,
            "ready": deployed["ready_at_s"], "switched": deployed["switched_at_s"],
            "first_token": deployed["first_token_at_s"],
        })  # fmt: skip
        _publish_reaction(reaction, reason)
        _log(f"reaction: {reaction['steps']}")
    return {
        "reason": reason,
        "resource": resource,
        "adopted": deployed is not None,
        "decision": decision,
        "before": None if before is None else [list(x) for x in before.layout()],
        "after": [list(x) for x in after.layout()],
        "predicted_tpot_s": after.predicted.tpot_s,
        "measured": measured,
        "deploy": deployed,
        # The sessions' move: what the decision predicted (cost) against what the gateway measured.
        "session_move": None if switch is None else {"predicted": decision.get("cost"), "measured": switch},
        "reaction": reaction,
        "wall_s": time.monotonic() - started,
    }


def _kept(
    current: DeploymentState, reason: str, resource: str | None, why: str, started: float
) -> dict[str, Any]:
    """The result of a run that leaves the deployment as it is, saying ``why``."""
    kept = Plan.model_validate(current.plan)
    layout = [list(x) for x in kept.layout()]
    return {"reason": reason, "resource": resource, "adopted": False,
            "decision": {"adopt": False, "reason": why}, "before": layout, "after": layout,
            "predicted_tpot_s": kept.predicted.tpot_s, "measured": None, "deploy": None,
            "wall_s": time.monotonic() - started}  # fmt: skip


def switch_budget_s(decision: dict[str, Any]) -> float | None:
    """How long the sessions' move may take: the session-seconds the decision expects the move to gain.
    A switch that runs longer (its KV crossing a link that collapsed after the decision) costs more than
    the move was adopted for, by the decision's own terms: it is abandoned, the old chain stays, and the
    controller decides again on what the network is now. None (unbounded) for a move without a finite
    gain: one forced by an infeasible plan or a failure, which must happen whatever it costs."""
    gain = decision.get("gain_s")
    if isinstance(gain, int | float) and math.isfinite(gain) and gain > 0:
        return float(gain)
    return None


def _deploy_decided(
    scenario: str,
    current: DeploymentState,
    plan: Plan,
    decision: dict[str, Any],
    reason: str,
    switch_mode: str,
    stamps: dict[str, float | None],
    started: float,
    revision: int | None,
) -> dict[str, Any]:
    """The controller's decision carried out: deploy ``plan``, time the reaction, publish artifacts."""
    sc = load_scenario(Path(scenario))
    before = _plan_of(current)
    assert before is not None
    layout = [list(x) for x in plan.layout()]
    if plan.layout() == before.layout():
        return {"reason": reason, "adopted": False, "decision": decision, "before": layout, "after": layout,
                "predicted_tpot_s": plan.predicted.tpot_s, "measured": None, "deploy": None,
                "wall_s": time.monotonic() - started}  # fmt: skip
    mode, recompute = _chosen_switch(decision, switch_mode)
    _log(f"reconfigure ({reason}): deploying {layout}, decided by the controller: {decision.get('reason')}")
    deployed = deploy_task(
        current.backend, scenario, current.model, plan, mode, recompute, False, revision,
        switch_budget_s(decision),
    )  # fmt: skip
    switch = deployed["switch_report"]
    _publish(sc, reason, None, decision, before, plan, None, switch)
    reaction = _reaction(
        {**stamps, "ready": deployed["ready_at_s"], "switched": deployed["switched_at_s"],
         "first_token": deployed["first_token_at_s"]},
        order=pipeline.CONTROLLER_STAMPS,
    )  # fmt: skip
    _publish_reaction(reaction, reason)
    _log(f"reaction: {reaction['steps']}")
    return {
        "reason": reason, "resource": None, "adopted": True, "decision": decision,
        "before": [list(x) for x in before.layout()], "after": layout,
        "predicted_tpot_s": plan.predicted.tpot_s, "measured": None, "deploy": deployed,
        "session_move": None if switch is None else {"predicted": decision.get("cost"), "measured": switch},
        "reaction": reaction, "wall_s": time.monotonic() - started,
    }  # fmt: skip


@flow(name="deploy", log_prints=True)
def deploy_flow(
    scenario: str = DEFAULT_SCENARIO,
    backend: BackendName = "local",
    model: str | None = None,
    policy: str = "latency_dp",
    measure_tokens: int = 8,
    refresh_profiles: bool = True,
) -> dict[str, Any]:
    """First deployment: profile -> optimise -> deploy -> measure (no hysteresis: nothing runs yet).

    A first deployment measures every node (cached profiles may come from another testbed); with
    ``refresh_profiles`` off it takes the cached ones whatever their age (an experiment's later windows,
    which bring up the same testbed again)."""
    sc = load_scenario(Path(scenario))
    model = model or sc.model
    refresh = [n.name for n in sc.nodes] if refresh_profiles else []
    profiles = profile_nodes_task(backend, scenario, model, refresh, None if refresh_profiles else math.inf)
    probes = profile_links_task(backend, scenario, sorted(profiles))
    # Nothing learned yet: the full model with neutral coefficients (the workload's sessions queue, the
    # nodes' CPU quotas bound them), which live traffic then calibrates.
    problem = pipeline.build_problem(
        sc, pipeline.model_facts(get_settings(), model, profiles), profiles, probes,
        testbed=backend == "testbed", calibration=load_calibration() or Calibration(),
    )  # fmt: skip
    plan = optimise_task(problem, policy)
    deployed = deploy_task(backend, scenario, model, plan, "kv")
    state = load_state()
    assert state is not None
    # A first deployment is complete with its warm standbys booted: their boot takes CPU from the nodes'
    # serving segments, which is not the plan's pace (and the first reconfiguration needs them).
    for standby in state.standbys:
        try:
            pipeline.wait_ready(standby, state.secret, STANDBY_BOOT_TIMEOUT_S)
        except RuntimeFailure as exc:
            get_run_logger().warning(f"{exc}; serving without it")
    measured = measure_task(state.gateway_url, measure_tokens) if measure_tokens > 0 else None
    _publish(sc, "initial deployment", None, {"adopt": True, "reason": "first plan"}, None, plan, measured)
    return {"plan": [list(x) for x in plan.layout()], "deploy": deployed, "measured": measured,
            "gateway_url": state.gateway_url, "predicted_tpot_s": plan.predicted.tpot_s}  # fmt: skip
