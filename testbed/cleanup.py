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


@dataclass(frozen=True)
class Scope:
    """Which names are ours.

    Broad (``down --force``): everything whose name starts with the prefix, as promised to users.
    Exact (a daemon's own ``down``): only the names one testbed with this prefix creates, so that
    the daemon of prefix ``mecsplit`` never removes a concurrently running ``mecsplitt...`` testbed.
    """

    prefix: str
    exact: bool = False

    def _re(self, tail: str) -> re.Pattern[str]:
        return re.compile(rf"^{re.escape(self.prefix)}{tail}$")

    def container(self, name: str) -> bool:
        # Broad: the prefix "mecsplit" also takes the bench's and the tests' testbeds (mecsplitk-src, ...),
        # as it already did for their interfaces and cgroups.
        return name.startswith(f"{self.prefix}-" if self.exact else self.prefix)

    def interface(self, name: str) -> bool:
        # bridges <p>b<k>, their ports <p>b<k>p0/p1, the management bridge <p>m and its ports <p>m<i>
        return (
            bool(self._re(r"(b\d+(p[01])?|m\d*)").match(name)) if self.exact else name.startswith(self.prefix)
        )

    def cgroup(self, name: str) -> bool:
        return bool(self._re(r"-[a-z][a-z0-9]*").match(name)) if self.exact else name.startswith(self.prefix)

    def netns(self, name: str) -> bool:
        return not self.exact and name.startswith(self.prefix)

    def shell(self, arg: str) -> bool:
        name = arg.removeprefix("mininet:")
        return arg.startswith("mininet:") and (
            self.container(name) or self.interface(name) if self.exact else name.startswith(self.prefix)
        )

    def iptables_line(self, line: str) -> bool:
        """A rule whose comment is the prefix, or whose in/out interface, chain or target is ours."""
        if line.startswith(":"):
            return not self.exact and line[1:].startswith(self.prefix)
        words = line.replace('"', "").split()
        for flag, value in itertools.pairwise(words):
            if flag == "--comment" and (
                value == self.prefix or (not self.exact and value.startswith(self.prefix))
            ):
                return True
            if flag in ("-i", "-o") and self.interface(value):
                return True
            if flag in ("-A", "-j") and not self.exact and value.startswith(self.prefix):
                return True
        return False


def find_containers(scope: Scope) -> list[str]:
    p = scope.prefix
    by_label = _out(
        ["docker", "ps", "-a", "--filter", f"label={LABEL_TESTBED}={p}", "--format", "{{.Names}}"]
    )
    by_name = (
        ""
        if scope.exact
        else _out(["docker", "ps", "-a", "--filter", f"name=^{p}", "--format", "{{.Names}}"])
    )
    return sorted({n for n in by_label.split() + by_name.split() if scope.container(n)})


def find_netns(scope: Scope) -> list[str]:
    names = [line.split()[0] for line in _out(["ip", "netns", "list"]).splitlines() if line.strip()]
    return sorted(n for n in names if scope.netns(n))


def find_links(scope: Scope) -> list[str]:
    data = json.loads(_out(["ip", "-j", "link", "show"]) or "[]")
    return sorted(str(d["ifname"]) for d in data if scope.interface(str(d.get("ifname", ""))))


def find_iptables(scope: Scope) -> list[str]:
    """Our rules and chains, as ``table: line`` of iptables-save."""
    found = []
    for table in IPTABLES_TABLES:
        for line in _out(["iptables-save", "-t", table]).splitlines():
            if not line.startswith("#") and scope.iptables_line(line):
                found.append(f"{table}: {line}")
    return found


def find_shells(scope: Scope) -> list[int]:
    """Mininet node shells of our topology (``bash ... mininet:<prefix>...``) left by a killed daemon."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(scope.shell(a.decode(errors="replace")) for a in argv):
            pids.append(int(proc.name))
    return sorted(pids)


def find_cgroups(scope: Scope) -> list[Path]:
    if not CGROUP_ROOT.is_dir():
        return []
    found = []
    for controller in sorted(CGROUP_ROOT.iterdir()):
        if controller.is_dir() and not controller.is_symlink():
            found += sorted(p for p in controller.iterdir() if p.is_dir() and scope.cgroup(p.name))
    return found


def _netns_inode(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def find_netns_processes(scope: Scope) -> list[int]:
    """Processes inside our node containers' network namespaces (shapers, probes, shells, segments)."""
    inodes = set()
    for name in find_containers(scope):
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


def survey(prefix: str, run_dir: Path | None = None, *, exact: bool = False) -> Leftovers:
    scope = Scope(prefix, exact)
    return Leftovers(
        containers=find_containers(scope),
        netns=find_netns(scope),
        links=find_links(scope),
        iptables=find_iptables(scope),
        cgroups=[str(p) for p in find_cgroups(scope)],
        processes=(find_daemon(run_dir) if run_dir is not None else []) + find_shells(scope),
    )


def _kill_daemon(pid: int, timeout_s: float = 10.0) -> None:
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _is_our_daemon(pid):
        time.sleep(0.1)
    if _is_our_daemon(pid):
        os.kill(pid, signal.SIGKILL)


def _delete_iptables(scope: Scope) -> None:
    for table in IPTABLES_TABLES:
        dump = _out(["iptables-save", "-t", table]).splitlines()
        ours = [ln for ln in dump if scope.iptables_line(ln)]
        chains = [ln[1:].split()[0] for ln in ours if ln.startswith(":")]
        # Rules first (this includes jumps into our chains), then our chains, emptied and deleted.
        for line in ours:
            if line.startswith("-A ") and line.split()[1] not in chains:
                subprocess.run(["iptables", "-w", "-t", table, "-D", *line[3:].split()], capture_output=True)
        for chain in chains:
            subprocess.run(["iptables", "-w", "-t", table, "-F", chain], capture_output=True)
        for chain in chains:
            subprocess.run(["iptables", "-w", "-t", table, "-X", chain], capture_output=True)


def teardown(prefix: str, run_dir: Path | None = None, *, exact: bool = False) -> Leftovers:
    """Remove what is ours (see :class:`Scope`); returns what is still left (empty on success)."""
    if not re.fullmatch(r"[a-z][a-z0-9]{3,}", prefix):
        raise ValueError(f"refusing to clean up with prefix {prefix!r}: it must be a plain name of 4+ chars")
    scope = Scope(prefix, exact)
    if run_dir is not None:
        for pid in find_daemon(run_dir):
            _kill_daemon(pid)
    for pid in find_shells(scope) + find_netns_processes(scope):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    containers = find_containers(scope)
    if containers:
        docker("rm", "-f", *containers, check=False, timeout_s=180)
    for ns in find_netns(scope):
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
    # Bridges first (their ports go with the veths), then whatever interfaces remain.
    for name in sorted(find_links(scope), key=len):
        subprocess.run(["ip", "link", "delete", name], capture_output=True)
    _delete_iptables(scope)
    for path in find_cgroups(scope):
        remove_cgroup_tree(path)
    if run_dir is not None:
        for name in ("daemon.pid", "state.json"):
            (run_dir / name).unlink(missing_ok=True)
        # The delay shapers' control files and logs (testbed.link.DirectionShaper: "<prefix>-<dev>.…").
        for path in run_dir.glob(f"{prefix}-*.delay.*"):
            path.unlink(missing_ok=True)
    return survey(prefix, run_dir, exact=exact)
