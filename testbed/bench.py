"""``mecsplit bench links``: goodput and RTT across a shaped link between two node containers.

Runs its own two-node testbed in-process (no daemon, its own prefix so a running testbed is untouched):
for each rate x one-way delay it sets the link in place and measures TCP goodput (after a warm-up) and
the median TCP RTT, then measures how long a live rate change takes to show in the receiver's goodput.
Goals (issue): goodput within +-10 % of the rate, RTT within +-10 % (or +-1 ms) of 2 x delay, a change in
effect within 0.5 s.
"""

from __future__ import annotations

import itertools
import json
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
) -> dict[str, Any]:
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
        "delay_mode": mode,
        "kernel": subprocess.run(["uname", "-r"], capture_output=True, text=True).stdout.strip(),
    }  # fmt: skip
