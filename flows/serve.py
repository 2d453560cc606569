"""Serving the reconfiguration deployment: on a schedule, on testbed events, and by the controller.

``mecsplit serve`` registers the ``reconfigure`` flow as a deployment with an interval or cron schedule
and event triggers; the event's resource id and payload become the run's parameters. The deployment's
concurrency limit of one, with queued collisions, keeps two reconfigurations from ever running at once.

With the controller (``flows.controller``, the default for an adaptive policy) the serve process also
learns the cost model from live traffic and watches the network both ways: every network event (a link
degraded or recovered, a node overloaded, recovered or joined) and a periodic evaluation re-plan with
the calibrated model and the link forecast, and a run of the deployment starts only for a plan whose
expected gain clears its cost. Node failures keep their own trigger: a broken chain is rebuilt whatever
the forecast says. Without the controller every event starts a run that decides for itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.events import DeploymentEventTrigger

from mecsplit.settings import Settings, get_settings

DEPLOYMENT_NAME = "reconfigure"


@dataclass(frozen=True)
class TriggerSpec:
    event: str
    resource_pattern: str
    parameters: dict[str, str]


# Template values are rendered by Prefect from the matching event; numbers arrive as numbers.
TRIGGERS: tuple[TriggerSpec, ...] = (
    TriggerSpec(
        "mec.link.degraded",
        "mec.link.*",
        {
            "reason": "{{ event.event }}",
            "resource": "{{ event.resource.id }}",
            "bw_mbit": "{{ event.payload.bw_mbit }}",
        },
    ),
    TriggerSpec(
        "mec.node.overloaded",
        "mec.node.*",
        {"reason": "{{ event.event }}", "resource": "{{ event.resource.id }}"},
    ),
    TriggerSpec(
        "mec.node.failed",
        "mec.node.*",
        {"reason": "{{ event.event }}", "resource": "{{ event.resource.id }}"},
    ),
    TriggerSpec(
        "mec.link.recovered",
        "mec.link.*",
        {
            "reason": "{{ event.event }}",
            "resource": "{{ event.resource.id }}",
            "bw_mbit": "{{ event.payload.bw_mbit }}",
        },
    ),
    TriggerSpec(
        "mec.node.recovered",
        "mec.node.*",
        {"reason": "{{ event.event }}", "resource": "{{ event.resource.id }}"},
    ),
)
# Events the controller evaluates itself (both ways); failures stay with the deployment's trigger.
CONTROLLER_EVENTS = ("mec.link.degraded", "mec.link.recovered", "mec.node.overloaded", "mec.node.recovered")
FAILURE_EVENTS = ("mec.node.failed",)


# Every triggered run also gets the event's time and payload, which time its reaction (the payload of a
# link event names when the daemon changed the link).
EVENT_TIMING_PARAMETERS = {
    "event_occurred": "{{ event.occurred | string }}",
    "trigger": "{{ event.payload }}",
}


def build_triggers(
    scenario: str, events: tuple[str, ...] | None = None, *, repair_only: bool = False
) -> list[DeploymentEventTrigger]:
    """One trigger per event of ``events`` (all of ``TRIGGERS`` by default). ``repair_only``: the runs
    they start only rebuild a broken chain (``reconfigure``'s ``failover_only``)."""
    extra: dict[str, Any] = {"failover_only": True} if repair_only else {}
    return [
        DeploymentEventTrigger(
            name=f"on-{spec.event}",
            expect={spec.event},
            match={"prefect.resource.id": spec.resource_pattern},
            parameters={"scenario": scenario, **spec.parameters, **EVENT_TIMING_PARAMETERS, **extra},
        )
        for spec in TRIGGERS
        if events is None or spec.event in events
    ]


def deployment_options(
    scenario: str,
    *,
    interval_s: float | None = None,
    cron: str | None = None,
    policy: str = "latency_dp",
    failover_only: bool = False,
    controller: bool = False,
) -> dict[str, Any]:
    """What the served ``reconfigure`` deployment is: ``Runner.add_flow``'s keyword arguments. With the
    ``controller`` the deployment triggers on failures only, and only to rebuild a chain the failure
    broke: the controller, on the calibrated model, makes every other decision. A failure trigger that
    re-planned on its own profiled the nodes for 15-62 s (the one serving the whole model included)
    and deployed the uncalibrated model's choice: on V2X, rsu1's failure, which no serving plan used,
    replaced the car-alone plan the controller had chosen with car[0,29) -> mec[29,30)."""
    if interval_s is not None and cron is not None:
        raise ValueError("give either an interval or a cron schedule, not both")
    return {
        "name": DEPLOYMENT_NAME,
        "interval": interval_s,
        "cron": cron,
        # Triggered runs get these too: Prefect merges a trigger's parameters over the deployment's.
        "parameters": {
            "scenario": scenario,
            "reason": "schedule",
            "policy": policy,
            "failover_only": failover_only,
        },
        "triggers": build_triggers(scenario, FAILURE_EVENTS, repair_only=True)
        if controller
        else build_triggers(scenario),
        "concurrency_limit": ConcurrencyLimitConfig(
            limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE
        ),
        "description": "profile -> optimise -> accept if the gain beats the migration cost -> deploy",
        "tags": ["mecsplit"],
    }


def cancel_stale_runs() -> int:
    """Cancel reconfigure runs still waiting from an earlier `serve`: they answer events about a network
    that may no longer exist, and with the concurrency limit of one they would hold up the runs that the
    current network's events trigger. Returns how many were cancelled."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelled

    waiting = [StateType.SCHEDULED, StateType.PENDING]
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[DEPLOYMENT_NAME])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=waiting))
            ),
        )
        for run in runs:
            client.set_flow_run_state(run.id, Cancelled(message="stale: queued before this serve started"))
    return len(runs)


def own_temp_dir(settings: Settings) -> Path:
    """Point this process's temporary files (Prefect's runner storage among them) under MECSPLIT_HOME.
    Prefect's runner makes ``<tmp>/runner_storage/<uuid>``; in the shared /tmp that folder belongs to
    whichever user served first, and a second user's serve died on it with PermissionError."""
    import tempfile

    path = settings.home / "tmp"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    tempfile.tempdir = str(path)  # this process only: the processes it starts keep their own
    return path


