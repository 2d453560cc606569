"""Teardown of everything the testbed created, and only that, also after its daemon was SIGKILLed.

Everything the testbed creates carries its prefix (``Settings().testbed.prefix``, default ``mecsplit``):
containers (also labelled ``mecsplit.testbed=<prefix>``), interfaces and bridges, network namespaces,
iptables rules (comment ``mecsplit``) and chains, cgroups, and the daemon's state files. This module finds
them by that prefix on the live system, not from a record the daemon may not have written, and removes
nothing whose name does not start with it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from testbed.node import CGROUP_ROOT, LABEL_TESTBED, docker, remove_cgroup_tree

IPTABLES_TABLES = ("filter", "mangle", "raw", "nat")


@dataclass
class Leftovers:
    """What carries the prefix on this machine (the test of a clean teardown asserts it is empty)."""

    containers: list[str] = field(default_factory=list)
    netns: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    iptables: list[str] = field(default_factory=list)
    cgroups: list[str] = field(default_factory=list)
    processes: list[int] = field(default_factory=list)

    def empty(self) -> bool:
        return not any((self.containers, self.netns, self.links, self.iptables, self.cgroups, self.processes))

    def as_dict(self) -> dict[str, list[str] | list[int]]:
        return {
            "containers": self.containers,
            "netns": self.netns,
            "links": self.links,
            "iptables": self.iptables,
            "cgroups": self.cgroups,
            "processes": self.processes,
        }


def _out(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    return proc.stdout if proc.returncode == 0 else ""


def find_containers(prefix: str) -> list[str]:
    by_label = _out(
        ["docker", "ps", "-a", "--filter", f"label={LABEL_TESTBED}={prefix}", "--format", "{{.Names}}"]
    ).split()
    by_name = _out(["docker", "ps", "-a", "--filter", f"name=^{prefix}-", "--format", "{{.Names}}"]).split()
    return sorted({n for n in by_label + by_name if n.startswith(f"{prefix}-")})


def find_netns(prefix: str) -> list[str]:
    names = [line.split()[0] for line in _out(["ip", "netns", "list"]).splitlines() if line.strip()]
    return sorted(n for n in names if n.startswith(prefix))


def find_links(prefix: str) -> list[str]:
    data = json.loads(_out(["ip", "-j", "link", "show"]) or "[]")
    return sorted(str(d["ifname"]) for d in data if str(d.get("ifname", "")).startswith(prefix))


def _iptables_line_is_ours(line: str, prefix: str) -> bool:
    words = line.replace('"', "").split()
    if line.startswith(f":{prefix}"):
        return True
    pairs = itertools.pairwise(words)
    return any((a in ("--comment", "-A", "-j")) and b.startswith(prefix) for a, b in pairs)


def find_iptables(prefix: str) -> list[str]:
    """Rules whose comment, chain or target carries the prefix, as ``table: rule`` lines."""
    found = []
    for table in IPTABLES_TABLES:
        for line in _out(["iptables-save", "-t", table]).splitlines():
            if _iptables_line_is_ours(line, prefix):
                found.append(f"{table}: {line}")
    return found


def find_shells(prefix: str) -> list[int]:
    """Mininet node shells of our topology (``bash ... mininet:<prefix>...``) left by a killed daemon."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.startswith(f"mininet:{prefix}".encode()) for a in argv):
            pids.append(int(proc.name))
    return sorted(pids)


def find_cgroups(prefix: str) -> list[Path]:
    if not CGROUP_ROOT.is_dir():
        return []
    found = []
    for controller in sorted(CGROUP_ROOT.iterdir()):
        if controller.is_dir():
            found += sorted(p for p in controller.glob(f"{prefix}*") if p.is_dir())
    return found


