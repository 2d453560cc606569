"""Where segments run: the emulated testbed (containers on Mininet nodes) or the root-free local backend.

Both backends give the flows the same few operations: profile a node's compute, probe a link, start and
stop a segment server on a node, start the gateway on the source node. Processes and containers started
here outlive the flow run that started them (Prefect runs each flow run in a fresh subprocess): they are
recorded in the deployment state and stopped by the run that replaces them.

The local backend runs every segment as a process on loopback. It cannot shape links or cap CPU without
root, so it takes link bandwidth and RTT from the scenario as declared, and scales the compute time it
measures on the host by each node's CPU share. Everything else (real processes, sockets, KV transfers,
the optimiser, the Prefect flows) is the same as on the testbed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from flows.measure import ADMIN_TOKEN_FILE, admin_token, admin_token_path
from flows.state import BackendName, Endpoint
from mecsplit.files import write_json
from mecsplit.process import stop_pid
from mecsplit.settings import Settings, get_settings
from segments.pki import GATEWAY, segment_identity
from testbed.node import BACKGROUND_CPUS, FILES_MOUNT
from testbed.scenario import Scenario

if TYPE_CHECKING:
    from segments.auth import Credentials


class RuntimeFailure(RuntimeError):
    """A segment, gateway or probe could not be started or measured."""


@dataclass(frozen=True)
class LinkProbe:
    a: str
    b: str
    bw_mbit: float
    rtt_ms: float
    measured: bool  # False where the value is the scenario's declaration (local backend)


@dataclass(frozen=True)
class SegmentRequest:
    node: str
    model: str
    first: int
    end: int
    revision: int

    @property
    def name(self) -> str:
        return f"seg{self.first}-{self.end}-r{self.revision}"

    @property
    def port(self) -> int:
        # Unique per (revision, first) on a node: old and new segments coexist during make-before-break.
        return 20000 + (self.revision % 200) * 100 + self.first


def standby_name(revision: int) -> str:
    return f"standby-r{revision}"


def standby_port(revision: int) -> int:
    # Above every SegmentRequest.port (< 40000); one standby per node and revision.
    return 40000 + revision % 20000


def standby_range(num_layers: int) -> tuple[int, int]:
    """The range a standby holds until it is claimed: one middle layer (neither the embeddings nor the
    head, the biggest tensors), so it costs little more than the interpreter, torch and transformers."""
    if num_layers < 3:
        return 0, 1
    middle = num_layers // 2
    return middle, middle + 1


class Backend(Protocol):
    name: BackendName
    scenario: Scenario

    def profile_compute(self, node: str, model: str, context: int) -> dict[str, Any]: ...
    def probe_link(self, a: str, b: str) -> LinkProbe: ...
    def start_segment(self, request: SegmentRequest, secret: str) -> Endpoint: ...
    def start_standby(
        self,
        node: str,
        model: str,
        num_layers: int,
        revision: int,
        secret: str,
        span: tuple[int, int] | None = None,
        background: bool = False,
    ) -> Endpoint:
        """Start a server of ``span`` (default ``standby_range``) on ``node`` and return at once (not yet
        ready); ``background``: it boots beside a serving stage, taking little of the node's CPU until
        ``promote``."""
        ...

    def promote(self, standby: Endpoint) -> None:
        """``standby`` is about to serve: it runs with its node's whole CPU, as a stage does."""
        ...

    def stop_segment(self, endpoint: Endpoint) -> None: ...
    def start_gateway(self, model: str, secret: str, port: int, chain: dict[str, Any]) -> tuple[str, str]: ...
    def stop_gateway(self, handle: str) -> None: ...
    def alive_nodes(self) -> list[str]: ...
    def node_loads(self) -> dict[str, float]:
        """Each node's background load now, the share of its CPU other work takes (0..1)."""
        ...


