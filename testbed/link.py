"""Shaping of emulated links with tc: rate with HTB (changed in place), delay and loss with netem or NFQUEUE.

Rate: an HTB root qdisc with one class that all traffic falls into (``default``). A new rate is a
``tc class change`` of that class, which takes effect at once and never leaves the link unshaped;
rebuilding the qdisc (what Mininet's ``intf.config(bw=...)`` does) opens a short unshaped gap.

Delay and loss, one direction of a link (``tx`` sends, ``rx`` receives):

* where the kernel has netem (:func:`netem_available`), a netem qdisc under the HTB class on ``tx``;
* otherwise (this project's CI kernel has no netem) an iptables chain in ``rx``'s namespace, hooked into
  ``mangle PREROUTING`` for the receiving interface (so it sees forwarded packets too), that drops with
  ``-m statistic --mode random`` and hands the rest to an NFQUEUE served by :mod:`testbed.shaper`, which
  holds each packet for the delay. The chain carries the project prefix so cleanup can find it.

Every function takes the namespace as a :class:`Netns` (``ip netns`` name, a process's PID for
``nsenter``, or the root namespace), so the same code shapes a bridge port on the host and a veth inside a
node container.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_PREFIX = "mecsplit"
HTB_CLASS = "1:10"
# Queue of a shaped direction, in seconds at its rate (at least QUEUE_MIN_PACKETS): deep enough for TCP to
# fill the link at 100 ms RTT, shallow enough that a flow cannot build seconds of queueing delay the way a
# fixed 1000-packet queue does at 1 Mbit/s (12 s). Resized with every rate change.
QUEUE_S = 0.5
QUEUE_MIN_PACKETS = 64
FRAME_BYTES = 1514
# Burst of the HTB class: the larger of 2 ms at the rate and one full frame. tc's default (rate/HZ + MTU)
# undershoots at high rates on tickless kernels, where HTB's timer fires late and each wake-up must be
# allowed to send what accrued; 2 ms keeps the short-term overshoot under the delays we emulate. The floor
# is one frame, not more: at cellular-outage rates a larger floor is itself a long overshoot (four frames
# at 0.1 Mbit/s are 0.48 s of the link's time), and a split model's per-token message (a few KiB) would
# cross a 0.4 Mbit/s link at line rate instead of taking the 50 ms the rate says.
BURST_S = 0.002
MIN_BURST_BYTES = 1514
SHAPER_READY_TIMEOUT_S = 10.0

DelayMode = Literal["auto", "netem", "nfqueue"]


class ShapingError(RuntimeError):
    """A tc/iptables/shaper operation failed; the message holds the command and what it printed."""


class LinkShape(BaseModel):
    """How one direction of a link behaves: rate, one-way delay, random loss."""

    model_config = ConfigDict(frozen=True)

    bw_mbit: float = Field(gt=0, le=100_000)
    delay_ms: float = Field(default=0.0, ge=0, le=60_000)
    loss_pct: float = Field(default=0.0, ge=0, lt=100)


@dataclass(frozen=True)
class Netns:
    """A network namespace to run commands in: by ``ip netns`` name, by a process's PID, or the root one."""

    name: str | None = None
    pid: int | None = None

    def __post_init__(self) -> None:
        if self.name is not None and self.pid is not None:
            raise ValueError("give a netns name or a pid, not both")

    def wrap(self, argv: Sequence[str]) -> list[str]:
        if self.name is not None:
            return ["ip", "netns", "exec", self.name, *argv]
        if self.pid is not None:
            return ["nsenter", "-t", str(self.pid), "-n", *argv]
        return list(argv)

    def __str__(self) -> str:
        return self.name or (f"pid:{self.pid}" if self.pid is not None else "root")


ROOT_NS = Netns()


