"""Tiny TCP measurement tools for shaped links (iperf is not required, and Mininet's iperf test hangs).

Run as processes inside node namespaces; each prints one JSON object on stdout:

    python -m testbed.probe sink  --port P --duration-s D [--bin-s 0.05]   # receive, report bytes per bin
    python -m testbed.probe blast --host H --port P --duration-s D         # send as fast as TCP allows
    python -m testbed.probe echo  --port P                                  # echo server (until SIGTERM)
    python -m testbed.probe ping  --host H --port P --count N               # TCP round trips
    python -m testbed.probe udp-sink --port P --idle-s 1                    # count datagrams until idle
    python -m testbed.probe udp-send --host H --port P --count N            # numbered datagrams
    python -m testbed.probe stamp --port P                                  # arrival time of each message
    python -m testbed.probe bursts --host H --port P --bytes B [--congestion reno]
        # messages of B bytes on one connection, a batch per stdin line "COUNT GAP_S"; one-way times

``sink`` reports ``bins``: [t_monotonic_s, bytes] per bin. CLOCK_MONOTONIC is shared by all network
namespaces, so a caller can line those times up with when it changed a link.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import struct
import sys
import time

CHUNK_BYTES = 64 * 1024


def sink(port: int, duration_s: float, bin_s: float) -> dict[str, object]:
    """Receive on one TCP connection for ``duration_s`` after it opens; bytes per ``bin_s`` bin."""
    with socket.create_server(("0.0.0.0", port)) as server:
        print(json.dumps({"listening": port}), file=sys.stderr, flush=True)
        conn, _ = server.accept()
    arrivals: list[tuple[float, int]] = []
    with conn:
        conn.settimeout(bin_s)
        start = time.monotonic()
        while time.monotonic() < start + duration_s:
            try:
                data = conn.recv(CHUNK_BYTES)
            except TimeoutError:
                continue
            if not data:
                break
            arrivals.append((time.monotonic(), len(data)))
    n_bins = max(1, int(duration_s / bin_s))
    counts = [0] * n_bins
    for t, n in arrivals:
        counts[min(n_bins - 1, int((t - start) / bin_s))] += n
    bins = [[start + (i + 1) * bin_s, c] for i, c in enumerate(counts)]
    return {"start_s": start, "bin_s": bin_s, "bytes": sum(counts), "bins": bins}


def blast(host: str, port: int, duration_s: float) -> dict[str, object]:
    payload = b"\x00" * CHUNK_BYTES
    sent = 0
    deadline = time.monotonic() + duration_s
    with socket.create_connection((host, port), timeout=10) as conn:
        conn.settimeout(1.0)
        while time.monotonic() < deadline:
            try:
                sent += conn.send(payload)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
    return {"sent_bytes": sent}


def echo(port: int) -> None:
    with socket.create_server(("0.0.0.0", port)) as server:
        print(json.dumps({"listening": port}), flush=True)
        while True:
            conn, _ = server.accept()
            with conn:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                while data := conn.recv(4096):
                    conn.sendall(data)


def ping(host: str, port: int, count: int, interval_s: float) -> dict[str, object]:
    rtts_ms: list[float] = []
    with socket.create_connection((host, port), timeout=10) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(count):
            msg = i.to_bytes(8, "big")
            t0 = time.perf_counter()
            conn.sendall(msg)
            got = b""
            while len(got) < len(msg):
                chunk = conn.recv(len(msg) - len(got))
                if not chunk:
                    raise ConnectionError("echo server closed the connection")
                got += chunk
            rtts_ms.append((time.perf_counter() - t0) * 1000)
            time.sleep(interval_s)
    return {
        "count": count,
        "rtt_ms": rtts_ms,
        "median_ms": statistics.median(rtts_ms),
        "min_ms": min(rtts_ms),
        "max_ms": max(rtts_ms),
    }


def udp_sink(port: int, idle_s: float) -> dict[str, object]:
    """Count distinct datagrams until none arrived for ``idle_s`` (after the first one)."""
    seen: set[int] = set()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        sock.bind(("0.0.0.0", port))
        print(json.dumps({"listening": port}), file=sys.stderr, flush=True)
        sock.settimeout(30.0)  # waiting for the first datagram
        while True:
            try:
                data = sock.recv(2048)
            except TimeoutError:
                break
            seen.add(int.from_bytes(data[:8], "big"))
            sock.settimeout(idle_s)
    return {"received": len(seen)}


def udp_send(host: str, port: int, count: int, interval_s: float) -> dict[str, object]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for i in range(count):
            sock.sendto(i.to_bytes(8, "big") + b"\x00" * 56, (host, port))
            if interval_s > 0:
                time.sleep(interval_s)
    return {"sent": count}


def _read_exactly(conn: socket.socket, size: int) -> bytes:
    got = bytearray()
    while len(got) < size:
        chunk = conn.recv(size - len(got))
        if not chunk:
            raise ConnectionError("peer closed the connection")
        got += chunk
    return bytes(got)


def stamp(port: int) -> None:
    """Serve one connection: for each length-prefixed message, answer the wall time it arrived whole."""
    with socket.create_server(("0.0.0.0", port)) as server:
        print(json.dumps({"listening": port}), flush=True)
        conn, _ = server.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while True:
                try:
                    size = int.from_bytes(_read_exactly(conn, 4), "big")
                    _read_exactly(conn, size)
                except ConnectionError:
                    return
                conn.sendall(struct.pack("!d", time.time()))


def bursts(host: str, port: int, size: int, congestion: str | None) -> None:
    """One connection to ``stamp``; for each stdin line ``COUNT GAP_S`` send COUNT messages of ``size``
    bytes, each after a pause of GAP_S, and print their one-way times (ms; the namespaces share the
    host's clock). The connection lives across lines: what its congestion control learned in one batch
    shapes the next, as on a segment link whose rate the caller changes between batches."""
    with socket.create_connection((host, port), timeout=60) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if congestion:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, congestion.encode())
        used = conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\0").decode()
        payload = size.to_bytes(4, "big") + b"x" * size
        for line in sys.stdin:
            words = line.split()
            count, gap_s = int(words[0]), float(words[1])
            one_way_ms = []
            for _ in range(count):
                time.sleep(gap_s)
                sent = time.time()
                conn.sendall(payload)
                (arrived,) = struct.unpack("!d", _read_exactly(conn, 8))
                one_way_ms.append(round((arrived - sent) * 1e3, 2))
            print(json.dumps({"congestion": used, "one_way_ms": one_way_ms}), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed.probe")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("sink")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--duration-s", type=float, required=True)
    p.add_argument("--bin-s", type=float, default=0.05)
    p = sub.add_parser("blast")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--duration-s", type=float, required=True)
    p = sub.add_parser("echo")
    p.add_argument("--port", type=int, required=True)
    p = sub.add_parser("ping")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--count", type=int, default=20)
    p.add_argument("--interval-s", type=float, default=0.01)
    p = sub.add_parser("udp-sink")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--idle-s", type=float, default=1.0)
    p = sub.add_parser("udp-send")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--interval-s", type=float, default=0.0005)
    p = sub.add_parser("stamp")
    p.add_argument("--port", type=int, required=True)
    p = sub.add_parser("bursts")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--bytes", type=int, required=True)
    p.add_argument("--congestion", default=None, help="TCP congestion control (default: the namespace's)")
    args = parser.parse_args(argv)
    if args.cmd == "stamp":
        stamp(args.port)
        return 0
    if args.cmd == "bursts":
        bursts(args.host, args.port, args.bytes, args.congestion)
        return 0
    if args.cmd == "sink":
        result: dict[str, object] = sink(args.port, args.duration_s, args.bin_s)
    elif args.cmd == "blast":
        result = blast(args.host, args.port, args.duration_s)
    elif args.cmd == "echo":
        echo(args.port)
        return 0
    elif args.cmd == "ping":
        result = ping(args.host, args.port, args.count, args.interval_s)
    elif args.cmd == "udp-sink":
        result = udp_sink(args.port, args.idle_s)
    else:
        result = udp_send(args.host, args.port, args.count, args.interval_s)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