def _api_key_env(settings: Settings) -> dict[str, str]:
    """The gateway's API key for a container, whose environment is only what it is given (a local
    gateway inherits it with the rest of ours)."""
    key = settings.segments.api_key
    return {} if key is None else {"MECSPLIT_SEGMENTS__API_KEY": key}


def credentials_dir(settings: Settings, secret: str, identity: str) -> Path:
    """``identity``'s TLS credentials folder under the run dir (0700, key 0400), issued from the
    deployment secret on first use. Only the orchestrator's own and the local backend's servers read
    these; a testbed container gets its files mounted on its own (``credential_files``)."""
    from segments.pki import issue, write_credentials

    root = settings.run_dir / "pki"
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    folder = root / hashlib.sha256(secret.encode()).hexdigest()[:16] / identity
    if not folder.exists():
        # Written aside and renamed into place: a concurrent start of the same identity finds either
        # nothing or a complete folder.
        staging = folder.with_name(f".{identity}.{os.getpid()}.{threading.get_ident()}")
        write_credentials(issue(secret.encode(), identity), staging)
        try:
            staging.rename(folder)
        except OSError:  # another start put it there first
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def orchestrator_credentials(secret: str, settings: Settings | None = None) -> Credentials:
    """What the flows authenticate to segment servers with."""
    from segments.auth import Credentials
    from segments.pki import ORCHESTRATOR

    return Credentials(tls_dir=credentials_dir(settings or get_settings(), secret, ORCHESTRATOR))


def credential_files(secret: str, identity: str) -> dict[str, str]:
    """A credentials folder's files (name -> PEM text), to deliver into a container."""
    from segments import pki

    issued = pki.issue(secret.encode(), identity)
    return {name: content.decode() for name, content in pki.credential_files(issued).items()}


def _server_command(
    settings: Settings,
    req: SegmentRequest,
    host: str,
    port: int,
    tls_dir: Path | str,
    *,
    standby: bool = False,
) -> list[str]:
    command = [
        sys.executable, "-m", "segments.server", "--store", str(settings.store_dir), "--model", req.model,
        "--first", str(req.first), "--end", str(req.end), "--host", host, "--port", str(port),
        "--threads", str(settings.segments.threads), "--tls-dir", str(tls_dir),
        # A container's environment is only what it is given: the setting travels as a flag.
        "--max-batch", str(settings.segments.max_batch),
    ]  # fmt: skip
    # A standby hashes the whole model before it is ready, so the range it is later given loads
    # without reading the store again (the hashing is most of a load's time); it boots at the lowest
    # CPU priority, so that its imports do not slow the node's serving segments.
    return [*command, "--verify-store", "--background"] if standby else command


def _gateway_command(
    settings: Settings,
    model: str,
    host: str,
    port: int,
    chain: dict[str, Any],
    tls_dir: Path | str,
    admin_token_file: Path | str,
    admin_host: str,
) -> list[str]:
    return [
        sys.executable, "-m", "segments.gatewayd", "--store", str(settings.store_dir), "--model", model,
        "--host", host, "--port", str(port), "--chain-json", json.dumps(chain), "--tls-dir", str(tls_dir),
        "--admin-token-file", str(admin_token_file), "--admin-host", admin_host,
    ]  # fmt: skip


def _profile_command(settings: Settings, model: str, context: int) -> list[str]:
    return [
        sys.executable, "-m", "segments.profile", "--store", str(settings.store_dir), "--model", model,
        "--context", str(context), "--threads", str(settings.segments.threads),
    ]  # fmt: skip


def _ready_message(text: str) -> dict[str, Any] | None:
    for line in text.splitlines():
        if line.startswith("{") and '"ready"' in line:
            return json.loads(line)
    return None


