"""``mecsplit bench resplit``: what a live re-split costs a running generation, per KV path and link rate.

Two network namespaces of its own (``mecsplitr-dev``, ``mecsplitr-edge``) joined by a veth pair whose both
directions are shaped with tc HTB to each rate. SmolLM2 runs split ``dev[0,10) + edge[10,30)``; a greedy
generation with a long prompt (about 256 tokens of context at the switch) moves, between two tokens, to
``dev[0,15) + edge[15,30)`` on fresh servers (5 layers change node) by each path:

* ``push``: every layer's KV goes from its old server to its new one, server to server (layers 10..15
  cross the shaped link);
* ``kv-via-client``: the same KV exported to the client (on the device) and imported from there;
* ``recompute-first-hop``: the device's new segment recomputes its 15 layers from the token history the
  client keeps; the edge's new segment receives its layers' KV from the old edge server (same node);
* ``replay``: both new segments recompute (the activations cross the link once).

The client runs in the device namespace (where the gateway runs in a deployment). Per run the stall is the
largest gap between two tokens minus the median gap; each point reports the median over the runs, checks
the tokens against an undisturbed run, and compares with the goal (500 ms at 100 Mbit/s, 1.5 s at 10).
Needs root (namespaces, tc); cleans up its namespaces (and with them the veth pair) and its processes.
"""

from __future__ import annotations

import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PREFIX = "mecsplitr"
DEV_NS, EDGE_NS = f"{PREFIX}-dev", f"{PREFIX}-edge"
DEV_IF, EDGE_IF = f"{PREFIX}-d", f"{PREFIX}-e"
DEV_IP, EDGE_IP = "10.217.0.1", "10.217.0.2"
MODEL = "smollm2-135m"
GOALS_S = {100.0: 0.5, 10.0: 1.5}


@dataclass(frozen=True)
class SwitchPath:
    name: str
    mode: str
    recompute_hops: int


PATHS = (
    SwitchPath("push", "push", 0),
    SwitchPath("kv-via-client", "kv", 0),
    SwitchPath("recompute-first-hop", "push", 1),
    SwitchPath("replay", "replay", 0),
)


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", *(["-n", ns] if ns else []), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip()}")


class TwoNodeNet:
    """Two namespaces and a shaped veth pair between them; ``close`` removes all three."""

    def __enter__(self) -> TwoNodeNet:
        self.close()  # what a crashed earlier run of this bench left
        try:
            for ns in (DEV_NS, EDGE_NS):
                _ip("netns", "add", ns)
                _ip("link", "set", "lo", "up", ns=ns)
            _ip(
                "link",
                "add",
                DEV_IF,
                "netns",
                DEV_NS,
                "type",
                "veth",
                "peer",
                "name",
                EDGE_IF,
                "netns",
                EDGE_NS,
            )
            for ns, dev, ip in ((DEV_NS, DEV_IF, DEV_IP), (EDGE_NS, EDGE_IF, EDGE_IP)):
                _ip("addr", "add", f"{ip}/24", "dev", dev, ns=ns)
                _ip("link", "set", dev, "up", ns=ns)
        except BaseException:
            self.close()
            raise
        return self

    def shape(self, bw_mbit: float) -> None:
        from testbed.link import Netns, set_rate

        for ns, dev in ((DEV_NS, DEV_IF), (EDGE_NS, EDGE_IF)):
            set_rate(Netns(name=ns), dev, bw_mbit)

    def close(self) -> None:
        for ns in (DEV_NS, EDGE_NS):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_resplit_bench(
    rates_mbit: Sequence[float], runs: int, progress: Callable[[str], None] = print
) -> dict[str, Any]:
    """Shape the link to each rate and run the worker (in the device namespace) there."""
    points = []
    with TwoNodeNet() as net:
        for bw in rates_mbit:
            net.shape(bw)
            progress(f"{bw:g} Mbit/s: starting SmolLM2 segment servers and {runs} runs per path")
            cmd = [
                "ip",
                "netns",
                "exec",
                DEV_NS,
                sys.executable,
                "-m",
                "flows.resplit_bench",
                "--runs",
                str(runs),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=_repo_root())
            if proc.returncode != 0:
                raise RuntimeError(f"the re-split worker failed at {bw} Mbit/s:\n{proc.stderr[-3000:]}")
            point = {"bw_mbit": bw, **json.loads(proc.stdout.strip().splitlines()[-1])}
            goal = GOALS_S.get(bw)
            point["goal_stall_s"] = goal
            if goal is not None:
                point["goal_ok"] = {name: p["stall_s"] <= goal for name, p in point["paths"].items()}
            progress(json.dumps(point))
            points.append(point)
    return {"bench": "resplit", "model": MODEL, "runs": runs, "points": points}


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------- worker (device netns)


