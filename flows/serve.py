"""Serving the reconfiguration deployment: on a schedule and on testbed events.

``mecsplit serve`` registers the ``reconfigure`` flow as a deployment with an interval or cron schedule
and one trigger per testbed event (``mec.link.degraded``, ``mec.node.overloaded``, ``mec.node.failed``);
the event's resource id and payload become the run's parameters. The deployment's concurrency limit of
one, with queued collisions, keeps two reconfigurations from ever running at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.events import DeploymentEventTrigger

from mecsplit.settings import get_settings

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
)


# Every triggered run also gets the event's time and payload, which time its reaction (the payload of a
# link event names when the daemon changed the link).
EVENT_TIMING_PARAMETERS = {
    "event_occurred": "{{ event.occurred | string }}",
    "trigger": "{{ event.payload }}",
}


def build_triggers(scenario: str) -> list[DeploymentEventTrigger]:
    return [
        DeploymentEventTrigger(
            name=f"on-{spec.event}",
            expect={spec.event},
            match={"prefect.resource.id": spec.resource_pattern},
            parameters={"scenario": scenario, **spec.parameters, **EVENT_TIMING_PARAMETERS},
        )
        for spec in TRIGGERS
    ]


def deployment_options(
    scenario: str,
    *,
    interval_s: float | None = None,
    cron: str | None = None,
    policy: str = "latency_dp",
    failover_only: bool = False,
) -> dict[str, Any]:
    """What the served ``reconfigure`` deployment is: ``Runner.add_flow``'s keyword arguments."""
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
        "triggers": build_triggers(scenario),
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


def serve_forever(
    scenario: str,
    *,
    interval_s: float | None = None,
    cron: str | None = None,
    policy: str = "latency_dp",
    failover_only: bool = False,
) -> None:
    """Block serving the deployment; each flow run gets a process of its own, as Prefect does. The flow
    is added to the runner as a flow (``Runner.add_flow``), not loaded from storage, so with
    ``flows.warm_start_runs`` that process is a fork of one that has already imported it."""
    from prefect.runner import Runner

    from flows.reconfigure import reconfigure

    options = deployment_options(
        scenario, interval_s=interval_s, cron=cron, policy=policy, failover_only=failover_only
    )
    cancelled = cancel_stale_runs()
    if cancelled:
        print(f"cancelled {cancelled} reconfigure runs left waiting by an earlier serve")
    if get_settings().flows.warm_start_runs:
        from flows import warm_start

        if warm_start.install(["flows.reconfigure"]):
            print("flow runs start as forks of a process with flows.reconfigure imported")
        else:
            print("this Prefect has no starter hook: each flow run starts a fresh interpreter")
    # The runner's poll is the wait between a triggered run being created and being started.
    runner = Runner(name="mecsplit-serve", query_seconds=get_settings().flows.runner_poll_s)
    runner.add_flow(reconfigure, **options)
    print(f"serving {reconfigure.name}/{DEPLOYMENT_NAME} on " + ", ".join(spec.event for spec in TRIGGERS))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(runner.start())