# ------------------------------------------------------------------------------------------------- local
class LocalBackend:
    name: BackendName = "local"

    def __init__(self, scenario: Scenario, settings: Settings | None = None) -> None:
        self.scenario = scenario
        self.settings = settings or get_settings()
        self.log_dir = self.settings.run_dir / "local"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._host_profile: dict[str, Any] | None = None

    def profile_compute(self, node: str, model: str, context: int) -> dict[str, Any]:
        if self._host_profile is None:
            proc = subprocess.run(
                _profile_command(self.settings, model, context), capture_output=True, text=True, timeout=600
            )
            if proc.returncode != 0:
                raise RuntimeFailure(f"profiling {model} failed: {proc.stderr[-2000:]}")
            self._host_profile = json.loads(proc.stdout.strip().splitlines()[-1])
        cpus = next(n.cpus for n in self.scenario.nodes if n.name == node)
        scale = 1.0 / min(1.0, cpus)  # one process uses at most one core; a smaller share slows it
        profile = dict(self._host_profile)
        for key in ("layer_decode_s", "layer_prefill_s_per_token", "embed_decode_s", "head_decode_s"):
            profile[key] = profile[key] * scale
        profile["scaled_by_cpu_share"] = scale
        return profile

    def probe_link(self, a: str, b: str) -> LinkProbe:
        overrides = local_link_overrides(self.settings)
        for link in self.scenario.links:
            if {link.a, link.b} == {a, b}:
                bw_mbit = overrides.get(link_key(link.a, link.b), link.bw_mbit)
                return LinkProbe(a, b, bw_mbit, 2 * link.delay_ms, measured=False)
        raise RuntimeFailure(f"scenario {self.scenario.name} has no link {a}-{b}")

    def _popen(self, command: list[str], log_name: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        """Start a long-lived process in its own session, recorded by PID."""
        log_path = self.log_dir / f"{log_name}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **env}, start_new_session=True,
            )  # fmt: skip
        with (self.log_dir / PID_REGISTRY).open("a") as registry:
            registry.write(f"{proc.pid}\n")
        return proc

    def _spawn(self, command: list[str], log_name: str, env: dict[str, str]) -> tuple[int, int]:
        """Start a long-lived process; wait for its JSON ready line; (pid, port)."""
        log_path = self.log_dir / f"{log_name}.log"
        proc = self._popen(command, log_name, env)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            message = _ready_message(log_path.read_text(errors="replace"))
            if message is not None:
                if message.get("ready"):
                    return proc.pid, int(message["port"])
                raise RuntimeFailure(f"{log_name} failed: {message.get('error')}")
            if proc.poll() is not None:
                raise RuntimeFailure(f"{log_name} exited with {proc.returncode}; see {log_path}")
            time.sleep(0.1)
        stop_pid(proc.pid)
        raise RuntimeFailure(f"{log_name} not ready within 180 s; see {log_path}")

    def _tls_dir(self, secret: str, node: str) -> Path:
        return credentials_dir(self.settings, secret, segment_identity(node))

    def start_segment(self, request: SegmentRequest, secret: str) -> Endpoint:
        tls_dir = self._tls_dir(secret, request.node)
        command = _server_command(self.settings, request, "127.0.0.1", 0, tls_dir)
        pid, port = self._spawn(command, f"{request.node}-{request.name}", {})
        return Endpoint(
            node=request.node, first=request.first, end=request.end, host="127.0.0.1", port=port,
            handle=f"pid:{pid}",
        )  # fmt: skip

    def start_standby(
        self,
        node: str,
        model: str,
        num_layers: int,
        revision: int,
        secret: str,
        span: tuple[int, int] | None = None,
        background: bool = False,
    ) -> Endpoint:
        del background  # it boots niced (``--background``), as every local standby does
        first, end = span or standby_range(num_layers)
        request = SegmentRequest(node, model, first, end, revision)
        # The port must be known before the process is ready (nobody waits for it): take a free one now.
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        tls_dir = self._tls_dir(secret, node)
        command = _server_command(self.settings, request, "127.0.0.1", port, tls_dir, standby=True)
        proc = self._popen(command, f"{node}-{standby_name(revision)}", {})
        return Endpoint(
            node=node, first=first, end=end, host="127.0.0.1", port=port, handle=f"pid:{proc.pid}"
        )

    def promote(self, standby: Endpoint) -> None:
        del standby  # processes on one host, at one priority: nothing to change

    def stop_segment(self, endpoint: Endpoint) -> None:
        stop_pid(int(endpoint.handle.removeprefix("pid:")))

    def start_gateway(self, model: str, secret: str, port: int, chain: dict[str, Any]) -> tuple[str, str]:
        tls_dir = credentials_dir(self.settings, secret, GATEWAY)
        admin_token()  # made on first use; the gateway reads the file
        command = _gateway_command(
            self.settings, model, "127.0.0.1", port, chain, tls_dir, admin_token_path(), "127.0.0.1"
        )
        pid, bound = self._spawn(command, "gateway", {})
        return f"http://127.0.0.1:{bound}", f"pid:{pid}"

    def stop_gateway(self, handle: str) -> None:
        stop_pid(int(handle.removeprefix("pid:")))

    def alive_nodes(self) -> list[str]:
        return [n.name for n in self.scenario.nodes if n.joins_at_s is None]

    def node_loads(self) -> dict[str, float]:
        return {}  # processes on one host: no node carries a background load of its own