def serve_forever(
    scenario: str,
    *,
    interval_s: float | None = None,
    cron: str | None = None,
    policy: str = "latency_dp",
    failover_only: bool = False,
    controller: bool = True,
) -> None:
    """Block serving the deployment; each flow run gets a process of its own, as Prefect does. The flow
    is added to the runner as a flow (``Runner.add_flow``), not loaded from storage, so with
    ``flows.warm_start_runs`` that process is a fork of one that has already imported it. With
    ``controller`` the controller runs beside the runner; with ``failover_only`` it only learns and
    measures the model on the plan (it never re-plans) and the deployment triggers on failures."""
    from prefect.runner import Runner

    from flows.reconfigure import reconfigure

    controlled = controller or failover_only
    options = deployment_options(
        scenario, interval_s=interval_s, cron=cron, policy=policy, failover_only=failover_only,
        controller=controlled,
    )  # fmt: skip
    cancelled = cancel_stale_runs()
    if cancelled:
        print(f"cancelled {cancelled} reconfigure runs left waiting by an earlier serve")
    if get_settings().flows.warm_start_runs:
        from flows import warm_start

        if warm_start.install(["flows.reconfigure"]):
            print("flow runs start as forks of a process with flows.reconfigure imported")
        else:
            print("this Prefect has no starter hook: each flow run starts a fresh interpreter")
    own_temp_dir(get_settings())
    # The runner's poll is the wait between a triggered run being created and being started.
    runner = Runner(name="mecsplit-serve", query_seconds=get_settings().flows.runner_poll_s)
    runner.add_flow(reconfigure, **options)
    events = FAILURE_EVENTS if controlled else tuple(spec.event for spec in TRIGGERS)
    print(f"serving {reconfigure.name}/{DEPLOYMENT_NAME} on " + ", ".join(events))
    with contextlib.suppress(KeyboardInterrupt):
        if failover_only:
            print("controller: learning from traffic and measuring the model on the plan, never re-planning")
            asyncio.run(_serve_with_controller(runner, scenario, policy, observe_only=True))
        elif controlled:
            print("controller: learning from traffic, evaluating on " + ", ".join(CONTROLLER_EVENTS)
                  + f" and every {get_settings().flows.evaluate_every_s:g} s")  # fmt: skip
            asyncio.run(_serve_with_controller(runner, scenario, policy))
        else:
            asyncio.run(runner.start())


