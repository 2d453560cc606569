"""Node containers: one Docker container per emulated MEC node, segment containers placed on it.

A node container is the node's "pod infrastructure" container: it runs ``sleep infinity`` with
``--network none`` and owns the node's network namespace (``testbed.net`` plugs veths into it). Segment
containers join that namespace (``--network container:<node>``) and the node's parent cgroup, so every
process placed on a node shares one CPU quota and one memory limit, like pods on a host: adding a segment
to a busy node really slows it.

Images: no registry is reachable on the machines this project targets, so the default image is a tiny
imported base (only the ``bin``/``lib``/``lib64``/``sbin`` symlinks into ``/usr`` and empty dirs) run
with the host's ``/usr``, the Python install, the project's checkout (and its venv) and the model store
bind-mounted read-only at the same absolute paths (venv scripts hard-code their interpreter path).
``testbed/Dockerfile`` builds a self-contained image where a registry is reachable.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from testbed.errors import TestbedError

LABEL_TESTBED = "mecsplit.testbed"
LABEL_NODE = "mecsplit.node"
LABEL_ROLE = "mecsplit.role"
LABEL_CONTENT = "mecsplit.image.content"
CGROUP_ROOT = Path("/sys/fs/cgroup")
# Where a segment container finds the files deployed with it (its TLS credentials), read-only.
FILES_MOUNT = "/run/mecsplit/files"
# Controllers the node's parent cgroup limits; the others Docker creates on demand.
CPU_CONTROLLER = "cpu"
ACCT_CONTROLLER = "cpuacct"
MEM_CONTROLLER = "memory"
CFS_PERIOD_US = 100_000
# The background-load cgroup gets a large weight so that it takes its full quota first and the node's
# segments share what is left: "load 60 %" then means 60 % of the node's CPU is gone.
LOAD_CPU_SHARES = 262_144
# Weight of a node against the host's other processes: 4 x 1024 per core of share (Kubernetes uses 1024
# per requested core), so an emulated node gets its quota even while the host runs other work. The quota,
# not the weight, caps the node.
NODE_SHARES_PER_CPU = 4096

# Every container of a node runs as this unprivileged user (uid:gid), not root: the read-only mounts
# (store, checkout, Python) are world-readable, and a file handed to a segment (a secret) must be owned
# by this uid or readable by this gid. The base image names it in /etc/passwd; testbed/Dockerfile too.
SEGMENT_UID = 10001
SEGMENT_GID = 10001
# Processes and threads per container (torch starts a thread per core, uvicorn a few more): generous,
# but a fork bomb in one segment cannot take the host. The node container only runs `sleep`.
SEGMENT_PIDS_LIMIT = 1024
NODE_PIDS_LIMIT = 16

_BASE_SYMLINKS = {"bin": "usr/bin", "lib": "usr/lib", "lib64": "usr/lib64", "sbin": "usr/sbin"}
_BASE_DIRS = ("dev", "etc", "proc", "sys", "tmp", "root", "run", "var", "var/tmp", "home", "mnt", "opt")
_BASE_FILES = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
    f"mecsplit:x:{SEGMENT_UID}:{SEGMENT_GID}:mecsplit segments:/tmp:/bin/false\n",
    "etc/group": f"root:x:0:\nnogroup:x:65534:\nmecsplit:x:{SEGMENT_GID}:\n",
    "etc/hosts": "127.0.0.1 localhost\n",
}


class DockerError(TestbedError):
    """A docker command failed."""


def docker(*args: str, check: bool = True, timeout_s: float = 120.0) -> str:
    """Run the docker CLI and return its stdout; raise DockerError with stderr on failure."""
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout_s)
    if check and proc.returncode != 0:
        raise DockerError(
            f"docker {' '.join(args[:3])} failed: {proc.stderr.strip()[:500]} "
            "(is dockerd running? see `mecsplit testbed doctor`)"
        )
    return proc.stdout


# ----------------------------------------------------------------------------------------------- image
def _base_tar_bytes() -> bytes:
    """The tiny base image's root filesystem as a deterministic tar (fixed mtimes, sorted entries)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(_BASE_DIRS):
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777 if name in ("tmp", "var/tmp") else 0o755
            tar.addfile(info)
        for name, target in sorted(_BASE_SYMLINKS.items()):
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
        for name, text in sorted(_BASE_FILES.items()):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def base_image_name(prefix: str) -> str:
    digest = hashlib.sha256(_base_tar_bytes()).hexdigest()[:12]
    return f"{prefix}-base:{digest}"


