"""The reconfiguration controller inside ``mecsplit serve``: learn, watch both ways, re-plan when it pays.

Every ``evaluate_every_s`` (and at once on every network event, either way: a link degraded or
recovered, a node overloaded, recovered or joined) the controller

1. reads the gateway's step telemetry since its last read and updates the calibration
   (``flows.calibrate``; saved for the flow runs);
2. reads the network monitor (the testbed daemon's ``/monitor``: each link's rate, each node's
   background load and how much of its CPU quota is used; on the local backend the declared rates) into
   each link's history: passive, no probe;
3. records how the plan serving now is doing against what was predicted for it (``predictions.json``);
4. when something changed (an event, a link rate or load that moved, the calibration drifting), or the
   network has stayed as it was for twice as long as at the last evaluation (the forecast weighs a state
   by how long it has lasted), builds
   the problem from the cached profiles, the monitored network and the calibration, solves it and
   decides with the forecast (``policies.replan.decide``): a better plan is adopted only if its gain
   while the present network lasts clears the cost of moving to it;
5. only then starts a ``reconfigure`` flow run (in the serve process: ``flows.serve.RunStarter``) with
   the chosen plan and the decision as parameters (visible in the Prefect UI), and waits for it before
   deciding again; the run's measured switch teaches the model what a switch costs.

With nothing changing, a tick is two small local HTTP reads and no solve, no flow run (``bench
controller`` measures its CPU). Node failures stay with the deployment's own trigger (a broken chain is
rebuilt by replay whatever the forecast says).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import httpx

from flows import pipeline
from flows.calibrate import LinkHistory, Snapshot, learn, load_calibration, save_calibration
from flows.measure import admin_headers
from flows.predictions import CHANGE_RATIO, DecisionRecord, PredictionLog, decisions_path, record_move
from flows.runtime import LinkProbe, local_link_overrides
from flows.state import DeploymentState, load_state
from mecsplit.files import append_jsonl
from mecsplit.settings import Settings, get_settings
from policies.calibration import Calibration, observe_switch
from policies.capacity import Served
from policies.forecast import WINDOW_S, Forecast, forecast
from policies.plan import Plan
from policies.problem import MAX_LOAD, Problem
from policies.routes import links_used
from testbed.scenario import Scenario, load_scenario

if TYPE_CHECKING:
    from policies.replan import Decision

# A plan's prediction that moved by less than this is not a change whatever its ratio: a step's timing
# on a shared host varies by about a millisecond (a 6 ms tiny-model step read 15-20 % apart, quiet).
CHANGE_FLOOR_S = 0.002
# After a deployment changes, its transients (the switch, the old servers stopping, new standbys
# importing torch on the nodes' CPU shares) are not the plan's pace: for this long nothing is learned
# from the traffic and nothing measured against the plan's prediction.
SETTLE_S = 10.0
# A plan is left for a better one (other than for a broken constraint) only after the model has learned
# from this many of its decode steps: until then the calibration describes another plan.
MIN_LEARNED_STEPS = 20
# A network unchanged since the last evaluation is evaluated again once it has lasted this long, then
# each time its age doubles (``Controller._aged``).
AGED_FLOOR_S = 4.0
# Plans served before that each evaluation also weighs as a way back, the latest first: each is one
# more valuation.
SERVED_CANDIDATES = 3


@dataclass(frozen=True)
class NetworkSample:
    """The monitor's view now: link id -> rate (Mbit/s), node -> background load (fraction), alive."""

    at_s: float
    rates_mbit: dict[str, float]
    loads: dict[str, float]
    alive: frozenset[str]
    changed_at_s: dict[str, float] = field(default_factory=dict)  # when each link was last changed
    busy: dict[str, float] = field(default_factory=dict)  # share of each node's CPU quota in use, all in


class NetworkView(Protocol):
    def sample(self) -> NetworkSample: ...


class TestbedView:
    """The testbed daemon's monitor: the rate set on each link now (its shaping; for a link shaped per
    direction, the slower one) and each node's background load."""

    __test__ = False

    def __init__(self) -> None:
        from testbed.api import TestbedClient

        self.client = TestbedClient(timeout_s=10.0)

    def sample(self) -> NetworkSample:
        seen = self.client.monitor()
        rates = {link: float(row["bw_mbit"]) for link, row in seen["links"].items()}
        changed = {
            link: float(row["changed_at_s"]) for link, row in seen["links"].items() if row["changed_at_s"]
        }
        loads = {node: float(row["load_pct"]) / 100.0 for node, row in seen["nodes"].items()}
        alive = frozenset(node for node, row in seen["nodes"].items() if row["up"])
        busy = {
            node: row["busy_pct"] / 100.0
            for node, row in seen["nodes"].items()
            if row.get("busy_pct") is not None
        }
        return NetworkSample(time.time(), rates, loads, alive, changed, busy)


