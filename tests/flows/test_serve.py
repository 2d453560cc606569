"""Served reconfiguration without the controller: a mec.link.degraded event, and then a mec.link.recovered
one, each start a reconfigure run of the deployment that completes, with the event's link as its
parameter; the run's placement artifact renders in the Prefect UI (headless Chromium). (The controller's
path: tests/flows/test_controller.py.)

Everything is real: Prefect's own local server with its UI (what `mecsplit` starts for users),
`mecsplit serve` as its own process, segment servers and the gateway as processes on loopback (local
backend, tiny model), Chromium rendering the UI.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import TINY_SCENARIO

from flows import pipeline
from flows.reaction import wait_for_deployment
from flows.runtime import LocalBackend, clear_local_links, set_local_link, stop_local_processes
from flows.serve import own_temp_dir
from flows.state import clear_state, load_state
from mecsplit.settings import Settings, get_settings
from testbed.scenario import load_scenario

pytestmark = [pytest.mark.prefect, pytest.mark.slow]

REACTION_LIMIT_S = 15.0


@pytest.fixture(scope="module")
def deployed(flows_home: Path, prefect_ui_server: str) -> Iterator[dict[str, Any]]:
    from flows.reconfigure import deploy_flow

    result = deploy_flow(scenario=str(TINY_SCENARIO), backend="local", measure_tokens=4)
    yield result
    state = load_state()
    if state is not None:
        pipeline.teardown(LocalBackend(load_scenario(TINY_SCENARIO)), state)
        clear_state()
    clear_local_links(get_settings())
    stop_local_processes(get_settings())  # segments of a served run that was stopped mid-deploy


@pytest.fixture(scope="module")
def served(
    deployed: dict[str, Any], prefect_ui_server: str, flows_home: Path
) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, "PREFECT_API_URL": prefect_ui_server, "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    log = (flows_home / "serve-test.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mecsplit.cli", "serve", "--scenario", str(TINY_SCENARIO), "--no-controller"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip
    try:
        wait_for_deployment(timeout_s=90)
        time.sleep(2.0)  # the runner's first poll
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _completed_run_after(t0: float, timeout_s: float, reason: str) -> Any:
    """The first finished reconfigure run created since ``t0`` (a second's slack for the clocks) for the
    event ``reason``: a run of an earlier event that finished within a second of its creation is also
    that recent."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, FlowRunFilter

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["reconfigure"])),
                flow_run_filter=FlowRunFilter(),
            )
            for run in runs:
                fresh = run.created is not None and run.created.timestamp() >= t0 - 1
                ours = run.parameters.get("reason") == reason
                if fresh and ours and run.state is not None and run.state.is_final():
                    return run
            time.sleep(0.25)
    return None


