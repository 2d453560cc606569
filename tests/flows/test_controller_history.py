"""The controller's link history: what the network monitor reports becomes each link's past only while
both of the link's nodes are up (pure bookkeeping, a fake monitor)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from conftest import TINY_SCENARIO

from flows.controller import (
    MIN_LEARNED_STEPS,
    Controller,
    ControllerConfig,
    LoadLog,
    NetworkSample,
    _ready_s,
    _settled,
    _starting,
    _Watch,
)
from flows.state import DeploymentState, Endpoint, NodeStart
from mecsplit.settings import get_settings
from policies import Metrics, Plan, Stage


class _Monitor:
    def __init__(self) -> None:
        self.samples: list[NetworkSample] = []

    def sample(self) -> NetworkSample:
        return self.samples.pop(0)


def _controller(*, admission_control: bool = False) -> Controller:
    """A controller of the tiny scenario whose runs start nothing, over a monitor that reports nothing."""
    settings = get_settings()
    if admission_control:
        flows = settings.flows.model_copy(update={"admission_control": True})
        settings = settings.model_copy(update={"flows": flows})
    return Controller(
        TINY_SCENARIO, ControllerConfig.from_settings(settings, "latency_dp"), lambda _: "run", lambda: False,
        view=_Monitor(), settings=settings,
    )  # fmt: skip


def test_a_link_to_a_node_that_is_down_gathers_no_history(flows_home: Path) -> None:
    monitor = _Monitor()
    settings = get_settings()
    controller = Controller(
        TINY_SCENARIO, ControllerConfig.from_settings(settings, "latency_dp"), lambda _: "run", lambda: False,
        view=monitor, settings=settings,
    )  # fmt: skip
    state = cast(Any, SimpleNamespace(backend="testbed"))
    rates = {"device-edge": 20.0, "edge-cloud": 50.0}
    everyone = frozenset({"device", "edge", "cloud"})
    for t, alive in enumerate([everyone - {"cloud"}] * 3 + [everyone] * 2):
        monitor.samples.append(NetworkSample(at_s=float(t), rates_mbit=rates, loads={}, alive=alive))
        assert controller._network(state) is not None
    assert len(controller.history.series("device-edge", 0.0)[0]) == 5
    times, _ = controller.history.series("edge-cloud", 0.0)  # the nominal 50 while cloud was down: not kept
    assert list(times) == [3.0, 4.0]
    # Cloud came back at 3 s: the traffic is learned from again only SETTLE_S after that.
    assert controller._alive_changed_s == 3.0


def test_a_move_that_waited_for_the_model_to_learn_is_decided_again_once_it_has(flows_home: Path) -> None:
    controller = _controller()
    rates = {"device-edge": 20.0, "edge-cloud": 50.0}
    everyone = frozenset({"device", "edge", "cloud"})
    net = NetworkSample(at_s=0.0, rates_mbit=rates, loads={}, alive=everyone)
    state = cast(Any, SimpleNamespace(backend="testbed", revision=3))
    problem = cast(Any, None)  # no prediction is watched: the problem is not read
    # A link recovered, the move back was wanted, and it waited: the plan serving was not learned yet.
    controller._watch = _Watch(dict(rates), {}, everyone, 3, (), deferred=True)
    assert controller._changed(state, net, problem) is None
    step = {"positions": 1, "idle_s": 0.001, "total_s": 0.01, "stages": [], "at_s": 0.0}
    serving = cast(Any, SimpleNamespace(revision=3, segments=()))
    controller.predictions.add_records(serving, (step,) * MIN_LEARNED_STEPS)
    assert "learned" in str(controller._changed(state, net, problem))
    controller._watch.deferred = False  # the evaluation that follows replaces the watch
    assert controller._changed(state, net, problem) is None


def test_a_refused_move_is_weighed_again_each_time_the_network_it_answered_doubles_its_age(
    flows_home: Path,
) -> None:
    """The forecast values a state by how long it has lasted: a move refused one second into a load is
    decided again as the load stays (at 4, 8, 16 ... s of it, up to twice the forecast's window), and
    not at all when the last evaluation kept the best plan there is."""
    controller = _controller()
    everyone = frozenset({"device", "edge", "cloud"})

    def aged(at_s: float) -> str | None:
        return controller._aged(NetworkSample(at_s=at_s, rates_mbit={}, loads={}, alive=everyone))

    # The load came at 100 s; the move it asked for was refused at 101 s.
    controller._watch = _Watch({}, {"edge": 0.8}, everyone, 3, (), at_s=101.0, since_s=100.0, refused=True)
    assert aged(103.0) is None and aged(104.0) == "unchanged for 4 s"
    controller._watch.at_s = 104.0  # refused again: the next look at twice the age
    assert aged(107.0) is None and aged(108.0) is not None
    controller._watch.at_s = 200.0
    assert aged(400.0) is None  # past twice the window the forecast no longer changes
    controller._watch = _Watch({}, {"edge": 0.8}, everyone, 3, (), at_s=101.0, since_s=100.0)
    assert aged(104.0) is None


def test_a_move_is_priced_at_each_nodes_last_start_scaled_by_its_load() -> None:
    """A node with a standby loads a stage; one without starts a server, as long as its last start took
    scaled by the CPU its load leaves now against then, or the setting where it never started one; only
    nodes without a standby count as starting."""
    settings = get_settings()
    f = settings.flows
    starts = {
        "edge": NodeStart(took_s=30.0, ended_at_s=100.0),
        "cloud": NodeStart(took_s=3.0, ended_at_s=50.0),
        "mec": NodeStart(took_s=20.0, ended_at_s=190.0),
        "pole": NodeStart(took_s=29.0, ended_at_s=10.0, load=0.0),  # before the controller ran
    }
    state = DeploymentState(
        scenario="s.yaml", model="m", backend="local", revision=1, plan={}, segments=(), gateway_url="",
        gateway_handle="", secret="", updated_at_s=0.0, starts=starts,
        standbys=(Endpoint(node="cloud", first=1, end=2, host="127.0.0.1", port=9, handle="pid:1"),),
    )  # fmt: skip
    loads = LoadLog()
    for t in range(60, 110, 2):  # edge idle while it started; none sampled while mec started
        loads.add(float(t), {"edge": 0.0})
    everyone = frozenset({"device", "edge", "cloud", "mec", "pole"})
    now_loads = {"edge": 0.6, "mec": 0.5, "pole": 0.6}
    net = NetworkSample(at_s=200.0, rates_mbit={}, loads=now_loads, alive=everyone)
    want = {"device": f.cold_start_s, "edge": 75.0, "cloud": f.standby_load_s, "mec": 20.0, "pole": 72.5}
    assert _ready_s(state, net, settings, loads) == pytest.approx(want)
    assert _starting(state, net) == {"device", "edge", "mec", "pole"}


def test_a_plan_that_lost_a_node_is_left_to_the_deployments_failover(flows_home: Path) -> None:
    """The chain's own trigger rebuilds it: the controller decides nothing and starts no run."""
    settings = get_settings()
    started: list[Any] = []
    controller = Controller(
        TINY_SCENARIO, ControllerConfig.from_settings(settings, "latency_dp"), started.append, lambda: False,
        view=_Monitor(), settings=settings,
    )  # fmt: skip
    metrics = Metrics(ttft_s=1.0, tpot_s=0.1, throughput_tok_s=10.0, privacy_exposure=0.0, bottleneck_s=0.1,
                      request_latency_s=1.0)  # fmt: skip
    stages = (Stage(node="device", first=0, end=2), Stage(node="edge", first=2, end=4))
    plan = Plan(stages=stages, policy="latency_dp", predicted=metrics, objective_value=1.0).model_dump()
    state = cast(Any, SimpleNamespace(backend="testbed", revision=3, plan=plan))
    net = NetworkSample(
        at_s=0.0, rates_mbit={"device-edge": 20.0}, loads={}, alive=frozenset({"device", "cloud"})
    )
    # It does not get as far as pricing plans (which would value a move off the broken chain).
    controller._problem = lambda *_: pytest.fail("the controller priced plans on a chain that lost a node")  # type: ignore[method-assign]
    assert controller._evaluate(state, net, "nodes up or down", {}) is None
    assert not started and not controller.evaluations


def test_the_plans_served_before_are_weighed_as_ways_back_while_they_fit(flows_home: Path) -> None:
    """After a change ends, the solver's best plan for today's network is not always the plan that
    served before it: that plan is a candidate of its own, the latest served first, unless it no longer
    fits (a node it used is gone)."""
    from test_calibrate import _problem

    from policies import solve
    from policies.forecast import persistent

    controller = _controller()
    problem = _problem(testbed=True)
    fc = persistent({f"{lk.a}-{lk.b}": lk.bw_mbit for lk in problem.links})
    current = solve(problem, "latency_dp")
    best = controller._candidates(problem, fc, current, set())
    before = best[0].model_copy(
        update={"stages": [Stage(node="device", first=0, end=2), Stage(node="cloud", first=2, end=8)]}
    )
    older = best[0].model_copy(
        update={"stages": [Stage(node="device", first=0, end=1), Stage(node="edge", first=1, end=8)]}
    )
    assert all(p.layout() not in (before.layout(), older.layout()) for p in best)
    controller._served = {older.layout(): older, before.layout(): before, current.layout(): current}
    assert [p.layout() for p in controller._candidates(problem, fc, current, set())] == [
        *(p.layout() for p in best),
        before.layout(),
        older.layout(),
    ]
    without_cloud = problem.model_copy(
        update={
            "nodes": [n for n in problem.nodes if n.name != "cloud"],
            "links": [lk for lk in problem.links if "cloud" not in (lk.a, lk.b)],
        }
    )
    layouts = [
        p.layout()
        for p in controller._candidates(without_cloud, persistent({"device-edge": 20.0}), current, set())
    ]
    assert before.layout() not in layouts and older.layout() in layouts


def test_a_step_that_began_before_the_network_settled_teaches_nothing() -> None:
    """A step answered after the settling time but begun before it (it waited through a node's outage)
    is not the plan's pace: only steps begun after it are learned."""
    records = [
        {"at_s": 131.0, "total_s": 36.0},  # in flight from 95 s, answered once the route came back
        {"at_s": 131.2, "total_s": 0.2},
        {"at_s": 124.0, "total_s": 0.1},
    ]
    assert _settled(records, 125.0) == (records[1],)


def test_the_controller_keeps_the_gateways_admission_limit_at_what_the_plan_holds(flows_home: Path) -> None:
    """The limit is the plan's sessions within the SLO (policies.capacity), sent when it changes; a
    gateway that refuses it leaves the controller up, and the limit is sent again on the next tick."""
    import httpx
    from test_calibrate import _problem

    from policies import solve
    from policies.capacity import sessions_within_slo

    controller = _controller()
    problem = _problem(testbed=True)
    plan = solve(problem, "latency_dp")
    slo = problem.model_copy(update={"constraints": problem.constraints.model_copy(
        update={"max_tpot_s": 3 * plan.predicted.tpot_s})})  # fmt: skip
    sent: list[Any] = []
    answers = [500, 200, 200]

    def gateway(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        return httpx.Response(answers.pop(0), json={})

    controller._http = httpx.Client(transport=httpx.MockTransport(gateway))
    state = cast(Any, SimpleNamespace(plan=plan.model_dump(mode="json"), gateway_url="http://gw"))
    want = sessions_within_slo(slo, plan.stages)
    assert 1 < want < 256
    controller._admit(state, slo)  # refused: nothing is remembered
    controller._admit(state, slo)
    controller._admit(state, slo)  # unchanged: not sent again
    assert sent == [{"max_live_sessions": want}] * 2


def test_the_admission_limit_comes_down_to_what_the_served_requests_measured(flows_home: Path) -> None:
    """Requests whose p95 gap passed the TPOT bound bring the limit below the model's, for the plan they
    were measured on; a new plan starts from the model's limit again."""
    import httpx
    from test_calibrate import _problem

    from policies import solve
    from policies.capacity import MIN_SERVED, sessions_within_slo

    controller = _controller(admission_control=True)
    problem = _problem(testbed=True)
    plan = solve(problem, "latency_dp")
    bound_s = 3 * plan.predicted.tpot_s
    slo = problem.model_copy(update={"constraints": problem.constraints.model_copy(
        update={"max_tpot_s": bound_s})})  # fmt: skip
    sent: list[Any] = []

    def gateway(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content)["max_live_sessions"])
        return httpx.Response(200, json={})

    controller._http = httpx.Client(transport=httpx.MockTransport(gateway))
    model = sessions_within_slo(slo, plan.stages)
    live = float(model)
    served = [
        {"n": i + 1, "ended_at_s": 0.0, "ttft_s": 0.1, "tpot_s": 2 * bound_s, "live": live}
        for i in range(MIN_SERVED)
    ]
    state = cast(Any, SimpleNamespace(plan=plan.model_dump(mode="json"), gateway_url="http://gw", revision=1))
    controller._admit(state, slo)
    controller._keep_recent(1, served)
    controller._admit(state, slo)
    controller._admit(state, slo)  # measured once: the next measure needs as many requests again
    moved = cast(Any, SimpleNamespace(**{**vars(state), "revision": 2}))
    controller._admit(moved, slo)
    assert sent == [model, max(1, int(live / 2)), model]