class LocalView:
    """The local backend has no shaping: the declared rates (and the demo's overrides)."""

    def __init__(self, scenario: Scenario, settings: Settings) -> None:
        self.scenario = scenario
        self.settings = settings

    def sample(self) -> NetworkSample:
        overrides = local_link_overrides(self.settings)
        rates = {
            lk.id: overrides.get("-".join(sorted((lk.a, lk.b))), lk.bw_mbit) for lk in self.scenario.links
        }
        alive = frozenset(n.name for n in self.scenario.nodes if n.joins_at_s is None)
        return NetworkSample(time.time(), rates, {}, alive)


@dataclass(frozen=True)
class ControllerConfig:
    evaluate_every_s: float
    horizon_s: float
    min_gain_ratio: float
    hysteresis: float
    policy: str = "latency_dp"
    # Learn and record predicted against measured, never re-plan (a static plan's serve: the model is
    # measured on every policy's plans, only the adaptive one acts on it).
    observe_only: bool = False

    @classmethod
    def from_settings(
        cls, settings: Settings, policy: str, *, observe_only: bool = False
    ) -> ControllerConfig:
        p = settings.policies
        return cls(
            evaluate_every_s=settings.flows.evaluate_every_s, horizon_s=p.replan_horizon_s,
            min_gain_ratio=p.replan_min_gain_ratio, hysteresis=p.replan_hysteresis,
            policy=policy, observe_only=observe_only,
        )  # fmt: skip


@dataclass
class Evaluation:
    """One evaluation that solved and decided (kept for the record and the tests)."""

    at_s: float
    reason: str
    plan: list[list[Any]]
    candidate: list[list[Any]]
    adopt: bool
    decision: dict[str, Any]
    solve_s: float


@dataclass
class _Watch:
    """What the last evaluation saw, to tell whether anything changed since."""

    rates: dict[str, float] = field(default_factory=dict)
    loads: dict[str, float] = field(default_factory=dict)
    alive: frozenset[str] = frozenset()
    revision: int = -1
    # The plan serving and the best candidate, with what the model predicted per token for each then.
    predicted_s: tuple[tuple[Plan, float], ...] = ()
    # A move was wanted but waited for the model to learn the plan serving: decide again once it has.
    deferred: bool = False
    at_s: float = 0.0  # when it evaluated (the monitor's clock)
    refused: bool = False  # its best candidate was another plan, and not adopted
    since_s: float = 0.0  # since when the network it saw had been as it was (its last change)


StartRun = Callable[[dict[str, Any]], str | None]


