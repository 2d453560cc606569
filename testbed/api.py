"""Client of the testbed daemon (``TestbedClient``) and the start/stop of the daemon process.

Flows and the CLI use this module only; they never import the runtime. The client reads the daemon's
address and token from ``<run_dir>/state.json`` (mode 0600, written by the daemon once it is up).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from testbed import cleanup
from testbed.daemon import LOG_FILE, PID_FILE, STATE_FILE
from testbed.errors import (
    NotRootError,
    TestbedAlreadyRunningError,
    TestbedError,
    TestbedNotRunningError,
    UnknownNodeError,
)
from testbed.node import FILES_MOUNT  # noqa: F401  (re-exported: where a container finds its files)


def _run_dir(run_dir: Path | None) -> Path:
    if run_dir is not None:
        return run_dir
    from mecsplit.settings import Settings

    return Path(Settings().run_dir)


def _prefix() -> str:
    from mecsplit.settings import Settings

    return Settings().testbed.prefix


class TestbedClient:
    """Typed calls to the daemon's HTTP API; every method returns the daemon's JSON answer."""

    __test__ = False  # not a pytest class despite its name

    def __init__(self, run_dir: Path | None = None, timeout_s: float = 120.0) -> None:
        import httpx

        self.run_dir = _run_dir(run_dir)
        state_path = self.run_dir / STATE_FILE
        if not state_path.exists():
            raise TestbedNotRunningError(
                f"no testbed is up ({state_path} missing): start one with `mecsplit testbed up --scenario F`"
            )
        self.state = json.loads(state_path.read_text())
        self._http = httpx.Client(
            base_url=f"http://{self.state['host']}:{self.state['port']}",
            headers={"Authorization": f"Bearer {self.state['token']}"}, timeout=timeout_s,
        )  # fmt: skip

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> TestbedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        import httpx

        try:
            resp = self._http.request(method, path, json=body)
        except httpx.TransportError as exc:
            raise TestbedNotRunningError(
                f"testbed daemon does not answer ({exc}); check `mecsplit testbed status` or "
                "`mecsplit testbed down --force`"
            ) from None
        if resp.status_code == 404:
            raise UnknownNodeError(resp.json().get("detail", resp.text))
        if resp.status_code >= 400:
            raise TestbedError(f"testbed refused {path}: {resp.json().get('detail', resp.text)}")
        return resp.json()

    def monitor(self) -> dict[str, Any]:
        """Each link's rate now and when it changed, each node's load and liveness (cheap: no Docker)."""
        return self._call("GET", "/monitor")

    def status(self) -> dict[str, Any]:
        return self._call("GET", "/status")

    def set_link(
        self,
        a: str,
        b: str,
        bw_mbit: float | None = None,
        delay_ms: float | None = None,
        loss_pct: float | None = None,
        direction: str = "both",
    ) -> dict[str, Any]:
        return self._call(
            "POST",
            "/link",
            {
                "a": a,
                "b": b,
                "bw_mbit": bw_mbit,
                "delay_ms": delay_ms,
                "loss_pct": loss_pct,
                "direction": direction,
            },
        )

    def set_load(self, node: str, pct: float) -> dict[str, Any]:
        return self._call("POST", "/load", {"node": node, "pct": pct})

    def fail(self, node: str) -> dict[str, Any]:
        return self._call("POST", "/fail", {"node": node})

    def restore(self, node: str) -> dict[str, Any]:
        return self._call("POST", "/restore", {"node": node})

    def replay_start(self) -> dict[str, Any]:
        return self._call("POST", "/replay/start")

    def replay_stop(self) -> dict[str, Any]:
        return self._call("POST", "/replay/stop")

    def deploy_segment(
        self,
        node: str,
        name: str,
        command: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        port: int | None = None,
        mem_bytes: int | None = None,
        files: dict[str, str] | None = None,
        cpus: float | None = None,
    ) -> dict[str, Any]:
        """Start a container on ``node`` running ``command`` (argv; it shares the node's netns, CPU and
        memory; ``cpus``: a cap of its own inside the node's quota); ``files`` (name -> text) are
        readable in it at ``FILES_MOUNT``, read-only. Returns
        ``container``, ``container_id``, ``address`` (data plane, reachable from other
        nodes), ``mgmt_address`` (reachable from the host) and ``port`` (echoed)."""
        return self._call(
            "POST",
            "/segments",
            {
                "node": node,
                "name": name,
                "command": list(command),
                "env": env or {},
                "port": port,
                "mem_bytes": mem_bytes,
                "files": files or {},
                "cpus": cpus,
            },
        )

    def uncap_segment(self, node: str, name: str) -> dict[str, Any]:
        """Lift a segment container's own CPU cap (it runs within its node's quota only)."""
        return self._call("POST", "/segments/uncap", {"node": node, "name": name})

    def stop_segment(self, node: str, name: str, timeout_s: float = 10.0) -> dict[str, Any]:
        return self._call("POST", "/segments/stop", {"node": node, "name": name, "timeout_s": timeout_s})

    def segment_logs(self, node: str, name: str) -> str:
        return self._call("GET", f"/segments/{node}/{name}/logs")["logs"]

    def exec(self, node: str, command: Sequence[str], timeout_s: float = 60.0) -> dict[str, Any]:
        """Run argv in the node's network namespace; returns returncode, stdout, stderr."""
        return self._call("POST", "/exec", {"node": node, "command": list(command), "timeout_s": timeout_s})

    def measure_link(
        self, a: str, b: str, seconds: float = 2.0, pings: int = 10, warmup_s: float = 0.5, bin_s: float = 0.1
    ) -> dict[str, Any]:
        """Active probe a->b: goodput_mbit (after warmup_s), rtt_ms (median of pings), set_bw_mbit,
        set_rtt_ms, series_mbit ([t_monotonic_s, Mbit/s] per bin_s)."""
        return self._call(
            "POST",
            "/measure",
            {"a": a, "b": b, "seconds": seconds, "pings": pings, "warmup_s": warmup_s, "bin_s": bin_s},
        )

    def down(self, timeout_s: float = 120.0) -> None:
        """Ask the daemon to tear everything down and wait until it has exited."""
        pid = int(self.state["pid"])
        self._call("POST", "/down")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and cleanup.find_daemon(self.run_dir) == [pid]:
            time.sleep(0.1)
        if cleanup.find_daemon(self.run_dir):
            raise TestbedError(
                f"daemon {pid} did not stop in {timeout_s} s; use `mecsplit testbed down --force`"
            )


