"""``mecsplit bench numerics``: what pinning MKL's code path costs per token.

Exactness (a split's logits equal the whole model's bit for bit) rests on ``MKL_CBWR=AVX2``, which
importing ``segments`` sets (docs/segments-store.md). Each setting runs in a child process of its own
(MKL reads the variable once, at its first call), and this module imports neither ``segments`` nor the
project's settings, so the unpinned child is really unpinned. The child decodes with a Llama shaped like
SmolLM2-135M (30 layers, hidden 576; random weights from a fixed seed: nothing is downloaded) on one
thread, as a segment server does: a 48-token prefill, then timed decode steps.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

# The settings compared; None runs with MKL_CBWR removed from the environment (MKL picks per CPU).
SETTINGS: tuple[str | None, ...] = (None, "AVX2", "COMPATIBLE", "AVX2,STRICT")
PROMPT_TOKENS = 48
CHILD_TIMEOUT_S = 600.0


def decode_ms_per_token(steps: int) -> dict[str, Any]:
    """In this process: the median decode step (ms) and a digest of the last logits."""
    import torch
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    prompt = torch.randint(0, config.vocab_size, (1, PROMPT_TOKENS))
    times_s = []
    with torch.inference_mode():
        cache = DynamicCache()
        out = model(prompt, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            started = time.perf_counter()
            out = model(token, past_key_values=cache, use_cache=True)
            times_s.append(time.perf_counter() - started)
            token = out.logits[:, -1:].argmax(-1)
    return {
        "ms_per_token": statistics.median(times_s) * 1e3,
        "logits_sum": float(out.logits.double().sum()),
        "mkl_cbwr": os.environ.get("MKL_CBWR"),  # what the process really ran with
    }


def _child(setting: str | None, steps: int) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    if setting is not None:
        env["MKL_CBWR"] = setting
    code = f"import json, mecsplit.numerics_bench as b; print(json.dumps(b.decode_ms_per_token({steps})))"
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S
    )
    if done.returncode != 0:
        raise RuntimeError(f"MKL_CBWR={setting}: the decode child failed: {done.stderr.strip()[-600:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(
    runs: int, steps: int, settings: Sequence[str | None] = SETTINGS, progress: Callable[[str], None] = print
) -> dict[str, Any]:
    """``runs`` rounds, each setting once per round (interleaved, so drifts of a shared host fall on all)."""
    per: dict[str, list[float]] = {_name(s): [] for s in settings}
    digests: dict[str, float] = {}
    for round_ in range(1, runs + 1):
        for setting in settings:
            name, result = _name(setting), _child(setting, steps)
            if result["mkl_cbwr"] != setting:
                raise RuntimeError(f"the child meant to run MKL_CBWR={name} ran {result['mkl_cbwr']}")
            per[name].append(result["ms_per_token"])
            digests[name] = result["logits_sum"]
            progress(f"round {round_}/{runs}: MKL_CBWR={name} {result['ms_per_token']:.2f} ms/token")
    medians = {name: statistics.median(values) for name, values in per.items()}
    base = medians[_name(None)]
    return {
        "model": "SmolLM2-135M-shaped Llama, random weights, 1 thread",
        "prompt_tokens": PROMPT_TOKENS,
        "steps": steps,
        "runs": runs,
        "cpu": _cpu_model(),
        "ms_per_token": {name: [round(v, 3) for v in values] for name, values in per.items()},
        "median_ms_per_token": {name: round(v, 3) for name, v in medians.items()},
        "ratio_to_unpinned": {name: round(v / base, 3) for name, v in medians.items()},
        "logits_sum": digests,
    }


def _name(setting: str | None) -> str:
    return "unpinned" if setting is None else setting


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "?")
    except OSError:
        return "?"