PID_REGISTRY = "pids.txt"


def stop_local_processes(settings: Settings) -> int:
    """Stop every process the local backend started (recorded by PID as it started them) that still
    runs one of mecsplit's own modules; a flow run killed mid-deploy can leave such orphans, which no
    deployment state names. Returns how many were stopped."""
    registry = settings.run_dir / "local" / PID_REGISTRY
    if not registry.exists():
        return 0
    stopped = 0
    for pid in {int(line) for line in registry.read_text().split()}:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"segments." in cmdline:  # the PID was not reused by something else
            stop_pid(pid)
            stopped += 1
    registry.unlink()
    return stopped


def link_key(a: str, b: str) -> str:
    return "-".join(sorted((a, b)))


def _overrides_path(settings: Settings):
    return settings.run_dir / "local-links.json"


def local_link_overrides(settings: Settings) -> dict[str, float]:
    """Link rates declared by `set_local_link` (the local backend's stand-in for tc: not enforced)."""
    path = _overrides_path(settings)
    return json.loads(path.read_text()) if path.exists() else {}


def set_local_link(settings: Settings, a: str, b: str, bw_mbit: float) -> None:
    overrides = local_link_overrides(settings)
    overrides[link_key(a, b)] = bw_mbit
    write_json(_overrides_path(settings), overrides, sort_keys=True)


def clear_local_links(settings: Settings) -> None:
    _overrides_path(settings).unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------- testbed