def _start(store_dir: Path, secret_file: Path, ranges: list[tuple[int, int]], edge: bool) -> Any:
    from segments.launch import LocalChain
    from segments.spec import SegmentSpec

    return LocalChain(
        store_dir,
        tuple(SegmentSpec(MODEL, a, b) for a, b in ranges),
        secret_file=secret_file,
        host=EDGE_IP if edge else DEV_IP,
        wrap=("ip", "netns", "exec", EDGE_NS) if edge else (),
    )


def _timed_generation(client: Any, prompt: list[int], tokens: int, switch_at: int, switch: Any) -> Any:
    from segments.client import Session
    from segments.sampling import SamplingParams

    session = Session(tokens=list(prompt))
    stamps, got, report = [], [], None
    for token in client.generate(session, tokens, SamplingParams(temperature=0.0)):
        stamps.append(time.perf_counter())
        got.append(token)
        if switch is not None and len(got) == switch_at:
            report = switch(session)
    client.drop(session)
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return got, gaps, report


def worker(runs: int, prompt_tokens: int = 240, tokens: int = 32, switch_at: int = 16) -> dict[str, Any]:
    from mecsplit.settings import get_settings
    from segments.auth import create_secret
    from segments.client import Chain, ChainClient
    from segments.store import load_tokenizer

    store_dir = get_settings().store_dir
    text = " ".join(["Edge nodes split a language model into segments and move them as links change."] * 40)
    prompt = load_tokenizer(store_dir, MODEL).encode(text)[:prompt_tokens]
    with tempfile.TemporaryDirectory(prefix="mecsplit-resplit-") as tmp:
        secret_file = create_secret(Path(tmp) / "secret")
        # One group per node, each started from this thread: a server dies with the thread that started it.
        dev = _start(store_dir, secret_file, [(0, 10), (0, 15)], False)
        edge = _start(store_dir, secret_file, [(10, 30), (15, 30)], True)
        groups = [dev, edge]
        try:
            for group in groups:
                group.start()
            old = Chain(MODEL, (dev.hops[0], edge.hops[0]))
            new = Chain(MODEL, (dev.hops[1], edge.hops[1]))
            secret = groups[0].secret()
            with ChainClient(old, secret) as client:
                want, base_gaps, _ = _timed_generation(client, prompt, tokens, switch_at, None)
            paths = {}
            for path in PATHS:
                samples = []
                for _ in range(runs):
                    with ChainClient(old, secret) as client:

                        def switch(session: Any, client: Any = client, path: SwitchPath = path) -> Any:
                            return client.switch(session, new, path.mode, recompute_hops=path.recompute_hops)

                        got, gaps, report = _timed_generation(client, prompt, tokens, switch_at, switch)
                    median_gap = statistics.median(gaps)
                    samples.append((max(gaps) - median_gap, max(gaps), median_gap, report, got == want))
                paths[path.name] = _summarise(samples)
        finally:
            for g in groups:
                g.stop()
    return {
        "context_tokens_at_switch": len(prompt) + switch_at - 1,
        "undisturbed_median_gap_ms": round(statistics.median(base_gaps) * 1e3, 2),
        "paths": paths,
        "best_path": min(paths, key=lambda name: paths[name]["stall_s"]),
    }


def _summarise(samples: list[tuple[float, float, float, Any, bool]]) -> dict[str, Any]:
    report = samples[0][3]
    return {
        "stall_s": round(statistics.median(s[0] for s in samples), 4),
        "stall_s_runs": [round(s[0], 4) for s in samples],
        "max_gap_ms": round(statistics.median(s[1] for s in samples) * 1e3, 2),
        "median_gap_ms": round(statistics.median(s[2] for s in samples) * 1e3, 2),
        "switch_s": round(statistics.median(s[3].stall_s for s in samples), 4),
        "kv_bytes_moved": report.kv_bytes_moved,
        "tokens_recomputed": report.tokens_recomputed,
        "exact": all(s[4] for s in samples),
    }


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m flows.resplit_bench", description="the in-netns worker")
    parser.add_argument("--runs", type=int, default=3)
    print(json.dumps(worker(parser.parse_args().runs)))