async def _serve_with_controller(
    runner: Any, scenario: str, policy: str, *, observe_only: bool = False
) -> None:
    import anyio

    from flows.controller import Controller, ControllerConfig

    settings = get_settings()
    defaults = {"scenario": scenario, "policy": policy, "failover_only": False}
    starter = RunStarter(defaults)
    control = Controller(
        Path(scenario), ControllerConfig.from_settings(settings, policy, observe_only=observe_only),
        starter.start, starter.active,
    )  # fmt: skip
    starter.on_done = control.observe_run
    background = ThreadPoolExecutor(
        1,
        "mecsplit-controller",
        initializer=set_thread_nice,
        initargs=(min(19, starter.nice + CONTROLLER_NICE_STEP),),
    )
    wake = anyio.Event()

    def notify(reason: str, occurred_s: float | None, payload: dict[str, Any]) -> None:
        nonlocal wake
        control.notify(reason, occurred_s, payload)
        wake.set()

    async def ticks() -> None:
        nonlocal wake
        failure, repeated = "", 0  # the last failure, and how often it came again unprinted
        while True:
            with anyio.move_on_after(settings.flows.evaluate_every_s):
                await wake.wait()
            wake = anyio.Event()
            try:
                evaluation = await asyncio.wrap_future(background.submit(control.tick))
            except Exception as exc:  # one bad tick (a reading mid-write) must not stop the controller
                at = traceback.extract_tb(exc.__traceback__)[-1]
                where = f"{Path(at.filename).name}:{at.lineno} in {at.name}"
                message = f"{type(exc).__name__}: {exc} ({where})"
                # The same failure each tick (no plan fits while a node is down) is said once.
                if message == failure:
                    repeated += 1
                    continue
                _said_again(repeated)
                failure, repeated = message, 0
                print(f"controller: tick failed: {message}", flush=True)
                continue
            _said_again(repeated)
            failure, repeated = "", 0
            if evaluation is not None:
                verdict = "adopt" if evaluation.adopt else "keep"
                d = evaluation.decision
                served = ""
                if d.get("served_current") is not None:  # what the forecast valued (requests per session)
                    served = (f"; serves {d['served_candidate']:.1f} vs {d['served_current']:.1f} requests, "
                              f"present {d['lasting_s']:.0f} s of the horizon")  # fmt: skip
                if d.get("current"):  # and what the model predicts of each now
                    served += (f"; now {d['candidate']['tpot_s'] * 1e3:.0f} vs "
                               f"{d['current']['tpot_s'] * 1e3:.0f} ms a token")  # fmt: skip
                print(f"controller: {evaluation.reason}: {verdict} {evaluation.candidate} ({d.get('reason')}"
                      f"{served}; {evaluation.solve_s * 1e3:.0f} ms)", flush=True)  # fmt: skip

    async with anyio.create_task_group() as group:
        group.start_soon(runner.start)
        group.start_soon(ticks)
        group.start_soon(listen_for_events, notify)
        group.start_soon(tail_testbed_events, settings.run_dir / "events.jsonl", notify)


def _said_again(times: int) -> None:
    if times:
        print(f"controller: the failure above came again {times} times", flush=True)


async def tail_testbed_events(path: Path, notify: Any, every_s: float = 0.05) -> None:
    """The testbed daemon's own event log (it appends every event it emits), read as it grows: on this
    machine the quickest way an event reaches the controller (Prefect's event stream delivered them
    1.5 s or more after they occurred on the testbed). Events already there when serving starts are
    history, not news. A second delivery of an event through Prefect's stream only wakes a tick that
    finds nothing new."""
    import anyio

    offset = path.stat().st_size if path.exists() else 0
    while True:
        await anyio.sleep(every_s)
        try:
            size = path.stat().st_size
        except OSError:
            continue
        if size < offset:  # a new testbed started a new log
            offset = 0
        if size == offset:
            continue
        with path.open("rb") as handle:
            handle.seek(offset)
            chunk = handle.read(size - offset)
        complete = chunk.rfind(b"\n") + 1
        offset += complete
        for line in chunk[:complete].splitlines():
            with contextlib.suppress(ValueError, KeyError):
                event = json.loads(line)
                if event["event"] in CONTROLLER_EVENTS:
                    notify(event["event"], event.get("wall_time"), dict(event.get("payload") or {}))


