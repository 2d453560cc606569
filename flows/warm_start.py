"""Starting served flow runs from a process that has already imported them.

Prefect's runner starts every flow run of a served deployment in a freshly spawned interpreter, which
imports Prefect, the flow's module and what that needs before the run can begin: about 2.2 s here
(``python -X importtime -c 'import flows.reconfigure'``), nearly half of the 5 s a reaction to a network
change may take. A fork server (multiprocessing's ``forkserver`` start method) imports those modules once,
when ``mecsplit serve`` starts; each run is then a fork of it. The run still gets a process of its own
(a crash or a kill ends that run only) that the runner tracks, cancels and kills by PID as before.

Prefect's runner looks the starter function up as ``prefect.runner._starter_direct.run_flow_in_subprocess``
and documents that patching it is how to override it; ``install`` does that. On a Prefect without that
hook ``install`` returns False and the runner keeps spawning (slower, same behaviour).
"""

from __future__ import annotations

import importlib
import multiprocessing
import multiprocessing.forkserver
import os
from collections.abc import Mapping, Sequence
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun
    from prefect.flows import Flow

_HOOK_MODULE = "prefect.runner._starter_direct"
_HOOK_NAME = "run_flow_in_subprocess"


def install(preload: Sequence[str]) -> bool:
    """Start the fork server with ``preload`` imported and make the runner start flow runs from it.
    Call it after ``PREFECT_API_URL`` is set: the fork server's runs inherit the environment it had."""
    try:
        hook_module = importlib.import_module(_HOOK_MODULE)
    except ImportError:
        return False
    if not hasattr(hook_module, _HOOK_NAME):
        return False
    multiprocessing.get_context("forkserver").set_forkserver_preload(list(preload))
    # Import now, not at the first event: the first reaction must not pay for it either.
    multiprocessing.forkserver.ensure_running()
    setattr(hook_module, _HOOK_NAME, start_flow_run)
    return True


def start_flow_run(
    flow: Flow[Any, Any],
    flow_run: FlowRun | None = None,
    env: Mapping[str, str | None] | None = None,
    **_: Any,
) -> BaseProcess:
    """Fork ``flow_run`` of ``flow`` off the fork server and return its (started) process. The flow is
    passed by import path: a forked child already has the module, and the flow object need not pickle."""
    if flow_run is None:
        raise ValueError("a served run needs its flow run")
    entrypoint = (flow.fn.__module__, flow.fn.__qualname__)
    process = multiprocessing.get_context("forkserver").Process(
        target=_run, args=(entrypoint, flow_run, dict(env or {})), name=f"flow-run-{flow_run.id}"
    )
    process.start()
    return process


def _run(entrypoint: tuple[str, str], flow_run: FlowRun, env: dict[str, str | None]) -> None:
    """In the forked child: apply the runner's environment for this run, then run it to a final state."""
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    from prefect.context import SettingsContext, get_settings_context
    from prefect.engine import handle_engine_signals
    from prefect.flow_engine import run_flow
    from prefect.settings import Settings

    module, name = entrypoint
    flow = getattr(importlib.import_module(module), name)
    # Prefect's settings were read when the fork server imported it: re-read them with this run's
    # environment (heartbeat frequency, deployment name) applied.
    settings = SettingsContext(profile=get_settings_context().profile, settings=Settings())
    with settings, handle_engine_signals(flow_run.id):
        run_flow(flow, flow_run=flow_run)