def test_link_degraded_event_triggers_a_completed_reconfigure(
    served: subprocess.Popen[bytes], flows_home: Path
) -> None:
    from prefect.events import emit_event

    set_local_link(get_settings(), "device", "edge", 0.05)
    t0 = time.time()
    emit_event(
        event="mec.link.degraded",
        resource={"prefect.resource.id": "mec.link.device-edge"},
        payload={"bw_mbit": 0.05, "previous_bw_mbit": 20.0, "changed_at_s": t0},
    )
    run = _completed_run_after(t0, timeout_s=120, reason="mec.link.degraded")
    assert run is not None, "no reconfigure run finished"
    elapsed_s = run.end_time.timestamp() - t0
    assert run.state.is_completed(), run.state
    assert run.parameters["resource"] == "mec.link.device-edge"
    assert run.parameters["reason"] == "mec.link.degraded"
    assert run.parameters["bw_mbit"] == pytest.approx(0.05)
    # The trigger hands the run the event's time and payload, which time the reaction.
    occurred = datetime.fromisoformat(run.parameters["event_occurred"]).timestamp()
    assert t0 - 1 <= occurred <= run.start_time.timestamp()
    assert run.parameters["trigger"]["changed_at_s"] == pytest.approx(t0)
    result = run.state.result(raise_on_failure=False)
    if result["adopted"]:
        steps = result["reaction"]["steps"]
        assert all(steps[name] is not None for name in pipeline.REACTION_STEPS), steps
        assert steps["end_to_end_from"] == "changed" and 0 < steps["end_to_end_s"] <= REACTION_LIMIT_S
        print(f"reaction: {steps}")
    print(
        f"event -> completed reconfigure run: {elapsed_s:.1f} s "
        f"(created {run.created.timestamp() - t0:+.1f} s, started {run.start_time.timestamp() - t0:+.1f} s)"
    )
    assert elapsed_s <= REACTION_LIMIT_S
    # The run was forked off the process that had imported the flow, not started in a fresh interpreter.
    log = (flows_home / "serve-test.log").read_text()
    assert "flow runs start as forks of a process with flows.reconfigure imported" in log

    # Both ways: the link coming back starts a run too.
    set_local_link(get_settings(), "device", "edge", 20.0)
    t1 = time.time()
    emit_event(
        event="mec.link.recovered",
        resource={"prefect.resource.id": "mec.link.device-edge"},
        payload={"bw_mbit": 20.0, "previous_bw_mbit": 0.05, "changed_at_s": t1},
    )
    back = _completed_run_after(t1, timeout_s=120, reason="mec.link.recovered")
    assert back is not None and back.state.is_completed(), "no reconfigure run finished after the recovery"
    assert back.parameters["reason"] == "mec.link.recovered"


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium (CI installs it)")
def test_prefect_ui_renders_the_placement_artifact(deployed: dict[str, Any], prefect_ui_server: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["placement"]))
        )
    assert artifacts, "no placement artifact was created"
    artifact = artifacts[0]
    rows = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
    nodes = {row["node"] for row in rows}
    ui = prefect_ui_server.removesuffix("/api")
    dom = _render(f"{ui}/artifacts/artifact/{artifact.id}")
    assert "placement" in dom
    assert all(node in dom for node in nodes), f"placement rows {sorted(nodes)} not rendered"
    assert "[0," in dom  # the layer range column


def _render(url: str) -> str:
    profile = tempfile.mkdtemp(prefix="mecsplit-chromium-")
    try:
        proc = subprocess.run(
            [
                "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                f"--user-data-dir={profile}", "--virtual-time-budget=20000", "--dump-dom", url,
            ],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def test_serve_keeps_its_temporary_files_under_its_home(tmp_path: Path) -> None:
    """Prefect's runner storage goes under MECSPLIT_HOME, private to its user, not the shared /tmp."""
    settings = Settings(home=tmp_path / "home")
    saved = tempfile.tempdir
    try:
        path = own_temp_dir(settings)
        assert path == tmp_path / "home" / "tmp" and path.stat().st_mode & 0o777 == 0o700
        assert tempfile.gettempdir() == str(path)
    finally:
        tempfile.tempdir = saved


def test_with_the_controller_the_failure_trigger_only_repairs() -> None:
    """The controller decides every move on the calibrated model; a failure trigger that re-planned on
    its own would profile the nodes and deploy the uncalibrated model's choice."""
    from flows.serve import TRIGGERS, deployment_options

    controlled = deployment_options("s.yaml", controller=True)["triggers"]
    assert [t.expect for t in controlled] == [{"mec.node.failed"}]
    assert controlled[0].parameters["failover_only"] is True
    alone = deployment_options("s.yaml", controller=False)["triggers"]
    assert len(alone) == len(TRIGGERS)
    assert all("failover_only" not in t.parameters for t in alone)
    assert deployment_options("s.yaml", controller=False)["parameters"]["failover_only"] is False


def test_the_controller_thread_runs_below_the_serving_priority_and_its_deploys_do_not() -> None:
    """The evaluations' thread runs niced; a reconfiguration's thread, started from it, takes the serve
    process's priority back (where the process may: root)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from flows.serve import CONTROLLER_NICE_STEP, set_thread_nice

    base = os.getpriority(os.PRIO_PROCESS, 0)
    niced = min(19, base + CONTROLLER_NICE_STEP)

    def own() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    def start_deploy() -> tuple[int, int]:
        seen: list[int] = []

        def deploy() -> None:
            set_thread_nice(base)
            seen.append(own())

        thread = threading.Thread(target=deploy)
        thread.start()
        thread.join()
        return own(), seen[0]

    with ThreadPoolExecutor(1, initializer=set_thread_nice, initargs=(niced,)) as controller:
        evaluating, deploying = controller.submit(start_deploy).result()
    assert evaluating == niced
    assert own() == base  # the caller's thread is untouched
    if os.geteuid() == 0:
        assert deploying == base