def run_in(ns: Netns, argv: Sequence[str], *, check: bool = True, input_text: str | None = None) -> str:
    """Run ``argv`` inside ``ns`` and return its stdout; :class:`ShapingError` names a failed command."""
    cmd = ns.wrap(argv)
    proc = subprocess.run(cmd, capture_output=True, text=True, input=input_text, timeout=30)
    if check and proc.returncode != 0:
        raise ShapingError(f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


# ------------------------------------------------------------------------------------------ rate (HTB)


def htb_burst_bytes(bw_mbit: float) -> int:
    return max(MIN_BURST_BYTES, int(bw_mbit * 1e6 / 8 * BURST_S))


def _rate_args(bw_mbit: float) -> list[str]:
    # tc takes "kbit" as 1000 bit/s; kbit keeps sub-Mbit/s trace rates exact.
    rate = f"{round(bw_mbit * 1000)}kbit"
    burst = str(htb_burst_bytes(bw_mbit))
    return ["rate", rate, "ceil", rate, "burst", burst, "cburst", burst, "quantum", "1514"]


def has_htb(ns: Netns, dev: str) -> bool:
    out = run_in(ns, ["tc", "class", "show", "dev", dev, "classid", HTB_CLASS])
    return "htb" in out


def queue_limit_packets(bw_mbit: float, delay_ms: float = 0.0) -> int:
    """Leaf queue length: QUEUE_S of traffic at the rate, plus what is in flight in a netem delay line."""
    in_flight_s = QUEUE_S + delay_ms / 1000
    return max(QUEUE_MIN_PACKETS, math.ceil(bw_mbit * 1e6 / 8 * in_flight_s / FRAME_BYTES))


def set_rate(ns: Netns, dev: str, bw_mbit: float, *, leaf: bool = True) -> None:
    """Shape ``dev``'s egress to ``bw_mbit``: install HTB the first time, change the class in place after.

    ``leaf``: also size the pfifo under the class (:func:`queue_limit_packets`); pass False when a netem
    leaf sits there (:func:`set_netem` sizes that one).
    """
    if bw_mbit <= 0:
        raise ShapingError(f"rate must be > 0 Mbit/s, got {bw_mbit} (floor trace outages, see testbed.trace)")
    klass = ["parent", "1:", "classid", HTB_CLASS, "htb", *_rate_args(bw_mbit)]
    if has_htb(ns, dev):
        run_in(ns, ["tc", "class", "change", "dev", dev, *klass])
    else:
        run_in(ns, ["tc", "qdisc", "replace", "dev", dev, "root", "handle", "1:", "htb", "default", "10"])
        run_in(ns, ["tc", "class", "add", "dev", dev, *klass])
    if leaf:
        # replace with the same kind and handle changes the queue in place, keeping the queued packets.
        limit = str(queue_limit_packets(bw_mbit))
        run_in(ns, ["tc", "qdisc", "replace", "dev", dev, "parent", HTB_CLASS, "handle", "10:", "pfifo",
                    "limit", limit])  # fmt: skip


def get_rate_mbit(ns: Netns, dev: str) -> float | None:
    """The rate of ``dev``'s HTB class as the kernel reports it, or None when unshaped."""
    out = run_in(ns, ["tc", "class", "show", "dev", dev, "classid", HTB_CLASS])
    match = re.search(r"\brate (\d+(?:\.\d+)?)([KMG]?)bit", out)
    if match is None:
        return None
    scale = {"": 1e-6, "K": 1e-3, "M": 1.0, "G": 1e3}[match.group(2)]
    return float(match.group(1)) * scale


def clear_egress(ns: Netns, dev: str) -> None:
    """Remove every qdisc from ``dev``'s egress (back to the kernel default); no error when none is set."""
    run_in(ns, ["tc", "qdisc", "del", "dev", dev, "root"], check=False)


def set_ingress_rate(ns: Netns, dev: str, ifb: str, bw_mbit: float) -> None:
    """Shape what ``dev`` *receives*: redirect its ingress to IFB device ``ifb`` and shape that one's egress.

    ``ifb`` is created in ``ns`` when missing; give it the project prefix so cleanup removes it.
    """
    if not run_in(ns, ["ip", "-o", "link", "show", "dev", ifb], check=False).strip():
        run_in(ns, ["ip", "link", "add", "name", ifb, "type", "ifb"])
        run_in(ns, ["ip", "link", "set", "dev", ifb, "up"])
        run_in(ns, ["tc", "qdisc", "replace", "dev", dev, "handle", "ffff:", "ingress"])
        # u32 matching everything rather than matchall: kernels without CONFIG_NET_CLS_MATCHALL (this one)
        # still have u32.
        redirect = ["action", "mirred", "egress", "redirect", "dev", ifb]
        match_all = ["u32", "match", "u32", "0", "0"]
        run_in(
            ns,
            ["tc", "filter", "add", "dev", dev, "parent", "ffff:", "protocol", "all", *match_all, *redirect],
        )
    set_rate(ns, ifb, bw_mbit)


def clear_ingress(ns: Netns, dev: str, ifb: str) -> None:
    run_in(ns, ["tc", "qdisc", "del", "dev", dev, "ingress"], check=False)
    run_in(ns, ["ip", "link", "del", "dev", ifb], check=False)


# ----------------------------------------------------------------------------------- netem (if present)


@lru_cache(maxsize=1)
def netem_available() -> bool:
    """Whether this kernel has netem: try it on a veth pair made for the probe, then delete the pair.

    Needs root; without it (no pair can be made) the answer is False, and shaping needs root anyway.
    """
    probe = f"{DEFAULT_PREFIX}np{os.getpid() % 10000}"
    run_in(ROOT_NS, ["ip", "link", "add", probe, "type", "veth", "peer", "name", f"{probe}p"], check=False)
    if not run_in(ROOT_NS, ["ip", "-o", "link", "show", "dev", probe], check=False).strip():
        return False
    try:
        cmd = ["tc", "qdisc", "add", "dev", probe, "root", "netem", "delay", "1ms"]
        return subprocess.run(cmd, capture_output=True, timeout=10).returncode == 0
    finally:
        run_in(ROOT_NS, ["ip", "link", "del", probe], check=False)


def set_netem(ns: Netns, dev: str, bw_mbit: float, delay_ms: float, loss_pct: float) -> None:
    """netem under the HTB class of ``dev`` (call :func:`set_rate` first); replaces the leaf in place.

    ``bw_mbit`` sizes its queue: netem counts the packets in its delay line against its limit.
    """
    limit = str(queue_limit_packets(bw_mbit, delay_ms))
    args = ["delay", f"{delay_ms:.3f}ms", "loss", f"{loss_pct:.4f}%", "limit", limit]
    run_in(ns, ["tc", "qdisc", "replace", "dev", dev, "parent", HTB_CLASS, "handle", "10:", "netem", *args])


# ------------------------------------------------------------------------------ NFQUEUE fallback (rx)


def chain_name(dev: str, prefix: str = DEFAULT_PREFIX) -> str:
    """iptables chain of the delay/loss rules for packets received on ``dev`` (28 characters at most)."""
    name = f"{prefix}-{dev}"
    if len(name) > 28:
        raise ShapingError(f"iptables chain {name!r} is longer than 28 characters; shorten the prefix")
    return name


def ifindex(ns: Netns, dev: str) -> int:
    out = run_in(ns, ["ip", "-o", "link", "show", "dev", dev])
    return int(out.split(":", 1)[0])


def _chain_rules(chain: str, loss_pct: float, queue_num: int | None) -> str:
    """iptables-restore input (re)defining ``chain`` atomically: with --noflush, declaring it empties it."""
    lines = ["*mangle", f":{chain} - [0:0]"]
    if loss_pct > 0:
        lines.append(f"-A {chain} -m statistic --mode random --probability {loss_pct / 100:.6f} -j DROP")
    if queue_num is not None:
        # --queue-bypass: if the shaper is gone, packets pass undelayed instead of being dropped.
        lines.append(f"-A {chain} -j NFQUEUE --queue-num {queue_num} --queue-bypass")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def _hook_present(ns: Netns, dev: str, chain: str) -> bool:
    rules = run_in(ns, ["iptables", "-t", "mangle", "-S", "PREROUTING"])
    return f"-i {dev} -j {chain}" in rules


def set_rx_rules(ns: Netns, dev: str, chain: str, loss_pct: float, queue_num: int | None) -> None:
    """Install or replace (atomically) the drop and NFQUEUE rules for packets arriving on ``dev``."""
    run_in(ns, ["iptables-restore", "--noflush"], input_text=_chain_rules(chain, loss_pct, queue_num))
    if not _hook_present(ns, dev, chain):
        run_in(ns, ["iptables", "-t", "mangle", "-I", "PREROUTING", "1", "-i", dev, "-j", chain])


def clear_rx_rules(ns: Netns, dev: str, chain: str) -> None:
    """Remove the hook and the chain; no error when they are not there."""
    while _hook_present(ns, dev, chain):
        run_in(ns, ["iptables", "-t", "mangle", "-D", "PREROUTING", "-i", dev, "-j", chain])
    run_in(ns, ["iptables", "-t", "mangle", "-F", chain], check=False)
    run_in(ns, ["iptables", "-t", "mangle", "-X", chain], check=False)


def prefixed_chains(ns: Netns, prefix: str = DEFAULT_PREFIX) -> list[str]:
    """The mangle chains with ``prefix`` in ``ns`` (what a forced cleanup removes)."""
    out = run_in(ns, ["iptables", "-t", "mangle", "-S"], check=False)
    return sorted({m.group(1) for m in re.finditer(rf"^-N ({re.escape(prefix)}-\S+)$", out, re.M)})


def clear_prefixed_chains(ns: Netns, prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Remove every ``prefix`` chain of the mangle table in ``ns`` and the rules jumping to it."""
    chains = prefixed_chains(ns, prefix)
    out = run_in(ns, ["iptables", "-t", "mangle", "-S", "PREROUTING"], check=False)
    for line in out.splitlines():
        rule = line.split()
        if len(rule) > 2 and rule[0] == "-A" and rule[-2] == "-j" and rule[-1] in chains:
            run_in(ns, ["iptables", "-t", "mangle", "-D", *rule[1:]], check=False)
    for chain in chains:
        run_in(ns, ["iptables", "-t", "mangle", "-F", chain], check=False)
        run_in(ns, ["iptables", "-t", "mangle", "-X", chain], check=False)
    return chains


# Shapers this process started, so stopping one reaps it (no zombie, no ResourceWarning).
_CHILDREN: dict[int, subprocess.Popen[str]] = {}


def start_shaper(ns: Netns, queue_num: int, delay_ms: float, control: Path) -> int:
    """Start :mod:`testbed.shaper` in ``ns``; return its PID once it is bound to the queue.

    ``control`` is the JSON file it re-reads on SIGHUP (see :func:`update_shaper`); its stderr goes to
    ``control`` with the suffix ``.log``.
    """
    control.write_text(json.dumps({"delay_ms": delay_ms}))
    argv = [sys.executable, "-m", "testbed.shaper", "--queue-num", str(queue_num)]
    argv += ["--delay-ms", str(delay_ms), "--control", str(control)]
    log = control.with_suffix(".log")
    # nsenter/ip netns exec exec() the program, so the PID we get is the shaper's own.
    with log.open("w") as err:
        proc = subprocess.Popen(
            ns.wrap(argv), stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True
        )
    assert proc.stdout is not None
    line = proc.stdout.readline() if _readable(proc, time.monotonic() + SHAPER_READY_TIMEOUT_S) else ""
    proc.stdout.close()
    if not line.startswith('{"ready": true'):
        proc.kill()
        proc.wait(timeout=5)
        raise ShapingError(
            f"shaper did not start in {ns} ({log.read_text().strip()[-500:] or 'no output'}); "
            "install its binding with: pip install -e '.[nfqueue]' (needs libnetfilter-queue-dev)"
        )
    _CHILDREN[proc.pid] = proc
    return proc.pid


def _readable(proc: subprocess.Popen[str], deadline: float) -> bool:
    import select

    assert proc.stdout is not None
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready or proc.poll() is not None:
            return True
    return False


def update_shaper(pid: int, control: Path, delay_ms: float) -> None:
    """Change a running shaper's delay in place (it re-reads ``control`` on SIGHUP)."""
    tmp = control.with_suffix(".tmp")
    tmp.write_text(json.dumps({"delay_ms": delay_ms}))
    tmp.replace(control)  # atomic, so the shaper never reads a half-written file
    os.kill(pid, signal.SIGHUP)


def stop_shaper(pid: int, timeout_s: float = 5.0) -> None:
    """Stop the shaper ``pid`` (SIGTERM: it delivers what it holds), SIGKILL if it does not exit in time."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    while _alive(pid):
        time.sleep(0.02)


def _alive(pid: int) -> bool:
    child = _CHILDREN.get(pid)
    if child is not None:
        if child.poll() is None:
            return True
        del _CHILDREN[pid]
        return False
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass  # not our child (started by an earlier daemon): fall back to probing it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


# ------------------------------------------------------------------------------ one direction of a link


class DirectionState(BaseModel):
    """What a :class:`DirectionShaper` created, as JSON, so a later process can clean it up."""

    model_config = ConfigDict(frozen=True)

    tx_ns: str
    tx_dev: str
    rx_ns: str
    rx_dev: str
    mode: Literal["netem", "nfqueue"]
    chain: str | None = None
    shaper_pid: int | None = None


def _resolve_mode(mode: DelayMode) -> Literal["netem", "nfqueue"]:
    if mode == "auto":
        return "netem" if netem_available() else "nfqueue"
    return mode


class DirectionShaper:
    """One direction of a link: rate on ``tx``'s egress; delay and loss with netem on ``tx`` or at ``rx``.

    :meth:`apply` installs the shape the first time and changes it in place afterwards (HTB class change,
    netem replace, atomic iptables chain replace, shaper SIGHUP). :meth:`close` removes what it added.
    ``rx_dev`` must be the interface where the packets end or are routed (a node's interface), not a bridge
    port: bridged packets do not pass that namespace's PREROUTING.
    """

    def __init__(
        self,
        tx: Netns,
        tx_dev: str,
        rx: Netns,
        rx_dev: str,
        *,
        mode: DelayMode = "auto",
        prefix: str = DEFAULT_PREFIX,
        state_dir: Path | None = None,
    ) -> None:
        self.tx, self.tx_dev, self.rx, self.rx_dev = tx, tx_dev, rx, rx_dev
        self.mode = _resolve_mode(mode)
        self.chain = chain_name(rx_dev, prefix)
        self.state_dir = state_dir or Path(tempfile.gettempdir())
        self.shape: LinkShape | None = None
        self.shaper_pid: int | None = None
        self._queue_num: int | None = None

    @property
    def control_file(self) -> Path:
        return self.state_dir / f"{self.chain}.{self.rx}.delay.json".replace(":", "_")

    def apply(self, shape: LinkShape) -> None:
        set_rate(self.tx, self.tx_dev, shape.bw_mbit, leaf=self.mode != "netem")
        if self.mode == "netem":
            if shape != self.shape:
                set_netem(self.tx, self.tx_dev, shape.bw_mbit, shape.delay_ms, shape.loss_pct)
        else:
            self._apply_nfqueue(shape)
        self.shape = shape

    def _apply_nfqueue(self, shape: LinkShape) -> None:
        if shape.delay_ms > 0 and self.shaper_pid is None:
            self._queue_num = ifindex(self.rx, self.rx_dev)
            self.shaper_pid = start_shaper(self.rx, self._queue_num, shape.delay_ms, self.control_file)
        elif (
            shape.delay_ms > 0
            and self.shaper_pid is not None
            and (self.shape is None or self.shape.delay_ms != shape.delay_ms)
        ):
            update_shaper(self.shaper_pid, self.control_file, shape.delay_ms)
        queue = self._queue_num if shape.delay_ms > 0 else None
        if shape.loss_pct > 0 or queue is not None:
            set_rx_rules(self.rx, self.rx_dev, self.chain, shape.loss_pct, queue)
        else:
            clear_rx_rules(self.rx, self.rx_dev, self.chain)
        if shape.delay_ms == 0 and self.shaper_pid is not None:
            # Rules first (they no longer feed the queue), then the process: no packet is left unserved.
            stop_shaper(self.shaper_pid)
            self.shaper_pid = None

    def state(self) -> DirectionState:
        return DirectionState(
            tx_ns=str(self.tx),
            tx_dev=self.tx_dev,
            rx_ns=str(self.rx),
            rx_dev=self.rx_dev,
            mode=self.mode,
            chain=self.chain if self.mode == "nfqueue" else None,
            shaper_pid=self.shaper_pid,
        )

    def close(self) -> None:
        """Remove the rate, delay and loss this direction added (idempotent)."""
        if self.mode == "nfqueue":
            clear_rx_rules(self.rx, self.rx_dev, self.chain)
            if self.shaper_pid is not None:
                stop_shaper(self.shaper_pid)
                self.shaper_pid = None
            self.control_file.unlink(missing_ok=True)
            self.control_file.with_suffix(".log").unlink(missing_ok=True)
        clear_egress(self.tx, self.tx_dev)
        self.shape = None