class Controller:
    """See the module docstring. ``start_run(parameters)`` starts a reconfigure flow run and returns its
    id; ``run_active()`` says whether one is still running (the controller never starts a second)."""

    def __init__(
        self,
        scenario_path: Path,
        config: ControllerConfig,
        start_run: StartRun,
        run_active: Callable[[], bool],
        *,
        view: NetworkView | None = None,
        settings: Settings | None = None,
    ) -> None:
        self.scenario_path = scenario_path
        self.scenario = load_scenario(scenario_path)
        self.config = config
        self.start_run = start_run
        self.run_active = run_active
        self.settings = settings or get_settings()
        self._view = view
        self.history = LinkHistory()
        self.loads = LoadLog()
        self.calibration = load_calibration(self.settings) or Calibration()
        self.evaluations: list[Evaluation] = []
        self._seq = 0
        self._last_snapshot: Snapshot | None = None
        self._gateway: str | None = None
        self._http = httpx.Client(timeout=5.0, headers=admin_headers())
        self._watch = _Watch()
        # Nodes up, and when that last changed: a node failing or coming back is a transient like a new
        # deployment (steps held in a dead node's buffers, recoveries), and for ``SETTLE_S`` after it the
        # traffic teaches nothing; nor does a step that began before it (``_settled``).
        self._alive: frozenset[str] | None = None
        self._alive_changed_s = 0.0
        self._base: tuple[tuple[Any, ...], Problem | None] | None = None
        self._pending: list[str] = []
        self._changes: list[dict[str, Any]] = []  # every event since the last tick (predictions.close)
        self._event: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.predictions = PredictionLog(self.settings.run_dir / "predictions.json")
        self.decisions = DecisionRecord(decisions_path(self.settings), self.scenario.name)
        self.stats = TickStats()
        self.runs_started = 0
        # Links some deployed plan of this controller has carried traffic over (the rest are untried).
        self._carried: set[str] = set()
        # Plans this controller has deployed, the latest last: their own measure is known, unlike a new
        # plan's, and each is a way back the rule weighs (``_candidates``).
        self._served: dict[tuple[tuple[str, int, int], ...], Plan] = {}
        self._limit: tuple[str, int] | None = None  # the admission limit the gateway has (its URL, limit)
        # Requests the gateway served since the last measured limit, and that limit (for the revision it
        # was measured on): ``policies.capacity.measured_limit``.
        self._recent: list[Served] = []
        self._recent_seq = 0
        self._recent_revision = -1
        self._measured: tuple[int, int] | None = None  # (revision, limit)

    # ------------------------------------------------------------------------------------------ entry
    def notify(
        self, reason: str, occurred_s: float | None = None, payload: dict[str, Any] | None = None
    ) -> None:
        """An event arrived: the next tick re-solves whatever else changed (thread-safe). Its time and
        payload go to the run a decision starts, which times its reaction from them."""
        with self._lock:
            self._pending.append(reason)
            self._event = {"event_occurred": occurred_s, "trigger": payload or {}}
            self._changes.append(self._event)

    def tick(self) -> Evaluation | None:
        """One evaluation round; returns the evaluation when it solved and decided. Its CPU time (this
        thread's) is added up in ``stats`` and written to ``controller.json`` (``bench controller``)."""
        started = time.thread_time()
        try:
            return self._tick()
        finally:
            self.stats.add(time.thread_time() - started)
            self.stats.flush(
                self.settings.run_dir / "controller.json", len(self.evaluations), self.runs_started
            )

    def _tick(self) -> Evaluation | None:
        state = load_state(self.settings)
        if state is None:
            return None
        with self._lock:
            reasons, self._pending = self._pending, []
            event, self._event = self._event, {}
            changes, self._changes = self._changes, []
        for change in changes:
            trigger = change.get("trigger") or {}
            self.predictions.close(
                state.revision, _changed_at(change), trigger.get("link"), trigger.get("bw_mbit")
            )
        net = self._network(state)
        problem = None if net is None else self._problem(state, net)
        if net is None or problem is None:
            self._requeue(reasons, event)
            return None
        # An event is answered first and the traffic since the last tick learned after: the decision
        # waits for neither, and a couple of seconds of steps change the calibration little.
        if not reasons or self.config.observe_only:
            self._observe(state, problem, net)
        if self.config.observe_only:
            return None
        try:
            changed = self._changed(state, net, problem)
            aged = None if reasons or changed else self._aged(net)
            if not reasons and changed is None and aged is None:
                return None
            if not event and net.changed_at_s:  # found by this tick: the reaction is timed from the change
                event = {"trigger": {"changed_at_s": max(net.changed_at_s.values())}}
            if self.run_active():
                self._requeue(reasons, event)  # decided once the run in flight is done
                return None
            reason = ", ".join(reasons) or changed or aged or "tick"
            return self._evaluate(state, net, reason, event, aged=aged is not None)
        finally:
            if reasons:
                self._observe(state, problem, net)

    def _observe(self, state: DeploymentState, problem: Problem, net: NetworkSample) -> None:
        self._learn(state, problem, net)
        self.predictions.measure(state, self.calibration, problem, net.rates_mbit)
        self.decisions.add(self.predictions.rows.values())
        if self.settings.flows.admission_control:
            self._admit(state, problem.model_copy(update={"calibration": self.calibration}))

    def _admit(self, state: DeploymentState, problem: Problem) -> None:
        """Keep the gateway's admission limit at what the plan serving holds within the SLO now: the
        model's limit, or less where the requests served show a p95 beyond a bound (``measured_limit``:
        measured again after every ``MIN_SERVED`` requests, and afresh on each new plan)."""
        from policies.capacity import measured_limit, sessions_within_slo

        plan = Plan.model_validate(state.plan)
        limit = sessions_within_slo(problem, plan.stages)
        bounds = problem.constraints
        measured = measured_limit(self._recent, bounds.max_ttft_s, bounds.max_tpot_s)
        if measured is not None:
            self._measured, self._recent = (state.revision, measured), []
        if self._measured is not None and self._measured[0] == state.revision:
            limit = min(limit, self._measured[1])
        if (state.gateway_url, limit) == self._limit:
            return
        try:
            url = f"{state.gateway_url}/admin/limits"
            self._http.post(url, json={"max_live_sessions": limit}).raise_for_status()
        except httpx.HTTPError as exc:
            print(f"controller: the gateway did not take the admission limit {limit}: {exc}", flush=True)
            return
        self._limit = (state.gateway_url, limit)
        how = "measured p95" if measured is not None and limit == measured else "the plan's SLO and memory"
        print(f"controller: admitting at most {limit} sessions at once ({how})", flush=True)

    def _requeue(self, reasons: list[str], event: dict[str, Any]) -> None:
        with self._lock:
            self._pending = reasons + self._pending
            self._event = self._event or event

    def observe_run(self, result: dict[str, Any]) -> None:
        """A reconfigure run it started has ended: learn the switch's measured stall (thread-safe: the
        next tick saves it)."""
        switch = (result.get("deploy") or {}).get("switch_report") or {}
        cost = (result.get("decision") or {}).get("cost") or {}
        if "stall_s" in switch:
            with self._lock:
                self.calibration = observe_switch(
                    self.calibration, stall_s=float(switch["stall_s"]), kv_s=float(cost.get("kv_s", 0.0))
                )

    def close(self) -> None:
        self._http.close()

    # ------------------------------------------------------------------------------------------ steps
    def view(self, backend: str) -> NetworkView:
        if self._view is None:
            self._view = TestbedView() if backend == "testbed" else LocalView(self.scenario, self.settings)
        return self._view

    def _network(self, state: DeploymentState) -> NetworkSample | None:
        try:
            net = self.view(state.backend).sample()
        except Exception:  # the monitor is away (testbed restarting): nothing to decide on
            return None
        self.loads.add(net.at_s, net.loads)
        if self._alive is not None and net.alive != self._alive:
            self._alive_changed_s = net.at_s
        self._alive = net.alive
        ends = {lk.id: (lk.a, lk.b) for lk in self.scenario.links}
        for link, rate in net.rates_mbit.items():
            # A link to a node that is down carries nothing: its shaped rate is no history of it (a node
            # joining later would otherwise bring what its link was shaped to meanwhile as its past).
            if all(n in net.alive for n in ends.get(link, ())):
                self.history.add(link, net.at_s, rate)
        return net

    def _problem(self, state: DeploymentState, net: NetworkSample) -> Problem | None:
        """The problem as the network is now, priced with the calibration. Its uncalibrated part is
        rebuilt only when its inputs change (the cached profiles and probes, the rates, loads and nodes
        up): a tick with nothing new must cost next to nothing."""
        if state.scenario and Path(state.scenario).resolve() != self.scenario_path.resolve():
            return None  # another scenario's deployment: not ours to steer
        inputs = (
            state.backend, state.model, _mtime(self._profiles_path(state)), _mtime(self._links_path(state)),
            tuple(sorted(net.rates_mbit.items())), tuple(sorted(net.loads.items())), net.alive,
        )  # fmt: skip
        if self._base is None or self._base[0] != inputs:
            self._base = (inputs, self._build(state, net))
        base = self._base[1]
        return None if base is None else base.model_copy(update={"calibration": self.calibration})

    def _profiles_path(self, state: DeploymentState) -> Path:
        prompt = self.scenario.workload.prompt_tokens
        return self.settings.run_dir / f"profiles-{state.backend}-{state.model}-{prompt}.json"

    def _links_path(self, state: DeploymentState) -> Path:
        return self.settings.run_dir / f"links-{state.backend}.json"

    def _build(self, state: DeploymentState, net: NetworkSample) -> Problem | None:
        profiles = _read_json(self._profiles_path(state))
        alive = {n: p for n, p in profiles.items() if n in net.alive}
        if not alive:
            return None
        rtt = {key: float(v["rtt_ms"]) for key, v in _read_json(self._links_path(state)).items()}
        probes = [
            LinkProbe(
                lk.a,
                lk.b,
                max(0.01, net.rates_mbit.get(lk.id, lk.bw_mbit)),
                rtt.get(lk.id, 2 * lk.delay_ms),
                True,
            )
            for lk in self.scenario.links
            if lk.a in alive and lk.b in alive
        ]
        facts = pipeline.model_facts(self.settings, state.model, alive)
        return pipeline.build_problem(
            self.scenario, facts, alive, probes, testbed=state.backend == "testbed", loads=net.loads
        )

    def _learn(self, state: DeploymentState, problem: Problem, net: NetworkSample) -> None:
        if self._gateway != state.gateway_url:
            self._gateway, self._seq, self._last_snapshot = state.gateway_url, 0, None
            self._recent_seq = 0
        try:
            params = {"since": self._seq, "served_since": self._recent_seq}
            data = self._http.get(f"{state.gateway_url}/admin/telemetry", params=params).json()
        except (httpx.HTTPError, ValueError):
            return
        snap = Snapshot.from_json(data)
        self._seq = snap.seq
        self._keep_recent(state.revision, data.get("served") or [])
        if self.settings.flows.keep_telemetry:
            append_jsonl(self.settings.run_dir / "telemetry.jsonl", {**data, "revision": state.revision})
        fresh = _settled(snap.records, max(state.updated_at_s, self._alive_changed_s) + SETTLE_S)
        if fresh:
            batch = [
                s for s in (self._last_snapshot, dataclasses.replace(snap, records=fresh)) if s is not None
            ]
            hop_nodes = {f"{e.host}:{e.port}": e.node for e in state.segments}
            with self._lock:  # a finished run's switch may be learned meanwhile (observe_run)
                self.calibration = learn(self.calibration, problem, hop_nodes, batch, self._rate_at, net.busy)
            save_calibration(self.calibration, self.settings)
            self.predictions.add_records(state, fresh)
        self._last_snapshot = dataclasses.replace(snap, records=())  # its counters, for the next batch

    def _keep_recent(self, revision: int, served: list[dict[str, Any]]) -> None:
        """Keep the requests served on the plan serving, for the admission limit (only when it is kept)."""
        self._recent_seq = max([self._recent_seq, *(int(r["n"]) for r in served)])
        if not self.settings.flows.admission_control:
            return
        if revision != self._recent_revision:
            self._recent, self._recent_revision = [], revision
        self._recent += [Served.from_json(r) for r in served]

    def _rate_at(self, a: str, b: str, t_s: float) -> float | None:
        return self.history.rate_at(f"{a}-{b}", t_s) or self.history.rate_at(f"{b}-{a}", t_s)

    def _changed(self, state: DeploymentState, net: NetworkSample, problem: Problem) -> str | None:
        """What moved since the last evaluation beyond ``CHANGE_RATIO``; None if nothing did. The
        calibration drifting counts by what it does to the prediction of the plan serving and of the last
        evaluation's best candidate, beyond the least gain a move must show (``min_gain_ratio``, the
        model's accuracy bound: a drift inside it is noise by the model's own standard) and by more
        than ``CHANGE_FLOOR_S``. The coefficients alone move with every noisy step: watched one by one,
        they asked for an evaluation every other tick on the testbed."""
        w = self._watch
        if state.revision != w.revision:
            return "new deployment"
        if net.alive != w.alive:
            return "nodes up or down"
        if w.deferred and self.predictions.learned_steps(state.revision) >= MIN_LEARNED_STEPS:
            return "learned the plan serving: the move that waited for it"
        for link, rate in net.rates_mbit.items():
            if _moved(w.rates.get(link), rate):
                return f"link {link} {w.rates.get(link, 0):.3g} -> {rate:.3g} Mbit/s"
        for node, load in net.loads.items():
            if abs(load - w.loads.get(node, 0.0)) > CHANGE_RATIO:
                return f"node {node} load {load:.0%}"
        drift = self.config.min_gain_ratio
        for plan, before_s in w.predicted_s:
            now_s = _tpot_s(problem, plan)
            if now_s is not None and abs(now_s - before_s) > max(drift * before_s, CHANGE_FLOOR_S):
                return f"model: {plan.layout()} predicted {before_s * 1e3:.1f} -> {now_s * 1e3:.1f} ms/token"
        return None

    def _aged(self, net: NetworkSample) -> str | None:
        """The network as the last evaluation saw it, for twice as long as it had been then (from
        ``AGED_FLOOR_S``, up to twice the forecast's window), when that evaluation refused a move. The
        forecast values a state by how long it has lasted: a move refused as answering a passing change
        is weighed again while the change stays, a handful of times per change."""
        w = self._watch
        age = net.at_s - w.since_s
        if not w.refused or age > 2 * WINDOW_S or age < max(AGED_FLOOR_S, 2 * (w.at_s - w.since_s)):
            return None
        return f"unchanged for {age:.0f} s"

    def _candidates(self, problem: Problem, fc: Forecast, current: Plan, cold: set[str]) -> list[Plan]:
        """The best plan at today's rates and, when the links have a history, the best at their
        typical rates over it (a plan robust to a link that keeps dipping is not the best while it is
        up), each also keeping the layers of the ``cold`` nodes it would start a process on
        (``policies.replan.keeping``), and the plans served before ``current`` that still fit
        (``SERVED_CANDIDATES``, the latest first); the rule then values each against the whole forecast.

        The solver's best plan answers today's network only. Right after a change ends (a load, a dip)
        the forecast still holds it, and the best plan for today's network alone is often not the one
        that served before it: on industrial, after the MEC server's 40 s load, the best plan for the
        unloaded server put all its layers there, which the forecast's loaded half priced below the
        cloud plan, while the plan that had served before the load, 35 % faster than the cloud plan
        and still warm, was never weighed."""
        from policies import InfeasibleError, solve
        from policies.analytic import violations
        from policies.replan import keeping

        typical = fc.typical_mbit()
        now = {f"{lk.a}-{lk.b}": lk.bw_mbit for lk in problem.links}
        if not any(_moved(now.get(link), rate) for link, rate in typical.items()):
            typical = {}  # the links are as they typically are: the same plan
        plans = []
        for rates in (None, typical or None):
            p = problem if rates is None else _with_rates(problem, rates)
            try:
                plans.append(solve(p, self.config.policy))
            except InfeasibleError:
                if rates is None:
                    plans.append(solve(_without_slo(p), self.config.policy))
        kept = (keeping(problem, plan, current, cold) for plan in plans)
        plans.extend(plan for plan in kept if plan is not None)
        served = [
            p for p in reversed(self._served.values())
            if p.layout() != current.layout() and not violations(problem, p.stages)
        ]  # fmt: skip
        plans.extend(served[:SERVED_CANDIDATES])
        unique = {plan.layout(): plan for plan in reversed(plans)}
        return list(reversed(unique.values()))

    def _judged(self, problem: Problem, fc: Forecast, plan: Plan) -> tuple[Problem, Forecast]:
        """The problem and forecast ``plan`` is valued against: a plan over links no deployed plan has
        carried yet meets them at the low end of their recent range (``Forecast.pessimistic``). On the
        V2X scenario every move onto an untried LTE link was predicted 22-45 % too fast and moved back."""
        untried = links_used(problem, [s.node for s in plan.stages]) - self._carried
        if not untried:
            return problem, fc
        judged = fc.pessimistic(untried)
        return _with_rates(problem, judged.now_mbit()), judged

    def _evaluate(
        self,
        state: DeploymentState,
        net: NetworkSample,
        reason: str,
        event: dict[str, Any],
        aged: bool = False,
    ) -> Evaluation | None:
        from policies.replan import decide, error_bar

        started = time.perf_counter()
        current = Plan.model_validate(state.plan)
        if any(s.node not in net.alive for s in current.stages):
            # The deployment's own trigger rebuilds a chain that lost a node (replay): a second run
            # started here raced it, and on V2X the two stalled the session for a minute.
            return None
        problem = self._problem(state, net)
        if problem is None:
            return None
        since = net.at_s - 120
        fc = forecast(
            {link: self.history.series(link, since) for link in self.history.links()}, net.rates_mbit,
            net.at_s, request_s=_request_s(problem, current),
            load_history={node: self.loads.series(node, since) for node in net.loads}, now_load=net.loads,
        )  # fmt: skip
        rule = {
            "switch_stall_s": self.calibration.switch_stall_s,
            "hysteresis": self.config.hysteresis,
            "ready_s": _ready_s(state, net, self.settings, self.loads), "holdings": _holdings(problem, state),
            "reaction_s": self.settings.policies.replan_reaction_s, "starting": _starting(state, net),
        }  # fmt: skip
        self._carried |= links_used(problem, [s.node for s in current.stages])
        self._served.pop(current.layout(), None)
        self._served[current.layout()] = current
        bar = error_bar(self.decisions.ratios(), self.config.min_gain_ratio)
        decisions = []
        for plan in self._candidates(problem, fc, current, _starting(state, net)):
            judged, judged_fc = self._judged(problem, fc, plan)
            # A plan served before is no bet on the model's record of new plans: moving back to it (off a
            # new plan that disappoints) is held only by the configured least gain.
            least = self.config.min_gain_ratio if plan.layout() in self._served else bar
            decided = decide(
                judged, current, plan, self.config.horizon_s, forecast=judged_fc, min_gain_ratio=least, **rule
            )
            decisions.append((_held_by_memory(decided, self.scenario, state, plan), plan))
        # The adopted candidate gaining most; none adopted: the other plan that came closest, for the
        # record (the plan serving only when there is no other).
        decision, candidate = max(
            decisions, key=lambda d: (d[0].adopt, d[1].layout() != current.layout(), d[0].gain_s)
        )
        plans = {p.layout(): p for p in (current, candidate)}.values()
        predicted = ((p, _tpot_s(problem, p)) for p in plans)
        self._watch = _Watch(
            dict(net.rates_mbit), dict(net.loads), net.alive, state.revision,
            tuple((p, t) for p, t in predicted if t), at_s=net.at_s,
            refused=not decision.adopt and candidate.layout() != current.layout(),
            since_s=self._watch.since_s if aged else net.at_s,
        )  # fmt: skip
        evaluation = Evaluation(
            at_s=time.time(), reason=reason, plan=[list(x) for x in current.layout()],
            candidate=[list(x) for x in candidate.layout()], adopt=decision.adopt,
            decision={
                **decision.model_dump(mode="json"), "forecast": fc.to_dict(),
                "min_gain_ratio": bar, "moves_recorded": len(self.decisions.ratios()),
            },
            solve_s=time.perf_counter() - started,
        )  # fmt: skip
        self.evaluations.append(evaluation)
        del self.evaluations[:-200]
        learned = self.predictions.learned_steps(state.revision)
        if decision.adopt and decision.current is not None and learned < MIN_LEARNED_STEPS:
            self._watch.deferred = True
            evaluation.adopt = False
            evaluation.decision = {**evaluation.decision, "adopt": False,
                                   "reason": f"still learning ({learned} of {MIN_LEARNED_STEPS} steps); "
                                   + str(decision.reason)}  # fmt: skip
        elif decision.adopt and candidate.layout() != current.layout():
            self.predictions.expect(
                candidate, decision.candidate.tpot_s, "decision", state.revision + 1, _assumed_mbit(fc)
            )
            self.predictions.close_for_move(state.revision, evaluation.at_s)
            record_move(self.settings, _move_row(evaluation, decision, self.config.horizon_s))
            prepared = _prepare_switch(self._http, state, candidate, evaluation.decision)
            evaluation.decision["prepared"] = prepared
            self.runs_started += 1
            self.start_run({
                "reason": f"controller: {reason}", "plan": candidate.model_dump(mode="json"),
                "decision": evaluation.decision, "decided_at_s": evaluation.at_s,
                "decided_on_revision": state.revision,
                "event_occurred": event.get("event_occurred"), "trigger": event.get("trigger") or {},
            })  # fmt: skip
        return evaluation