def ensure_base_image(prefix: str) -> str:
    """Import the tiny base image unless an image with the same content label exists; returns its name."""
    name = base_image_name(prefix)
    digest = name.rsplit(":", 1)[1]
    out = docker(
        "image",
        "inspect",
        "-f",
        f"{{{{ index .Config.Labels {json.dumps(LABEL_CONTENT)} }}}}",
        name,
        check=False,
    )
    if out.strip() == digest:
        return name
    proc = subprocess.run(
        [
            "docker",
            "import",
            "--change",
            f"LABEL {LABEL_CONTENT}={digest}",
            "--change",
            f"LABEL {LABEL_TESTBED}={prefix}",
            "-",
            name,
        ],
        input=_base_tar_bytes(),
        capture_output=True,
        timeout=120,
    )
    if proc.returncode != 0:
        raise DockerError(f"docker import of the base image failed: {proc.stderr.decode()[:300]}")
    return name


# The checkout this module belongs to: its packages are what every container imports.
CODE_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class HostMounts:
    """Host paths bind-mounted read-only into every container at the same absolute path."""

    paths: tuple[Path, ...]

    @classmethod
    def discover(cls, store_dir: Path, extra: Sequence[Path] = ()) -> HostMounts:
        repo = CODE_ROOT
        # The venv interpreter is a symlink to a base install (pyenv, /usr, ...): mount that too.
        candidates = [
            Path("/usr"),
            repo,
            Path(sys.prefix),
            Path(sys.base_prefix).resolve(),
            store_dir,
            *extra,
        ]
        chosen: list[Path] = []
        for path in sorted({p.resolve() for p in candidates if p.exists()}, key=lambda p: len(p.parts)):
            if not any(path.is_relative_to(c) for c in chosen):
                chosen.append(path)
        return cls(paths=tuple(chosen))

    def docker_args(self) -> list[str]:
        args: list[str] = []
        for path in self.paths:
            args += ["-v", f"{path}:{path}:ro"]
        return args


def check_readable_by_containers(root: Path, shown: int = 3) -> None:
    """Refuse a mounted tree (the model store) that the containers' unprivileged user cannot read: the
    segments would fail one by one with "Permission denied" long after ``up``. Stores prepared before
    the store wrote its files 0644 hold 0600 safetensors (the library's default)."""
    unreadable = []
    for path in [root, *sorted(root.rglob("*"))]:
        mode = path.lstat().st_mode
        need = stat.S_IROTH | stat.S_IXOTH if stat.S_ISDIR(mode) else stat.S_IROTH
        if not stat.S_ISLNK(mode) and mode & need != need:
            unreadable.append(str(path))
    if unreadable:
        raise TestbedError(
            f"{len(unreadable)} paths under {root} are not readable by the containers' user (uid "
            f"{SEGMENT_UID}), e.g. {unreadable[:shown]}: run `chmod -R a+rX {root}` (model weights only)"
        )


