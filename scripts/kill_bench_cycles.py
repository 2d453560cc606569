"""Kill ``mecsplit bench links`` during its setup N times and check that nothing of its prefix is left.

The hardening issue's check (20 cycles): each cycle starts the bench from a directory outside the
checkout, waits for one of its setup steps (cycling through them), sends SIGTERM or SIGINT (alternating),
and looks for containers, interfaces, cgroups, iptables rules and Mininet shells of the prefix.
Prints one JSON object. Needs root, Docker and Mininet. Usage: python scripts/kill_bench_cycles.py [N]
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from testbed import cleanup  # noqa: E402

PREFIX = "mecsplitk"  # testbed.bench's own
STEPS = ("node src: container", "node dst: container", "network:", "link src-dst")
SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _cycle(index: int, home: Path) -> dict[str, object]:
    step, sig = STEPS[index % len(STEPS)], SIGNALS[index % len(SIGNALS)]
    env = {**os.environ, "MECSPLIT_HOME": str(home), "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-m", "mecsplit.cli", "bench", "links", "--rates", "5", "--delays", "5"]
    proc = subprocess.Popen(
        argv, cwd=home, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stderr is not None
    while (line := proc.stderr.readline()) and step not in line:
        pass
    proc.send_signal(sig)
    t0 = time.monotonic()
    try:
        proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
    exit_s = time.monotonic() - t0
    left = cleanup.survey(PREFIX, exact=True)
    row = {
        "cycle": index, "step": step, "signal": sig.name, "returncode": proc.returncode,
        "exit_s": round(exit_s, 2), "left": left.as_dict() if not left.empty() else {},
    }  # fmt: skip
    if not left.empty():
        cleanup.teardown(PREFIX, exact=True)  # the next cycle starts clean
    return row


def main() -> int:
    cycles = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    rows = []
    with tempfile.TemporaryDirectory(prefix="mecsplit-killcycles-") as tmp:
        for i in range(cycles):
            rows.append(_cycle(i, Path(tmp)))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    clean = [r for r in rows if not r["left"] and r["returncode"] == 128 + signal.Signals[r["signal"]]]
    print(json.dumps({
        "cycles": cycles, "clean": len(clean), "max_exit_s": max(r["exit_s"] for r in rows),
        "mean_exit_s": round(sum(r["exit_s"] for r in rows) / cycles, 2), "rows": rows,
    }, indent=2))  # fmt: skip
    return 0 if len(clean) == cycles else 1


if __name__ == "__main__":
    sys.exit(main())