def _settled(records: Sequence[dict[str, Any]], settled_s: float) -> tuple[dict[str, Any], ...]:
    """The traced steps that began after ``settled_s`` (a step's ``at_s`` is when its result arrived,
    ``total_s`` after it began). A step that began before a node failed and was answered once the node
    came back waited through the outage: on industrial the steps in flight on the cloud plan, whose route
    crosses the MEC server, came back 16 s after the server did (TCP's retransmission backoff), were
    learned as the plan's pace, and its prediction jumped from 167-192 to 1,036-2,039 ms a token."""
    return tuple(r for r in records if r["at_s"] - r.get("total_s", 0.0) >= settled_s)


def _prepare_switch(
    http: httpx.Client, state: DeploymentState, plan: Plan, decision: dict[str, Any]
) -> bool | str:
    """Let the gateway prefill the sessions on the new chain while the run that deploys ``plan`` starts
    (where that chain is known before the deploy: ``pipeline.foreseen_chain``). Returns whether it
    prepares, or why it could not: the run then switches without, as before."""
    chain = pipeline.foreseen_chain(state, pipeline.plan_layout(plan))
    if chain is None or not get_settings().flows.prepare_switch:
        return False
    mode, recompute = pipeline.switch_of(decision)
    try:
        url = state.gateway_url
        return pipeline.prepare_gateway_chain(http, url, chain, mode=mode, recompute_hops=recompute)
    except httpx.HTTPError as exc:
        return f"prepare failed: {exc}"