# ----------------------------------------------------------------------------------------------- cgroups
@dataclass(frozen=True)
class NodeCgroup:
    """A node's parent cgroup (cgroup v1, Docker's cgroupfs driver): cpu quota + memory limit."""

    name: str  # top-level directory name in each controller, starts with the testbed prefix

    def path(self, controller: str) -> Path:
        return CGROUP_ROOT / controller / self.name

    @property
    def docker_parent(self) -> str:
        return f"/{self.name}"

    def create(self, cpus: float, mem_bytes: int) -> None:
        for controller in (CPU_CONTROLLER, ACCT_CONTROLLER, MEM_CONTROLLER):
            self.path(controller).mkdir(exist_ok=True)
        cpu = self.path(CPU_CONTROLLER)
        (cpu / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
        (cpu / "cpu.cfs_quota_us").write_text(str(max(1000, round(cpus * CFS_PERIOD_US))))
        (cpu / "cpu.shares").write_text(str(max(2, round(cpus * NODE_SHARES_PER_CPU))))
        (self.path(MEM_CONTROLLER) / "memory.limit_in_bytes").write_text(str(mem_bytes))

    def cpu_usage_ns(self) -> int:
        """Total CPU time used by everything on the node (all its containers and its load)."""
        return int((self.path(ACCT_CONTROLLER) / "cpuacct.usage").read_text())

    def foreign_cpu_usage_ns(self) -> int:
        """CPU time taken by the node's background load (other tenants), not by its own segments: a node
        busy computing its segments is doing its job; only this part means someone else takes its CPU.
        The load's accounting group lives as long as the node, so the counter never goes backwards."""
        usage = self.load_acct_path() / "cpuacct.usage"
        return int(usage.read_text()) if usage.exists() else 0

    def load_acct_path(self) -> Path:
        return self.path(ACCT_CONTROLLER) / "load"

    def load_path(self) -> Path:
        return self.path(CPU_CONTROLLER) / "load"


def remove_cgroup_tree(path: Path) -> None:
    """Remove a cgroup directory bottom-up after killing what still runs in it (only our own cgroups).
    A directory may vanish while it is walked (Docker removes a container's cgroup as the container
    goes): what is gone is what was to be removed, not an error."""
    try:
        children = sorted((p for p in path.iterdir() if p.is_dir()), reverse=True)
    except (FileNotFoundError, NotADirectoryError):
        return
    for child in children:
        remove_cgroup_tree(child)
    procs = path / "cgroup.procs"
    for _ in range(50):
        try:
            pids = [int(x) for x in procs.read_text().split()] if procs.exists() else []
        except FileNotFoundError:
            return
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        time.sleep(0.05)
    for attempt in range(2):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            if attempt:
                raise
            time.sleep(0.2)


# ----------------------------------------------------------------------------------------------- nodes
@dataclass(frozen=True)
class NodeContainer:
    """A running node container (owner of the node's network namespace)."""

    node: str
    name: str
    container_id: str
    pid: int
    cgroup: NodeCgroup


def container_name(prefix: str, node: str, segment: str | None = None) -> str:
    return f"{prefix}-{node}" if segment is None else f"{prefix}-{node}-{segment}"


def _hardening_args(pids_limit: int) -> list[str]:
    """Least privilege for every container: an unprivileged user, no capabilities at all, no way to gain
    privileges back (setuid), a bounded number of processes, and a read-only root filesystem whose only
    writable place is /tmp (a tmpfs, HOME too). No container needs a capability: the testbed configures a
    node's network from the host (Mininet shells and nsenter enter its namespaces with the host's own
    privileges), Docker writes the sysctls, and servers listen on ports above 1024."""
    return [
        "--user", f"{SEGMENT_UID}:{SEGMENT_GID}", "--cap-drop", "ALL",
        "--security-opt", "no-new-privileges", "--pids-limit", str(pids_limit),
        "--read-only", "--tmpfs", "/tmp:rw,nosuid,nodev,mode=1777",
    ]  # fmt: skip


def _common_run_args(
    prefix: str, node: str, role: str, cgroup: NodeCgroup, mounts: HostMounts, pids_limit: int
) -> list[str]:
    return [
        "--cgroup-parent", cgroup.docker_parent,
        "--label", f"{LABEL_TESTBED}={prefix}", "--label", f"{LABEL_NODE}={node}",
        "--label", f"{LABEL_ROLE}={role}",
        *_hardening_args(pids_limit),
        "-e", "HOME=/tmp", "-e", "PYTHONDONTWRITEBYTECODE=1",
        "-e", "PATH=/usr/local/bin:/usr/bin:/usr/sbin",
        # The code the containers run is the checkout this testbed runs from (mounted by HostMounts), not
        # wherever the venv's editable install points: a second checkout (a git worktree) sharing the
        # venv ran its testbed with the first checkout's code, or none where that was not mounted.
        "-e", f"PYTHONPATH={CODE_ROOT}",
        *mounts.docker_args(),
    ]  # fmt: skip


def start_node(
    prefix: str, node: str, cpus: float, mem_bytes: int, image: str, mounts: HostMounts
) -> NodeContainer:
    """Create the node's parent cgroup and start its namespace-owning container."""
    cgroup = NodeCgroup(name=f"{prefix}-{node}")
    cgroup.create(cpus, mem_bytes)
    name = container_name(prefix, node)
    cid = docker(
        "run", "-d", "--name", name, "--hostname", node, "--network", "none",
        # Nodes route for each other (static routes along shortest paths); asymmetric paths are fine.
        "--sysctl", "net.ipv4.ip_forward=1", "--sysctl", "net.ipv4.conf.all.rp_filter=0",
        "--sysctl", "net.ipv4.conf.default.rp_filter=0",
        *_common_run_args(prefix, node, "node", cgroup, mounts, NODE_PIDS_LIMIT),
        image, "/usr/bin/sleep", "infinity",
    ).strip()  # fmt: skip
    pid = int(docker("inspect", "-f", "{{.State.Pid}}", cid).strip())
    if pid <= 0:
        raise DockerError(f"node container {name} is not running; see `docker logs {name}`")
    return NodeContainer(node=node, name=name, container_id=cid, pid=pid, cgroup=cgroup)


# A standby started while a chain serves boots (imports, hashing the store) under a CPU cap of its own,
# this share of one core, inside its node's quota; it is lifted when the standby is given a stage. The
# standby cannot lower its own priority (no CAP_SYS_NICE, below), and a low cpu.shares orders nothing
# when the node's containers run on different cores (docs/flows.md). Uncapped, a standby booting on the
# cloud after a move on industrial slowed the cloud's stage for about 10 s (376 ms a token against 217
# once it had booted).
BACKGROUND_CPUS = 0.1
_CFS_PERIOD_US = 100_000


def start_segment(
    prefix: str,
    node: NodeContainer,
    segment: str,
    command: Sequence[str],
    image: str,
    mounts: HostMounts,
    env: dict[str, str] | None = None,
    mem_bytes: int | None = None,
    files_dir: Path | None = None,
    cpus: float | None = None,
) -> str:
    """Start a segment container on a node: the node's netns and cgroup budget; returns its id.
    ``files_dir`` (its own credentials, owned by SEGMENT_UID) is mounted read-only at FILES_MOUNT;
    ``cpus``: a cap of its own inside the node's quota (``uncap`` lifts it)."""
    args = _common_run_args(prefix, node.node, "segment", node.cgroup, mounts, SEGMENT_PIDS_LIMIT)
    if cpus is not None:
        args += ["--cpu-period", str(_CFS_PERIOD_US), "--cpu-quota", str(round(cpus * _CFS_PERIOD_US))]
    if files_dir is not None:
        args += ["-v", f"{files_dir}:{FILES_MOUNT}:ro"]
    for key, value in sorted((env or {}).items()):
        args += ["-e", f"{key}={value}"]
    if mem_bytes is not None:
        args += ["--memory", str(mem_bytes)]
    name = container_name(prefix, node.node, segment)
    # No CAP_SYS_NICE: a standby (segments.server --background) boots at the lowest CPU priority only if
    # it can take normal priority back, which needs CAP_SYS_NICE or RLIMIT_NICE >= 20. Docker (20.10)
    # gives a non-root user no effective capabilities even with --cap-add, and `--ulimit nice` needs a
    # dockerd with CAP_SYS_RESOURCE, which some hosts lack; the server sees neither and boots its
    # standbys at normal priority (docs/testbed.md).
    return docker(
        "run", "-d", "--name", name, "--network", f"container:{node.name}", "--stop-timeout", "10",
        *args, image, *command,
    ).strip()  # fmt: skip


def uncap(prefix: str, node: str, segment: str) -> None:
    """Lift a segment container's own CPU cap: it runs within its node's quota only."""
    docker("update", "--cpu-quota", "-1", container_name(prefix, node, segment))


def list_containers(prefix: str, node: str | None = None, role: str | None = None) -> list[str]:
    """Names of our containers (by label, then checked against the name prefix)."""
    filters = ["--filter", f"label={LABEL_TESTBED}={prefix}"]
    if node is not None:
        filters += ["--filter", f"label={LABEL_NODE}={node}"]
    if role is not None:
        filters += ["--filter", f"label={LABEL_ROLE}={role}"]
    out = docker("ps", "-a", *filters, "--format", "{{.Names}}")
    return sorted(n for n in out.split() if n.startswith(f"{prefix}-"))


def container_state(name: str) -> str:
    """ "running", "paused", "exited", ... or "missing"."""
    out = docker("inspect", "-f", "{{.State.Status}}", name, check=False).strip()
    return out or "missing"


def container_states(prefix: str) -> dict[str, str]:
    """State of every container of the testbed in one docker call (the monitor runs every second)."""
    out = docker(
        "ps", "-a", "--filter", f"label={LABEL_TESTBED}={prefix}", "--format", "{{.Names}} {{.State}}"
    )
    return dict(line.split(maxsplit=1) for line in out.splitlines() if " " in line)


def pause_node(prefix: str, node: str) -> None:
    for name in list_containers(prefix, node):
        if container_state(name) == "running":
            docker("pause", name)


def unpause_node(prefix: str, node: str) -> None:
    for name in list_containers(prefix, node):
        if container_state(name) == "paused":
            docker("unpause", name)


def remove_containers(names: Sequence[str]) -> None:
    if names:
        docker("rm", "-f", *names, check=False, timeout_s=180)


def exec_in(name: str, command: Sequence[str], timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", "exec", name, *command], capture_output=True, text=True, timeout=timeout_s
    )


# ----------------------------------------------------------------------------------------------- load
class BackgroundLoad:
    """Busy-looping processes in ``<node cgroup>/load`` whose CFS quota is PCT % of the node's CPUs."""

    def __init__(self, cgroup: NodeCgroup, node_cpus: float) -> None:
        self.cgroup = cgroup
        self.node_cpus = node_cpus
        self.pct = 0.0
        self._procs: list[subprocess.Popen[bytes]] = []

    def set(self, pct: float) -> None:
        if not 0.0 <= pct <= 100.0:
            raise TestbedError(f"load must be within [0, 100] percent, got {pct}")
        self.stop()
        self.pct = pct
        if pct == 0.0:
            return
        path = self.cgroup.load_path()
        path.mkdir(exist_ok=True)
        (path / "cpu.shares").write_text(str(LOAD_CPU_SHARES))
        quota_us = max(1000, round(pct / 100.0 * self.node_cpus * CFS_PERIOD_US))
        (path / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
        (path / "cpu.cfs_quota_us").write_text(str(quota_us))
        # cpu and cpuacct are separate hierarchies here: join the load's cpu cgroup and the node's
        # `load` cpuacct child, so that the node's usage includes its background load and the load's
        # own share can be told apart from the segments' (the overload events use it).
        cpu_procs = path / "cgroup.procs"
        acct = self.cgroup.load_acct_path()
        acct.mkdir(exist_ok=True)
        acct_procs = acct / "cgroup.procs"
        script = (
            f'echo $$ > "{cpu_procs}" && echo $$ > "{acct_procs}" && exec /bin/sh -c "while :; do :; done"'
        )
        for _ in range(max(1, math.ceil(self.node_cpus))):
            # The shell moves itself into the cgroups before it starts spinning.
            proc = subprocess.Popen(
                ["/bin/sh", "-c", script],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            self._procs.append(proc)

    def stop(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=5)
        self._procs = []
        self.pct = 0.0
        path = self.cgroup.load_path()
        if path.is_dir():
            remove_cgroup_tree(path)
