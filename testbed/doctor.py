"""What this machine offers the emulated testbed, and the command that fixes what it lacks.

Every kernel feature is tried for real, inside a throw-away network namespace named with the project
prefix (deleted afterwards), so a check never touches the host's own interfaces or firewall rules.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from pydantic import BaseModel, ConfigDict

from testbed.link import DEFAULT_PREFIX

SETUP = "make setup  (runs scripts/setup-system.sh)"


class Check(BaseModel):
    """One capability: whether it works here, whether the emulated testbed needs it, how to get it."""

    model_config = ConfigDict(frozen=True)

    name: str
    ok: bool
    required: bool
    detail: str
    fix: str = ""


def _run(argv: Sequence[str], timeout_s: float = 20) -> tuple[bool, str]:
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s)
    except FileNotFoundError:
        return False, f"{argv[0]} not found"
    except subprocess.TimeoutExpired:
        return False, f"{' '.join(argv)} timed out after {timeout_s:.0f} s"
    return proc.returncode == 0, (proc.stderr or proc.stdout).strip()


@contextmanager
def _probe_netns(prefix: str) -> Iterator[str | None]:
    """A fresh namespace for kernel probes (None without root); always deleted on exit."""
    name = f"{prefix}-doctor-{os.getpid()}"
    ok, _ = _run(["ip", "netns", "add", name])
    try:
        yield name if ok else None
    finally:
        if ok:
            _run(["ip", "netns", "del", name])


def _in(ns: str, *argv: str) -> tuple[bool, str]:
    return _run(["ip", "netns", "exec", ns, *argv])


def check_root() -> Check:
    ok = os.geteuid() == 0
    return Check(
        name="root",
        ok=ok,
        required=True,
        detail="running as root" if ok else f"running as uid {os.geteuid()}",
        fix="" if ok else "run as root (sudo -E .venv/bin/mecsplit ...); without root use the local backend",
    )


def check_docker() -> Check:
    if shutil.which("docker") is None:
        return Check(
            name="docker engine",
            ok=False,
            required=True,
            detail="no docker client",
            fix=f"apt-get install -y docker.io, then {SETUP}",
        )
    ok, out = _run(["docker", "version", "-f", "{{.Server.Version}}"])
    return Check(
        name="docker engine",
        ok=ok,
        required=True,
        detail=f"server {out}" if ok else f"no engine answers: {out.splitlines()[-1] if out else ''}",
        fix=""
        if ok
        else "start it: setsid nohup dockerd >/var/log/mecsplit-dockerd.log 2>&1 & "
        f"(or systemctl start docker, or {SETUP})",
    )


def check_mininet() -> Check:
    has_module = importlib.util.find_spec("mininet") is not None
    has_mnexec = shutil.which("mnexec") is not None
    ok = has_module and has_mnexec
    detail = f"python module: {'yes' if has_module else 'no'}, mnexec: {'yes' if has_mnexec else 'no'}"
    return Check(
        name="mininet + mnexec",
        ok=ok,
        required=True,
        detail=detail,
        fix=""
        if ok
        else "apt-get install -y mininet bridge-utils (mnexec) and pip install -e '.' "
        "(mininet python module)",
    )


def _probe(name: str, required: bool, fix: str, ns: str | None, steps: Sequence[Sequence[str]]) -> Check:
    if ns is None:
        return Check(
            name=name,
            ok=False,
            required=required,
            detail="not checked: needs root",
            fix="run the doctor as root",
        )
    for step in steps:
        ok, out = _in(ns, *step)
        if not ok:
            return Check(name=name, ok=False, required=required, detail=f"`{' '.join(step)}`: {out}", fix=fix)
    return Check(name=name, ok=True, required=required, detail="works")


def _kernel_checks(prefix: str) -> list[Check]:
    veth = ["ip", "link", "add", f"{prefix}d0", "type", "veth", "peer", "name", f"{prefix}d1"]
    with _probe_netns(prefix) as ns:
        checks = [
            _probe(
                "veth + Linux bridge",
                True,
                "modprobe veth bridge (kernel CONFIG_VETH, CONFIG_BRIDGE)",
                ns,
                [
                    veth,
                    ["ip", "link", "add", f"{prefix}br", "type", "bridge"],
                    ["ip", "link", "set", f"{prefix}d0", "master", f"{prefix}br"],
                ],
            ),
            _probe(
                "tc htb",
                True,
                "apt-get install -y iproute2; kernel needs CONFIG_NET_SCH_HTB",
                ns,
                [
                    [
                        "tc",
                        "qdisc",
                        "add",
                        "dev",
                        f"{prefix}d1",
                        "root",
                        "handle",
                        "1:",
                        "htb",
                        "default",
                        "10",
                    ],
                    [
                        "tc",
                        "class",
                        "add",
                        "dev",
                        f"{prefix}d1",
                        "parent",
                        "1:",
                        "classid",
                        "1:10",
                        "htb",
                        "rate",
                        "10mbit",
                    ],
                    [
                        "tc",
                        "class",
                        "change",
                        "dev",
                        f"{prefix}d1",
                        "parent",
                        "1:",
                        "classid",
                        "1:10",
                        "htb",
                        "rate",
                        "2mbit",
                    ],
                ],
            ),
            _probe(
                "ifb (ingress shaping)",
                False,
                "modprobe ifb act_mirred cls_u32 (kernel CONFIG_IFB, CONFIG_NET_ACT_MIRRED)",
                ns,
                [
                    ["ip", "link", "add", f"{prefix}ifb", "type", "ifb"],
                    ["tc", "qdisc", "add", "dev", f"{prefix}d0", "handle", "ffff:", "ingress"],
                    [
                        "tc",
                        "filter",
                        "add",
                        "dev",
                        f"{prefix}d0",
                        "parent",
                        "ffff:",
                        "protocol",
                        "all",
                        "u32",
                        "match",
                        "u32",
                        "0",
                        "0",
                        "action",
                        "mirred",
                        "egress",
                        "redirect",
                        "dev",
                        f"{prefix}ifb",
                    ],
                ],
            ),
            _probe(
                "netem",
                False,
                "modprobe sch_netem (Debian/Ubuntu: apt-get install -y linux-modules-extra-$(uname -r)); "
                "without it delay and loss use the NFQUEUE shaper",
                ns,
                [["tc", "qdisc", "add", "dev", f"{prefix}d0", "root", "netem", "delay", "1ms"]],
            ),
            _probe(
                "iptables statistic (loss)",
                True,
                "apt-get install -y iptables (xt_statistic)",
                ns,
                [
                    ["iptables", "-t", "mangle", "-N", f"{prefix}-doc"],
                    [
                        "iptables",
                        "-t",
                        "mangle",
                        "-A",
                        f"{prefix}-doc",
                        "-m",
                        "statistic",
                        "--mode",
                        "random",
                        "--probability",
                        "0.5",
                        "-j",
                        "DROP",
                    ],
                ],
            ),
            _probe(
                "NFQUEUE target",
                False,
                "modprobe nfnetlink_queue xt_NFQUEUE",
                ns,
                [
                    [
                        "iptables",
                        "-t",
                        "mangle",
                        "-A",
                        f"{prefix}-doc",
                        "-j",
                        "NFQUEUE",
                        "--queue-num",
                        "7",
                        "--queue-bypass",
                    ]
                ],
            ),
        ]
    return checks


def check_nfqueue_binding() -> Check:
    ok = importlib.util.find_spec("netfilterqueue") is not None
    return Check(
        name="netfilterqueue python binding",
        ok=ok,
        required=False,
        detail="importable" if ok else "not installed",
        fix=""
        if ok
        else "apt-get install -y libnetfilter-queue-dev && .venv/bin/pip install -e '.[nfqueue]'",
    )


def _delay_check(checks: Sequence[Check]) -> Check:
    """Delay and loss need netem, or else the NFQUEUE target and its python binding."""
    by_name = {c.name: c for c in checks}
    netem = by_name["netem"].ok
    nfq = by_name["NFQUEUE target"].ok and by_name["netfilterqueue python binding"].ok
    if netem:
        return Check(name="link delay/loss", ok=True, required=True, detail="netem")
    if nfq:
        return Check(
            name="link delay/loss",
            ok=True,
            required=True,
            detail="NFQUEUE user-space shaper (no netem in this kernel)",
        )
    return Check(
        name="link delay/loss",
        ok=False,
        required=True,
        detail="neither netem nor NFQUEUE works",
        fix="fix the netem or the NFQUEUE checks above",
    )


def run_checks(prefix: str = DEFAULT_PREFIX) -> list[Check]:
    checks: list[Check] = [check_root(), check_docker(), check_mininet()]
    tools: list[tuple[str, Callable[[], bool], str]] = [
        ("nsenter", lambda: shutil.which("nsenter") is not None, "apt-get install -y util-linux"),
        ("iptables", lambda: shutil.which("iptables") is not None, "apt-get install -y iptables"),
        ("tc", lambda: shutil.which("tc") is not None, "apt-get install -y iproute2"),
    ]
    for name, present, fix in tools:
        ok = present()
        checks.append(
            Check(name=name, ok=ok, required=True, detail="found" if ok else "missing", fix="" if ok else fix)
        )
    checks += _kernel_checks(prefix)
    checks.append(check_nfqueue_binding())
    checks.append(_delay_check(checks))
    return checks