def _held_by_memory(decision: Decision, scenario: Scenario, state: DeploymentState, plan: Plan) -> Decision:
    """``decision``, not adopted where a node's memory cannot hold the move while it happens."""
    why = pipeline.misfit(scenario, state, plan) if decision.adopt else None
    return decision if why is None else decision.model_copy(update={"adopt": False, "reason": why})


def _assumed_mbit(fc: Forecast) -> dict[str, tuple[float, float]]:
    """Per link, the rates a decision's prediction allowed for: today's and its forecast's p10-p90."""
    return {link: (min(o.now_mbit, o.p10_mbit), max(o.now_mbit, o.p90_mbit)) for link, o in fc.links.items()}


def _changed_at(event: dict[str, Any]) -> float:
    """When the change an event reports happened: the daemon's stamp of the change, else the event's
    time, else now."""
    stamp = (event.get("trigger") or {}).get("changed_at_s") or event.get("event_occurred")
    return float(stamp) if stamp else time.time()


def _move_row(evaluation: Evaluation, decision: Decision, horizon_s: float) -> dict[str, Any]:
    """What an adopted move promised: requests per session over the horizon on each plan (an experiment
    checks it against a static window of the same timeline, ``flows.experiment.audit_moves``)."""
    return {
        "decided_at_s": round(evaluation.at_s, 3), "from": evaluation.plan, "to": evaluation.candidate,
        "horizon_s": horizon_s, "served_current": decision.served_current,
        "served_candidate": decision.served_candidate, "cost_s": decision.cost.total_s,
        "reason": decision.reason,
    }  # fmt: skip


