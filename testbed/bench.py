"""``mecsplit bench links``: goodput and RTT across a shaped link between two node containers.

Runs its own two-node testbed in-process (no daemon, its own prefix so a running testbed is untouched):
for each rate x one-way delay it sets the link in place and measures TCP goodput (after a warm-up) and
the median TCP RTT, then measures how long a live rate change takes to show in the receiver's goodput,
and what a burst (a prefill's activations) pays on the first requests after the rate rises, under the
congestion control the segment links pin and under the host's default (docs/segments-wire.md).
Goals (issue): goodput within +-10 % of the rate, RTT within +-10 % (or +-1 ms) of 2 x delay, a change in
effect within 0.5 s.
"""

from __future__ import annotations

import itertools
import json
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from testbed.errors import TestbedError

BENCH_SCENARIO = """
name: bench-links
source: src
nodes:
  - {name: src, tier: device, cpus: 1.0, mem_mb: 256}
  - {name: dst, tier: edge, cpus: 1.0, mem_mb: 256}
links:
  - {a: src, b: dst, bw_mbit: 20, delay_ms: 5}
"""


# A 32-token SmolLM2 prefill's activations (32 x 576 fp32), the largest message a V2X step sends; the
# rise is V2X's 5G uplink coming back from an outage (0.5 -> 20 Mbit/s) over its 8 ms one-way delay.
BURST_BYTES = 32 * 576 * 4
RISE_MBIT = (0.5, 20.0)
RISE_DELAY_MS = 8.0
BURSTS_BEFORE, BURSTS_AFTER, BURST_GAP_S = 3, 6, 0.3


def burst_after_rise(tb: Any, a: str, b: str, congestion: str | None) -> dict[str, Any]:
    """One-way times of bursts a->b on one connection, first at the low rate, then after the rise,
    against the link's own time for them (delay + bytes at the rate)."""
    low, high = RISE_MBIT
    tb.set_link(a, b, delay_ms=RISE_DELAY_MS)
    got = tb.measure_bursts(
        a, b, BURST_BYTES, [(low, BURSTS_BEFORE, BURST_GAP_S), (high, BURSTS_AFTER, BURST_GAP_S)], congestion
    )
    link_ms = RISE_DELAY_MS + BURST_BYTES * 8 / (high * 1e3)
    after = got["one_way_ms"][1]
    return {
        "congestion": got["congestion"], "after_rise_ms": after, "link_ms": round(link_ms, 2),
        "first_ratio": round(after[0] / link_ms, 3),
        "median_ratio": round(statistics.median(after) / link_ms, 3),
    }  # fmt: skip


def _within(measured: float | None, target: float, rel: float, abs_: float = 0.0) -> bool:
    return measured is not None and abs(measured - target) <= max(rel * target, abs_)


def change_latency_s(tb: Any, a: str, b: str, from_mbit: float, to_mbit: float, bin_s: float = 0.05) -> float:
    """Seconds from a live rate change until the receiver's goodput is within 10 % of the new rate."""
    tb.set_link(a, b, bw_mbit=from_mbit)
    change_at: list[float] = []

    def change() -> None:
        time.sleep(2.0)
        change_at.append(time.monotonic())
        tb.set_link(a, b, bw_mbit=to_mbit)

    thread = threading.Thread(target=change)
    thread.start()
    result = tb.measure_link(a, b, seconds=4.0, pings=0, warmup_s=0.0, bin_s=bin_s)
    thread.join()
    t0 = change_at[0]
    # Two consecutive 50-ms bins within 25 % of the new rate (a bin holds ~20 packets at 5 Mbit/s, so
    # finer is noise; one bin can straddle the change).
    series = [(t, mbit) for t, mbit in result["series_mbit"] if t - bin_s >= t0]
    for (t, m1), (_, m2) in itertools.pairwise(series):
        if _within(m1, to_mbit, 0.25) and _within(m2, to_mbit, 0.25):
            return max(0.0, t - bin_s - t0)
    raise TestbedError(f"rate change {from_mbit}->{to_mbit} Mbit/s never showed in goodput: {series}")


def run_link_bench(
    rates_mbit: Sequence[float],
    delays_ms: Sequence[float],
    seconds: float,
    progress: Callable[[str], None] = print,
    pinned_congestion: str | None = None,
) -> dict[str, Any]:
    """``pinned_congestion``: the algorithm the segment links run, measured beside the host's default."""
    from mecsplit.settings import Settings, TestbedSettings
    from testbed.runtime import Testbed
    from testbed.scenario import parse_scenario

    base = Settings()
    settings = base.model_copy(update={"testbed": TestbedSettings(**{
        **base.testbed.model_dump(), "prefix": "mecsplitk", "data_net": "10.215.0.0/16",
        "mgmt_net": "10.216.0.0/24",
    })})  # fmt: skip
    scenario = parse_scenario(BENCH_SCENARIO)
    with tempfile.TemporaryDirectory(prefix="mecsplit-bench-") as state:
        tb = Testbed(scenario, settings, Path(state), progress)
        t0 = time.monotonic()
        try:
            tb.up()
            up_s = time.monotonic() - t0
            points = []
            for rate in rates_mbit:
                for delay in delays_ms:
                    tb.set_link("src", "dst", bw_mbit=rate, delay_ms=delay)
                    m = tb.measure_link(
                        "src", "dst", seconds=seconds, pings=20, warmup_s=min(1.0, seconds / 3)
                    )
                    point = {
                        "bw_mbit": rate, "delay_ms": delay, "goodput_mbit": round(m["goodput_mbit"], 3),
                        "goodput_ratio": round(m["goodput_mbit"] / rate, 4),
                        "rtt_ms": round(m["rtt_ms"], 3), "rtt_set_ms": 2 * delay,
                        "goodput_ok": _within(m["goodput_mbit"], rate, 0.10),
                        "rtt_ok": _within(m["rtt_ms"], 2 * delay, 0.10, 1.0),
                    }  # fmt: skip
                    progress(json.dumps(point))
                    points.append(point)
            tb.set_link("src", "dst", delay_ms=5)
            down = change_latency_s(tb, "src", "dst", 20, 5)
            up = change_latency_s(tb, "src", "dst", 5, 20)
            progress(f"bursts after a {RISE_MBIT[0]:g} -> {RISE_MBIT[1]:g} Mbit/s rise")
            algorithms = [pinned_congestion, None] if pinned_congestion else [None]
            bursts = [burst_after_rise(tb, "src", "dst", cc) for cc in algorithms]
            mode = next(iter(tb.shapers.values())).mode if tb.shapers else None
        finally:
            tb.down()
    return {
        "bench": "links", "seconds_per_point": seconds, "testbed_up_s": round(up_s, 3),
        "points": points,
        "change_latency_s": {"20_to_5_mbit": round(down, 3), "5_to_20_mbit": round(up, 3)},
        "all_goodput_ok": all(p["goodput_ok"] for p in points),
        "all_rtt_ok": all(p["rtt_ok"] for p in points),
        "change_ok": max(down, up) <= 0.5,
        "burst_after_rise": {"bytes": BURST_BYTES, "from_mbit": RISE_MBIT[0], "to_mbit": RISE_MBIT[1],
                             "delay_ms": RISE_DELAY_MS, "runs": bursts},
        "delay_mode": mode,
        "kernel": subprocess.run(["uname", "-r"], capture_output=True, text=True).stdout.strip(),
    }  # fmt: skip