def _netns_inode(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def find_netns_processes(prefix: str) -> list[int]:
    """Processes inside our node containers' network namespaces (shapers, probes, shells, segments)."""
    inodes = set()
    for name in find_containers(prefix):
        pid = _out(["docker", "inspect", "-f", "{{.State.Pid}}", name]).strip()
        if pid.isdigit() and int(pid) > 0:
            ino = _netns_inode(int(pid))
            if ino is not None:
                inodes.add(ino)
    inodes.discard(_netns_inode(1))  # never the host's namespace, whatever docker reports
    if not inodes:
        return []
    return sorted(
        int(p.name)
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and _netns_inode(int(p.name)) in inodes
    )


def pid_file(run_dir: Path) -> Path:
    return run_dir / "daemon.pid"


def find_daemon(run_dir: Path) -> list[int]:
    path = pid_file(run_dir)
    if not path.exists():
        return []
    try:
        pid = int(path.read_text().split()[0])
    except (ValueError, IndexError):
        return []
    return [pid] if _is_our_daemon(pid) else []


def _is_our_daemon(pid: int) -> bool:
    """The PID file may be stale and the PID reused: check that it is a testbed daemon process."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"testbed.daemon" in cmdline


def survey(prefix: str, run_dir: Path | None = None) -> Leftovers:
    return Leftovers(
        containers=find_containers(prefix),
        netns=find_netns(prefix),
        links=find_links(prefix),
        iptables=find_iptables(prefix),
        cgroups=[str(p) for p in find_cgroups(prefix)],
        processes=(find_daemon(run_dir) if run_dir is not None else []) + find_shells(prefix),
    )


def _kill_daemon(pid: int, timeout_s: float = 10.0) -> None:
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _is_our_daemon(pid):
        time.sleep(0.1)
    if _is_our_daemon(pid):
        os.kill(pid, signal.SIGKILL)


def _delete_iptables(prefix: str) -> None:
    for table in IPTABLES_TABLES:
        dump = _out(["iptables-save", "-t", table])
        for line in dump.splitlines():
            if line.startswith("-A ") and f"--comment {prefix}" in line.replace('"', ""):
                args = line[3:].split()
                subprocess.run(["iptables", "-w", "-t", table, "-D", *args], capture_output=True)
        # Chains named with the prefix: flush, drop references, delete.
        chains = [ln[1:].split()[0] for ln in dump.splitlines() if ln.startswith(f":{prefix}")]
        for chain in chains:
            for line in dump.splitlines():
                if line.startswith("-A ") and f"-j {chain}" in line and not line.startswith(f"-A {chain} "):
                    subprocess.run(
                        ["iptables", "-w", "-t", table, "-D", *line[3:].split()], capture_output=True
                    )
            subprocess.run(["iptables", "-w", "-t", table, "-F", chain], capture_output=True)
        for chain in chains:
            subprocess.run(["iptables", "-w", "-t", table, "-X", chain], capture_output=True)


def teardown(prefix: str, run_dir: Path | None = None) -> Leftovers:
    """Remove everything with the prefix; returns what is still left (empty on success)."""
    if not re.fullmatch(r"[a-z][a-z0-9]{3,}", prefix):
        raise ValueError(f"refusing to clean up with prefix {prefix!r}: it must be a plain name of 4+ chars")
    if run_dir is not None:
        for pid in find_daemon(run_dir):
            _kill_daemon(pid)
    for pid in find_shells(prefix) + find_netns_processes(prefix):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    containers = find_containers(prefix)
    if containers:
        docker("rm", "-f", *containers, check=False, timeout_s=180)
    for ns in find_netns(prefix):
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
    # Bridges first (their ports go with the veths), then whatever interfaces remain.
    for name in find_links(prefix):
        subprocess.run(["ip", "link", "delete", name], capture_output=True)
    _delete_iptables(prefix)
    for path in find_cgroups(prefix):
        remove_cgroup_tree(path)
    if run_dir is not None:
        for name in ("daemon.pid", "state.json"):
            (run_dir / name).unlink(missing_ok=True)
    return survey(prefix, run_dir)