def _moved(old: float | None, new: float) -> bool:
    if old is None:
        return True
    if old <= 0 or new <= 0:
        return old != new
    return abs(math.log(new / old)) > math.log1p(CHANGE_RATIO)


def _request_s(problem: Problem, plan: Plan) -> float:
    """How long a request of the workload takes on ``plan`` now (0 if it cannot run there)."""
    from policies.analytic import predict

    try:
        request_s = predict(problem, plan.stages).request_latency_s
    except (KeyError, ValueError):
        return 0.0
    return request_s if math.isfinite(request_s) else 0.0


def _tpot_s(problem: Problem, plan: Plan) -> float | None:
    """The calibrated model's time per token of ``plan`` on ``problem``; None if it cannot run there."""
    from policies.analytic import predict

    try:
        return predict(problem, plan.stages).tpot_s
    except (KeyError, ValueError):
        return None


def _with_rates(problem: Problem, rates_mbit: dict[str, float]) -> Problem:
    links = tuple(
        lk.model_copy(update={"bw_mbit": max(0.01, rates_mbit.get(f"{lk.a}-{lk.b}", lk.bw_mbit))})
        for lk in problem.links
    )
    return problem.model_copy(update={"links": links})


def _without_slo(problem: Problem) -> Problem:
    c = problem.constraints.model_copy(
        update={"max_ttft_s": None, "max_tpot_s": None, "min_throughput_tok_s": None}
    )
    return problem.model_copy(update={"constraints": c})


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def _ready_s(
    state: DeploymentState, net: NetworkSample, settings: Settings, loads: LoadLog | None = None
) -> dict[str, float]:
    """Seconds until each node serves a new stage: a standby loads it (``standby_load_s``), otherwise a
    server starts (``_start_s``)."""
    f, warm = settings.flows, _warm(state)
    return {
        n: f.standby_load_s if n in warm else _start_s(state, net, n, f.cold_start_s, loads)
        for n in net.alive
    }


