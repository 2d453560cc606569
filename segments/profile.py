"""Measure a model's per-layer compute time where this process runs (a node container, or the host).

Real forward passes through the runner, no formula: a one-layer middle segment gives the time of one
decoder layer; a segment that also holds the embeddings, and one that also holds the final norm and head,
give those parts' extra cost by difference. Layers of one model share their shapes, so one middle layer
stands for all of them (the sample of layers is kept in the output, to show their spread).

``python -m segments.profile --store DIR --model M --context 32 --json`` prints one JSON object:
``layer_decode_s`` (one token through one layer with ``context`` tokens cached, mean over a sustained run),
``layer_prefill_s_per_token``, ``embed_decode_s``, ``head_decode_s`` (per decode step) and the memory facts
of the model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from segments.runner import SegmentRunner
from segments.spec import SegmentSpec


@dataclass(frozen=True)
class ComputeProfile:
    model: str
    num_layers: int
    context_tokens: int
    threads: int
    layer_decode_s: float
    layer_prefill_s_per_token: float
    embed_decode_s: float
    head_decode_s: float
    layer_samples_decode_s: tuple[float, ...]
    kv_bytes_per_token_per_layer: int
    weight_bytes_per_layer: int
    wall_s: float
    # The same at full speed: the median single step, which a CPU quota does not throttle (a step of a
    # few ms fits in one quota period). A node that computes only part of each token's cycle runs at this
    # speed; the quota bounds what it can do over a whole period (policies.contention).
    layer_decode_burst_s: float = 0.0
    embed_decode_burst_s: float = 0.0
    head_decode_burst_s: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass(frozen=True)
class _Timing:
    decode_s: float  # mean over a sustained run (what a CPU quota allows)
    decode_burst_s: float  # median single step (full speed)
    prefill_s_per_token: float


def _time_decode_s(runner: SegmentRunner, context: int, min_time_s: float) -> _Timing:
    """Decode step time (mean and median single step) and prefill seconds per token, this runner alone.

    Decode steps repeat for at least ``min_time_s`` of wall time, each on a cache of ``context`` tokens
    (truncated back after every step), and the mean is taken: a CPU quota (cgroup CFS) lets a short burst
    run at full speed and throttles only over whole periods (100 ms), so a median of a few millisecond
    steps would miss a node's CPU share entirely.
    """
    if runner.is_first:
        prompt = torch.arange(context, dtype=torch.int64).remainder(runner.info.vocab_size).unsqueeze(0)
        token = torch.tensor([[7]], dtype=torch.int64)
    else:
        gen = torch.Generator().manual_seed(0)
        prompt = torch.randn(1, context, runner.info.hidden_size, generator=gen)
        token = torch.randn(1, 1, runner.info.hidden_size, generator=gen)
    runner.forward("warmup", prompt, 0)  # first call pays one-off allocation costs
    runner.drop_session("warmup")
    prefills = 0
    started = time.perf_counter()
    while prefills < 2 or time.perf_counter() - started < min_time_s / 2:
        runner.drop_session("profile")
        runner.forward("profile", prompt, 0)
        prefills += 1
    prefill_s = (time.perf_counter() - started) / (prefills * context)
    singles: list[float] = []
    started = time.perf_counter()
    while len(singles) < 3 or time.perf_counter() - started < min_time_s:
        t0 = time.perf_counter()
        runner.forward("profile", token, context)
        runner.truncate("profile", context)
        singles.append(time.perf_counter() - t0)
    decode_s = (time.perf_counter() - started) / len(singles)
    runner.drop_session("profile")
    return _Timing(decode_s, statistics.median(singles), prefill_s)


def measure(
    store_dir: Path, model: str, *, context: int = 32, min_time_s: float = 0.5, threads: int = 1
) -> ComputeProfile:
    torch.set_num_threads(threads)
    started = time.perf_counter()
    limits = {"max_sessions": 4, "max_kv_bytes": 1 << 34}

    def runner(first: int, end: int) -> SegmentRunner:
        return SegmentRunner(store_dir, SegmentSpec(model, first, end), **limits)

    probe = runner(0, 1)
    n = probe.info.num_layers
    if probe.is_encoder:
        raise ValueError(f"{model} is an encoder: decode profiling applies to causal LMs")
    first = _time_decode_s(probe, context, min_time_s)
    del probe
    # Middle layers sampled evenly (at most 3): one layer each, neither embeddings nor head.
    middle = sorted({max(1, min(n - 2, i)) for i in (n // 4, n // 2, (3 * n) // 4)}) if n > 2 else []
    timings: list[_Timing] = []
    kv_per_layer = weight_per_layer = 0
    for layer in middle:
        mid = runner(layer, layer + 1)
        timings.append(_time_decode_s(mid, context, min_time_s))
        kv_per_layer, weight_per_layer = mid.kv_bytes_per_token, mid.weight_bytes
        del mid
    last_runner = runner(n - 1, n)
    last = _time_decode_s(last_runner, context, min_time_s)
    if not timings:  # a model of one or two layers: no middle layer to isolate
        timings = [last]
        kv_per_layer, weight_per_layer = last_runner.kv_bytes_per_token, last_runner.weight_bytes
    layer_s = statistics.median(t.decode_s for t in timings)
    burst_s = statistics.median(t.decode_burst_s for t in timings)
    return ComputeProfile(
        model=model,
        num_layers=n,
        context_tokens=context,
        threads=threads,
        layer_decode_s=layer_s,
        layer_prefill_s_per_token=statistics.median(t.prefill_s_per_token for t in timings),
        embed_decode_s=max(0.0, first.decode_s - layer_s),
        head_decode_s=max(0.0, last.decode_s - layer_s),
        layer_samples_decode_s=tuple(t.decode_s for t in timings),
        kv_bytes_per_token_per_layer=kv_per_layer,
        weight_bytes_per_layer=weight_per_layer,
        wall_s=time.perf_counter() - started,
        layer_decode_burst_s=burst_s,
        embed_decode_burst_s=max(0.0, first.decode_burst_s - burst_s),
        head_decode_burst_s=max(0.0, last.decode_burst_s - burst_s),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m segments.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, required=True, help="segment store directory")
    parser.add_argument("--model", required=True, help="prepared model name")
    parser.add_argument("--context", type=int, default=32, help="tokens in the KV cache while decoding")
    parser.add_argument(
        "--min-time-s", type=float, default=0.5, help="decode wall time per measured segment (mean over it)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    profile = measure(
        args.store, args.model, context=args.context, min_time_s=args.min_time_s, threads=args.threads
    )
    sys.stdout.write(profile.to_json() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
