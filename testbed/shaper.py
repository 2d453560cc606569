"""User-space packet delay for kernels without netem (the NFQUEUE fallback of the link shaping).

Run inside the *receiving* network namespace, bound to an NFQUEUE that an iptables rule feeds with the
packets arriving on one interface. Each packet is held for ``delay_ms`` and then accepted, in arrival
order (a constant delay keeps the order, so a FIFO of (due time, packet) is exact and cheaper than a heap).
The rate is untouched: the process holds packets instead of pacing them, so a link's throughput is still
set by HTB on the sender side. Delaying on the receiver's side matters: on the sender's OUTPUT chain the
held packets count against TCP small queues and throughput collapses (ENVIRONMENT.md measured ~2.3 of 10
Mbit/s); on ingress they do not.

One thread, one loop: ``select`` on the netlink socket with a timeout that ends when the oldest held
packet is due. ``SIGHUP`` re-reads the delay from the control file (a JSON object ``{"delay_ms": x}``)
so the delay changes in place; ``SIGTERM``/``SIGINT`` release every held packet and exit.

    python -m testbed.shaper --queue-num 5 --delay-ms 20 [--control FILE]

It prints one JSON line ``{"ready": true, "queue_num": N, "pid": P}`` once bound.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

# The queue holds the packets of one bandwidth-delay product; 100 Mbit/s x 200 ms is ~1700 full packets.
QUEUE_MAX_PACKETS = 16384
SOCKET_BUFFER_BYTES = 8 * 1024 * 1024


class Shaper:
    """Delay every packet of one NFQUEUE by a fixed, changeable delay."""

    def __init__(self, queue_num: int, delay_ms: float, control: Path | None) -> None:
        from netfilterqueue import COPY_META, NetfilterQueue

        self.delay_s = delay_ms / 1000.0
        self.control = control
        self.held: deque[tuple[float, Any]] = deque()
        self.stop = False
        self.reload = False
        self.nfq = NetfilterQueue()
        # COPY_META: the verdict needs only the packet id, so the payload is never copied to user space.
        self.nfq.bind(
            queue_num,
            self._on_packet,
            max_len=QUEUE_MAX_PACKETS,
            mode=COPY_META,
            sock_len=SOCKET_BUFFER_BYTES,
        )
        self.sock = socket.fromfd(self.nfq.get_fd(), socket.AF_NETLINK, socket.SOCK_RAW)
        # Signals write to this pipe, so a select() blocked with no packet held wakes up for them
        # (PEP 475 would otherwise retry the select after the handler ran).
        self.wake_r, wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)

    def _on_packet(self, packet: Any) -> None:
        self.held.append((time.monotonic() + self.delay_s, packet))

    def _release_due(self, now: float) -> None:
        held = self.held
        while held and held[0][0] <= now:
            held.popleft()[1].accept()

    def _reload_delay(self) -> None:
        self.reload = False
        if self.control is None:
            return
        data = json.loads(self.control.read_text())
        self.delay_s = float(data["delay_ms"]) / 1000.0

    def run(self) -> None:
        while not self.stop:
            if self.reload:
                self._reload_delay()
            timeout = None if not self.held else max(0.0, self.held[0][0] - time.monotonic())
            try:
                readable, _, _ = select.select([self.sock, self.wake_r], [], [], timeout)
            except InterruptedError:
                continue
            if self.wake_r in readable:
                _drain(self.wake_r)
            if self.sock in readable:
                self.nfq.run(block=False)
            self._release_due(time.monotonic())
        self.close()

    def close(self) -> None:
        # Deliver what is held rather than drop it: stopping the shaper must not look like packet loss.
        while self.held:
            self.held.popleft()[1].accept()
        self.nfq.unbind()
        self.sock.close()


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed.shaper", description=__doc__.split("\n")[0])
    parser.add_argument("--queue-num", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, required=True)
    parser.add_argument("--control", type=Path, default=None, help="JSON file re-read on SIGHUP")
    args = parser.parse_args(argv)
    if args.delay_ms < 0:
        parser.error("--delay-ms must be >= 0")
    shaper = Shaper(args.queue_num, args.delay_ms, args.control)

    def _stop(signum: int, frame: object) -> None:
        shaper.stop = True

    def _reload(signum: int, frame: object) -> None:
        shaper.reload = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGHUP, _reload)
    print(json.dumps({"ready": True, "queue_num": args.queue_num, "pid": os.getpid()}), flush=True)
    shaper.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
