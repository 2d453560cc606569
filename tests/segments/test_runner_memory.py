"""A segment's resident memory grows with its own layers, not with the model's (real processes, real RSS)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from store_helpers import StoreFor

from segments import store

MODEL = "gpt2-124m"

# Runs in a fresh interpreter so that nothing else this test process loaded is counted.
_PROBE = """
import json, sys
from pathlib import Path
import torch
import transformers.models.gpt2.modeling_gpt2  # imported before the baseline: not counted
from segments.runner import SegmentRunner
from segments.spec import SegmentSpec

def rss_bytes():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

store_dir, first, end = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
before = rss_bytes()
runner = SegmentRunner(store_dir, SegmentSpec("gpt2-124m", first, end), max_sessions=1, max_kv_bytes=1 << 30)
inputs = torch.zeros(1, 8, dtype=torch.long) if runner.is_first else torch.zeros(1, 8, 768)
runner.forward("s", inputs, 0)
print(json.dumps({"rss_delta_bytes": rss_bytes() - before, "weight_bytes": runner.weight_bytes}))
"""


def probe_rss(store_dir: Path, first: int, end: int) -> dict[str, int]:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, str(store_dir), str(first), str(end)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # prepares gpt2-124m (~20 s) unless the user's store has it, then two processes
def test_rss_grows_with_layer_count(model_store: StoreFor) -> None:
    store_dir = model_store(MODEL)
    manifest = store.read_manifest(store_dir, MODEL)
    layer_bytes = manifest.layer_weight_bytes[5]
    one = probe_rss(store_dir, 5, 6)
    whole = probe_rss(store_dir, 0, manifest.num_layers)

    assert one["weight_bytes"] == layer_bytes
    # One middle layer holds that layer's weights and little more: no embeddings, no head, no other layer.
    assert one["rss_delta_bytes"] < 3 * layer_bytes, one
    # The whole model holds every layer plus the (tied) embeddings: an order of magnitude more.
    assert whole["weight_bytes"] >= manifest.num_layers * layer_bytes + manifest.embed_weight_bytes
    assert whole["rss_delta_bytes"] > 0.9 * whole["weight_bytes"], whole
    # What the extra layers add is their weights: resident memory follows the layer count, not the model.
    added_weights = whole["weight_bytes"] - one["weight_bytes"]
    assert whole["rss_delta_bytes"] - one["rss_delta_bytes"] > 0.9 * added_weights, (one, whole)