def start_daemon(
    scenario_path: Path,
    timeout_s: float = 120.0,
    progress: Callable[[str], None] | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Validate the scenario, start the daemon detached and wait until it is up; returns state.json.

    A broken scenario raises ScenarioError before anything starts. When the daemon dies during start,
    its log tail is in the error and the prefix-wide cleanup has run. The daemon keeps its files in the
    settings' run folder (``MECSPLIT_HOME``), as every client finds them there.
    """
    from testbed.scenario import load_scenario

    load_scenario(scenario_path)  # refuse a broken scenario before anything starts
    if os.geteuid() != 0:
        raise NotRootError(
            "the emulated testbed needs root (namespaces, tc, iptables, cgroups): run as root, "
            "or use the local backend; `mecsplit testbed doctor` lists what is missing"
        )
    run_dir = _run_dir(None)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cleanup.find_daemon(run_dir):
        raise TestbedAlreadyRunningError(
            f"a testbed daemon is already up ({run_dir / PID_FILE}): `mecsplit testbed down` first"
        )
    prefix = _prefix()
    left = cleanup.survey(prefix, exact=True)
    if not left.empty():
        raise TestbedAlreadyRunningError(
            f"things with prefix {prefix!r} exist already ({left.as_dict()}): another testbed with this "
            "prefix is up, or one crashed; `mecsplit testbed down --force` removes them"
        )
    (run_dir / STATE_FILE).unlink(missing_ok=True)
    log_path = run_dir / LOG_FILE
    log = log_path.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "testbed.daemon", "--scenario", str(Path(scenario_path).resolve())],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        cwd=str(Path(__file__).resolve().parent.parent), env={**os.environ, **(env or {})},
    )  # fmt: skip
    log.close()
    try:
        return _wait_started(proc, run_dir, log_path, timeout_s, progress)
    except BaseException:
        # Interrupted or failed before it was up: the daemon finishes starting, then tears down (its
        # SIGTERM handler); nobody would otherwise know it runs.
        if proc.poll() is None:
            proc.terminate()
        raise


def _wait_started(
    proc: subprocess.Popen[bytes],
    run_dir: Path,
    log_path: Path,
    timeout_s: float,
    progress: Callable[[str], None] | None,
) -> dict[str, Any]:
    """Relay the daemon's progress lines until its state file exists; raise if it exits or times out."""
    seen = 0
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        lines = log_path.read_text(errors="replace").splitlines()
        for line in lines[seen:]:
            if line.startswith("progress: ") and progress is not None:
                progress(line.removeprefix("progress: "))
        seen = len(lines)
        state_path = run_dir / STATE_FILE
        if state_path.exists():
            return json.loads(state_path.read_text())
        if proc.poll() is not None:
            tail = "\n".join(lines[-25:])
            raise TestbedError(f"testbed daemon exited with {proc.returncode} during start:\n{tail}")
        time.sleep(0.1)
    raise TestbedError(f"testbed did not come up in {timeout_s} s; see {log_path}")