class TestbedBackend:
    """Segments as containers on the emulated nodes, through the testbed daemon's API."""

    __test__ = False
    name: BackendName = "testbed"

    def __init__(self, scenario: Scenario, settings: Settings | None = None) -> None:
        from testbed.api import TestbedClient

        self.scenario = scenario
        self.settings = settings or get_settings()
        self.client = TestbedClient()

    def _wait_for_json(self, node: str, name: str, timeout_s: float, *, ready: bool) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            logs = self.client.segment_logs(node, name)
            if ready:
                message = _ready_message(logs)
                if message is not None:
                    if not message.get("ready"):
                        raise RuntimeFailure(f"{name} on {node} failed: {message.get('error')}")
                    return message
            else:
                for line in logs.splitlines():
                    if line.startswith("{"):
                        return json.loads(line)
            time.sleep(0.2)
        raise RuntimeFailure(f"{name} on {node} gave no answer within {timeout_s} s")

    def profile_compute(self, node: str, model: str, context: int) -> dict[str, Any]:
        """Profile in a one-shot container on the node, so the node's CPU share and load apply."""
        self.client.stop_segment(node, "profile", timeout_s=1)  # leftover of a crashed earlier run
        self.client.deploy_segment(node, "profile", _profile_command(self.settings, model, context))
        try:
            return self._wait_for_json(node, "profile", 300, ready=False)
        finally:
            self.client.stop_segment(node, "profile", timeout_s=1)

    def probe_link(self, a: str, b: str) -> LinkProbe:
        result = self.client.measure_link(a, b, seconds=1.0, pings=5, warmup_s=0.3)
        return LinkProbe(a, b, float(result["goodput_mbit"]), float(result["rtt_ms"]), measured=True)

    def start_segment(self, request: SegmentRequest, secret: str) -> Endpoint:
        command = _server_command(self.settings, request, "0.0.0.0", request.port, FILES_MOUNT)
        answer = self.client.deploy_segment(
            request.node, request.name, command, port=request.port,
            files=credential_files(secret, segment_identity(request.node)),
        )  # fmt: skip
        self._wait_for_json(request.node, request.name, 180, ready=True)
        return Endpoint(
            node=request.node, first=request.first, end=request.end, host=answer["address"],
            port=request.port, handle=f"segment:{request.name}", control_host=answer["mgmt_address"],
        )  # fmt: skip

    def start_standby(
        self,
        node: str,
        model: str,
        num_layers: int,
        revision: int,
        secret: str,
        span: tuple[int, int] | None = None,
        background: bool = False,
    ) -> Endpoint:
        first, end = span or standby_range(num_layers)
        name, port = standby_name(revision), standby_port(revision)
        request = SegmentRequest(node, model, first, end, revision)
        answer = self.client.deploy_segment(
            node, name, _server_command(self.settings, request, "0.0.0.0", port, FILES_MOUNT, standby=True),
            port=port, files=credential_files(secret, segment_identity(node)),
            cpus=BACKGROUND_CPUS if background else None,
        )  # fmt: skip
        return Endpoint(
            node=node, first=first, end=end, host=answer["address"], port=port, handle=f"segment:{name}",
            control_host=answer["mgmt_address"],
        )  # fmt: skip

    def promote(self, standby: Endpoint) -> None:
        self.client.uncap_segment(standby.node, standby.handle.removeprefix("segment:"))

    def stop_segment(self, endpoint: Endpoint) -> None:
        self.client.stop_segment(endpoint.node, endpoint.handle.removeprefix("segment:"))

    def start_gateway(self, model: str, secret: str, port: int, chain: dict[str, Any]) -> tuple[str, str]:
        source = self.scenario.source
        token_file, mgmt = f"{FILES_MOUNT}/{ADMIN_TOKEN_FILE}", self._mgmt_address(source)
        answer = self.client.deploy_segment(
            source, "gateway",
            _gateway_command(self.settings, model, "0.0.0.0", port, chain, FILES_MOUNT, token_file, mgmt),
            env=_api_key_env(self.settings), port=port,
            files={**credential_files(secret, GATEWAY), ADMIN_TOKEN_FILE: admin_token()},
        )  # fmt: skip
        self._wait_for_json(source, "gateway", 180, ready=True)
        return f"http://{answer['mgmt_address']}:{port}", f"segment:{source}:gateway"

    def _mgmt_address(self, node: str) -> str:
        """The node's address on the management network (where the flows reach it from the host)."""
        rows = {row["name"]: row for row in self.client.status()["nodes"]}
        return str(rows[node]["mgmt_address"])

    def stop_gateway(self, handle: str) -> None:
        _, node, name = handle.split(":")
        self.client.stop_segment(node, name)

    def alive_nodes(self) -> list[str]:
        """Nodes up as the daemon's monitor last saw them (its cheap view: no Docker call)."""
        nodes = self.client.monitor()["nodes"]
        return sorted(name for name, row in nodes.items() if row["up"])

    def node_loads(self) -> dict[str, float]:
        return {name: float(row["load_pct"]) / 100.0 for name, row in self.client.monitor()["nodes"].items()}


def backend_for(name: BackendName, scenario: Scenario, settings: Settings | None = None) -> Backend:
    if name == "testbed":
        return TestbedBackend(scenario, settings)
    return LocalBackend(scenario, settings)