async def listen_for_events(notify: Any) -> None:
    """Network events (both ways) from Prefect's event stream, to the controller as they arrive."""
    import anyio
    from prefect.events.clients import get_events_subscriber
    from prefect.events.filters import EventFilter, EventNameFilter

    flt = EventFilter(event=EventNameFilter(name=list(CONTROLLER_EVENTS)))
    while True:
        try:
            async with get_events_subscriber(filter=flt) as subscriber:
                async for event in subscriber:
                    notify(event.event, event.occurred.timestamp(), dict(event.payload))
        except Exception as exc:  # the server restarting: subscribe again (the periodic tick goes on)
            print(f"controller: event stream lost ({type(exc).__name__}); subscribing again", flush=True)
            await anyio.sleep(1.0)


# The controller's evaluations run below the serving processes' priority: on the testbed they share the
# host's cores with the emulated nodes, and each evaluation is a burst of 30-250 ms of CPU. At the same
# priority, V2X's adaptive windows that made no move gapped 8-10 % slower than the static windows, whose
# controller only learns and never evaluates. Nice steps above the serve process's own.
CONTROLLER_NICE_STEP = 10


def set_thread_nice(nice: int) -> None:
    """Set the calling thread's nice value (Linux schedules threads apart); where the process may not
    raise its priority back (not root), the thread keeps the one it has."""
    with contextlib.suppress(PermissionError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)


class RunStarter:
    """Runs the controller's reconfigurations: each one a ``reconfigure`` flow run executed right here,
    in a thread of the serve process, which has the flow imported and a Prefect client ready (a run of
    the served deployment would wait for the runner's poll and a process to start: 0.8 s measured of a
    reaction whose goal is 1.5 s). It shows in the Prefect UI as a run of the ``reconfigure`` flow tagged
    ``controller``; deploys of any origin take the deployment lock (``flows.pipeline.deploy_lock``), so
    one never overlaps a run the deployment's own triggers start."""

    def __init__(self, defaults: dict[str, Any]) -> None:
        self.defaults = defaults
        self._thread: threading.Thread | None = None
        # One Prefect client for every ``active()`` check: a new one builds an SSL context each time,
        # 90 ms of CPU measured (most of what a controller evaluation cost).
        self._client: Any = None
        self._client_lock = threading.Lock()
        self.on_done: Any = None  # called with each finished run's result (the controller learns from it)
        self.nice = os.getpriority(os.PRIO_PROCESS, 0)  # the serve process's own, from its main thread
        # Prefect's engine imports itself and sets up result storage at a process's first flow run (2 s
        # measured in a reaction): pay it now, not at the first reconfiguration.
        import prefect.flow_engine
        import prefect.task_engine  # noqa: F401

    def start(self, parameters: dict[str, Any]) -> str | None:
        if self.running():
            return None
        self._thread = threading.Thread(
            target=self._run,
            args=({**self.defaults, **parameters},),
            name="mecsplit-reconfigure",
            daemon=True,
        )
        self._thread.start()
        return self._thread.name

    def _run(self, parameters: dict[str, Any]) -> None:
        from prefect import tags

        from flows.reconfigure import reconfigure

        # Started from the controller's thread, this one inherited its low priority: a deploy is what
        # a reaction waits for.
        set_thread_nice(self.nice)
        try:
            with tags("controller"):
                result = reconfigure(**parameters)
        except Exception as exc:  # the run failed and says why in the UI; the controller goes on
            print(f"controller: reconfigure failed: {type(exc).__name__}: {exc}", flush=True)
            return
        if self.on_done is not None and isinstance(result, dict):
            self.on_done(result)

    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def active(self) -> bool:
        """A reconfiguration runs: this controller's, or a run of the deployment (scheduled, pending or
        running: a failure's rebuild)."""
        if self.running():
            return True
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import (
            DeploymentFilter,
            DeploymentFilterName,
            FlowRunFilter,
            FlowRunFilterState,
            FlowRunFilterStateType,
        )
        from prefect.client.schemas.objects import StateType

        waiting = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING]
        with self._client_lock:
            if self._client is None:
                self._client = get_client(sync_client=True).__enter__()
            try:
                runs = self._client.read_flow_runs(
                    deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[DEPLOYMENT_NAME])),
                    flow_run_filter=FlowRunFilter(
                        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=waiting))
                    ),
                    limit=1,
                )
            except Exception:  # the server away or restarted: the next check opens a new client
                self._client.__exit__(None, None, None)
                self._client = None
                raise
        return bool(runs)