def _start_s(
    state: DeploymentState, net: NetworkSample, node: str, default_s: float, loads: LoadLog | None
) -> float:
    """How long a server start on ``node`` takes now: its last start's time, scaled by the CPU its
    background load leaves now against what it left then (a start is CPU-bound); ``default_s`` where it
    has not started one. The load then: the controller's samples over the start, else what the deploy
    read as it began (the initial deploy runs before the controller), else today's. Smart city's pole
    started its stage in 29 s unloaded and in 57-61 s under 60 % load (priced: 29 / 0.4 = 72 s); priced
    at the 29 s, the move was adopted and lost its window."""
    last = state.starts.get(node)
    if last is None:
        return default_s
    now = min(MAX_LOAD, net.loads.get(node, 0.0))
    seen = loads.mean(node, last.ended_at_s - last.took_s, last.ended_at_s) if loads is not None else None
    then = seen if seen is not None else last.load if last.load is not None else now
    return last.took_s * (1.0 - min(MAX_LOAD, then)) / (1.0 - now)


class LoadLog:
    """Each node's background load as the controller sampled it, over the last ``keep_s``."""

    def __init__(self, keep_s: float = 900.0) -> None:
        self.keep_s = keep_s
        self._samples: deque[tuple[float, dict[str, float]]] = deque()

    def add(self, at_s: float, loads: dict[str, float]) -> None:
        self._samples.append((at_s, dict(loads)))
        while self._samples and self._samples[0][0] < at_s - self.keep_s:
            self._samples.popleft()

    def series(self, node: str, since_s: float) -> tuple[list[float], list[float]]:
        """The node's ``(times, loads)`` since ``since_s``, oldest first (a node missing from a sample
        had no load then)."""
        kept = [(at_s, loads.get(node, 0.0)) for at_s, loads in self._samples if at_s >= since_s]
        return [t for t, _ in kept], [x for _, x in kept]

    def mean(self, node: str, start_s: float, end_s: float) -> float | None:
        """The node's mean load over [start_s, end_s]; None where no sample falls in it."""
        seen = [loads.get(node, 0.0) for at_s, loads in self._samples if start_s <= at_s <= end_s]
        return sum(seen) / len(seen) if seen else None


def _warm(state: DeploymentState) -> set[str]:
    return {e.node for e in state.standbys}


def _starting(state: DeploymentState, net: NetworkSample) -> set[str]:
    """Nodes where a new stage would start a process: no standby waits there."""
    return set(net.alive) - _warm(state)


def _holdings(problem: Problem, state: DeploymentState) -> dict[str, frozenset[int]]:
    """The layers each node's store holds. Every backend here serves the one prepared store to every
    node (the testbed mounts it into each node's containers), so every node holds every layer: a move
    loads layers, it fetches none."""
    every = frozenset(range(problem.num_layers))
    return {n.name: every for n in problem.nodes}


@dataclass
class TickStats:
    """The controller's own cost: ticks and the CPU time they took (the ticking thread's)."""

    started_s: float = field(default_factory=time.time)
    ticks: int = 0
    cpu_s: float = 0.0
    _flushed_s: float = 0.0

    def add(self, cpu_s: float) -> None:
        self.ticks += 1
        self.cpu_s += cpu_s

    def flush(self, path: Path, evaluations: int, runs: int, every_s: float = 10.0) -> None:
        now = time.time()
        if now - self._flushed_s < every_s:
            return
        self._flushed_s = now
        row = {"since_s": self.started_s, "at_s": now, "ticks": self.ticks, "cpu_s": round(self.cpu_s, 4),
               "evaluations": evaluations, "runs_started": runs}  # fmt: skip
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".controller-", suffix=".json")
        with os.fdopen(fd, "w") as handle:
            json.dump(row, handle)
        os.replace(tmp, path)
