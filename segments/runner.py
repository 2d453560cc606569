"""One segment of a model: the layers ``[first, end)`` with their per-session KV caches.

A ``SegmentRunner`` builds only its own modules: it takes the Hugging Face module classes of the whole model
built on the meta device (no memory), keeps the ones of its layers, and fills them with the tensors of its
store files (``assign=True``, so no second copy). Its resident memory therefore grows with its layer count.

Exactness: each segment repeats the whole model's forward step for step (same module classes, same mask
function sized against the segment's first global layer, same rotary/position embeddings from the same
position ids), so for fp32 a chain of segments over any split gives the whole model's logits bit for bit.

Semantics shared with ``segments.reference.ReferenceModel``:

- ``position`` is the session's current KV length (the number of tokens already cached);
- ``attention_mask`` is ``[B, position + T]`` with 1 for real tokens; left padding is supported, and the
  position ids then come from the mask (``cumsum - 1``, as ``generate`` does), otherwise ``position + t``;
- an encoder is stateless: ``position`` must be 0 and no session is kept.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from segments import store
from segments.errors import (
    InputError,
    KVMemoryLimitError,
    LayerRangeError,
    PositionMismatchError,
    SessionLimitError,
    UnknownSessionError,
)
from segments.spec import ModelInfo, SegmentSpec

if TYPE_CHECKING:
    from transformers import DynamicCache, PretrainedConfig


# Store tensors by part: "embed", "head" or a layer index.
Parts = dict[str | int, dict[str, torch.Tensor]]


def position_ids_for(attention_mask: torch.Tensor | None, position: int, length: int) -> torch.Tensor:
    """Position ids of the ``length`` new tokens: ``[1, T]`` without a mask, else ``[B, T]``."""
    if attention_mask is None:
        return torch.arange(position, position + length, dtype=torch.long).unsqueeze(0)
    positions = attention_mask.long().cumsum(-1) - 1
    # Pad slots get a harmless valid position; their outputs are masked out everywhere.
    positions = positions.masked_fill(attention_mask == 0, 1)
    return positions[:, -length:]


def _left_pad(tensor: torch.Tensor | None, length: int, like: torch.Tensor) -> torch.Tensor:
    """A ``[1, heads, L, d]`` K or V (None: a session with none yet) with zeros before its ``L``
    positions, up to ``length`` (the mask hides them); ``like``: a K or V of that layer."""
    held = 0 if tensor is None else tensor.shape[-2]
    if held == length:
        assert tensor is not None
        return tensor
    pad = like.new_zeros(1, like.shape[1], length - held, like.shape[-1])
    return pad if tensor is None or held == 0 else torch.cat([pad, tensor], dim=-2)


def _kv(state: _Session, layer: int, which: str) -> torch.Tensor | None:
    """The session's K (``keys``) or V (``values``) of ``layer``; None while it holds no token."""
    if state.length == 0 or len(state.cache.layers) <= layer:
        return None
    return getattr(state.cache.layers[layer], which)


def kv_width(config: PretrainedConfig) -> int:
    """Elements of K (or V) per token and layer: kv heads x head dim."""
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return kv_heads * head_dim


def _materialise(module: nn.Module, tensors: Mapping[str, torch.Tensor], prefix: str) -> nn.Module:
    """Fill a meta-built ``module`` with the store tensors under ``prefix`` (taking them, not copying)."""
    own = {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}
    module.load_state_dict(own, strict=True, assign=True)
    leftover = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"module under {prefix!r} still has unloaded tensors {leftover[:3]}")
    return module.eval()


@dataclass
class _Session:
    cache: DynamicCache
    batch: int
    length: int
    # Layers whose KV is present; a session imported piecewise is usable only once all are.
    layers: set[int] = field(default_factory=set)
    used_s: float = field(default_factory=time.monotonic)  # last forward or import (idle eviction)


class _Blocks:
    """The architecture-specific part: embeddings, blocks, final norm + head of one segment."""

    def __init__(self, config: PretrainedConfig, spec: SegmentSpec, is_last: bool) -> None:
        self.config = config
        self.spec = spec
        self.is_first = spec.first == 0
        self.is_last = is_last

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def layers(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        cache: DynamicCache | None,
    ) -> torch.Tensor:
        raise NotImplementedError

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def modules(self) -> list[nn.Module]:
        raise NotImplementedError


class _LlamaBlocks(_Blocks):
    """Llama-family decoders (Llama, SmolLM2, Qwen2): ``model.embed_tokens/layers/norm/rotary_emb`` + head."""

    def __init__(
        self, config: PretrainedConfig, spec: SegmentSpec, is_last: bool, whole: nn.Module, parts: Parts
    ) -> None:
        super().__init__(config, spec, is_last)
        layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
        if layer_types != {"full_attention"}:
            # Sliding-window layers need their own mask and cache layer type; not wired in yet.
            raise LayerRangeError(
                f"{spec.model}: layer types {sorted(layer_types)} are not supported; only full attention"
            )
        inner = whole.model
        self.embed_tokens = (
            _materialise(inner.embed_tokens, parts["embed"], "model.embed_tokens.") if self.is_first else None
        )
        # Rotary tables are computed, not stored: build them for real (a few KB).
        self.rotary_emb = type(inner.rotary_emb)(config=config).eval()
        self.block_list = [
            _materialise(inner.layers[i], parts[i], f"model.layers.{i}.") for i in range(spec.first, spec.end)
        ]
        self.norm = self.lm_head = None
        if is_last:
            self.norm = _materialise(inner.norm, parts["head"], "model.norm.")
            self.lm_head = _materialise(whole.lm_head, parts["head"], "lm_head.")
            if self.embed_tokens is not None and getattr(config, "tie_word_embeddings", False):
                self.lm_head.weight = self.embed_tokens.weight  # one copy, as the whole model ties them

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def layers(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        cache: DynamicCache | None,
    ) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask

        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
            layer_idx=self.spec.first,
        )
        position_embeddings = self.rotary_emb(hidden, position_ids=position_ids)
        for block in self.block_list:
            hidden = block(
                hidden,
                attention_mask=mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                cache=cache,
                use_cache=True,
            )
        return hidden

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        from transformers.modeling_utils import slice_logits_to_keep

        hidden = self.norm(hidden)
        return self.lm_head(slice_logits_to_keep(hidden, 0))

    def modules(self) -> list[nn.Module]:
        found = [self.embed_tokens, self.rotary_emb, *self.block_list, self.norm, self.lm_head]
        return [m for m in found if m is not None]


class _GPT2Blocks(_Blocks):
    """GPT-2: ``transformer.wte / wpe / h / ln_f``, ``lm_head`` (tied to ``wte``)."""

    def __init__(
        self, config: PretrainedConfig, spec: SegmentSpec, is_last: bool, whole: nn.Module, parts: Parts
    ) -> None:
        super().__init__(config, spec, is_last)
        inner = whole.transformer
        self.wte = self.wpe = None
        if self.is_first:
            self.wte = _materialise(inner.wte, parts["embed"], "transformer.wte.")
            self.wpe = _materialise(inner.wpe, parts["embed"], "transformer.wpe.")
        self.block_list = [
            _materialise(inner.h[i], parts[i], f"transformer.h.{i}.") for i in range(spec.first, spec.end)
        ]
        self.ln_f = self.lm_head = None
        if is_last:
            self.ln_f = _materialise(inner.ln_f, parts["head"], "transformer.ln_f.")
            self.lm_head = _materialise(whole.lm_head, parts["head"], "lm_head.")
            if self.wte is not None:
                self.lm_head.weight = self.wte.weight

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        inputs_embeds = self.wte(input_ids)
        return inputs_embeds + self.wpe(position_ids).to(inputs_embeds.device)

    def layers(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        cache: DynamicCache | None,
    ) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask

        if attention_mask is not None:
            attention_mask = attention_mask.view(hidden.shape[0], -1)
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
            layer_idx=self.spec.first,
        )
        for block in self.block_list:
            hidden = block(hidden, cache, mask, None, encoder_attention_mask=None, use_cache=True,
                           position_ids=position_ids)  # fmt: skip
        return hidden

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        from transformers.modeling_utils import slice_logits_to_keep

        hidden = self.ln_f(hidden)
        return self.lm_head(slice_logits_to_keep(hidden, 0))

    def modules(self) -> list[nn.Module]:
        found = [self.wte, self.wpe, *self.block_list, self.ln_f, self.lm_head]
        return [m for m in found if m is not None]


class _BertBlocks(_Blocks):
    """BERT encoder: ``embeddings``, ``encoder.layer``; the last segment returns the final hidden states."""

    def __init__(
        self, config: PretrainedConfig, spec: SegmentSpec, is_last: bool, whole: nn.Module, parts: Parts
    ) -> None:
        from transformers.models.bert.modeling_bert import BertEmbeddings

        super().__init__(config, spec, is_last)
        self.embeddings = None
        if self.is_first:
            # Its position/token-type index buffers are computed, so build it for real, then load.
            self.embeddings = BertEmbeddings(config)
            self.embeddings.load_state_dict(
                {k.removeprefix("embeddings."): v for k, v in parts["embed"].items()}, strict=True
            )
            self.embeddings.eval()
        self.block_list = [
            _materialise(whole.encoder.layer[i], parts[i], f"encoder.layer.{i}.")
            for i in range(spec.first, spec.end)
        ]

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.embeddings(
            input_ids=input_ids, position_ids=None, token_type_ids=None, inputs_embeds=None
        )

    def layers(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        cache: DynamicCache | None,
    ) -> torch.Tensor:
        from transformers.masking_utils import create_bidirectional_mask

        mask = create_bidirectional_mask(
            config=self.config, inputs_embeds=hidden, attention_mask=attention_mask
        )
        for block in self.block_list:
            hidden = block(hidden, mask, None, encoder_attention_mask=None, cache=None)
        return hidden

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    def modules(self) -> list[nn.Module]:
        return [m for m in [self.embeddings, *self.block_list] if m is not None]


_BLOCKS: dict[str, type[_Blocks]] = {
    "llama": _LlamaBlocks,
    "qwen2": _LlamaBlocks,
    "gpt2": _GPT2Blocks,
    "bert": _BertBlocks,
}


class SegmentRunner:
    """Runs layers ``[spec.first, spec.end)`` of a prepared model, with a KV cache per session."""

    def __init__(
        self,
        store_dir: Path,
        spec: SegmentSpec,
        *,
        max_sessions: int,
        max_kv_bytes: int,
        threads: int | None = None,
    ) -> None:
        if max_sessions < 1 or max_kv_bytes < 1:
            raise ValueError(
                f"max_sessions and max_kv_bytes must be positive, got {max_sessions}, {max_kv_bytes}"
            )
        if threads is not None:
            torch.set_num_threads(threads)
        self.store_dir = Path(store_dir)
        self.spec = spec
        self.max_sessions = max_sessions
        self.max_kv_bytes = max_kv_bytes
        self.manifest = store.read_manifest(self.store_dir, spec.model)
        self.info: ModelInfo = self.manifest.info
        spec.check_within(self.info.num_layers)
        self.is_first = spec.first == 0
        self.is_last = spec.end == self.info.num_layers
        self.config = store.load_config(self.store_dir, self.manifest)
        self._blocks = self._build()
        self._kv_bytes_per_token = 2 * kv_width(self.config) * 4 * spec.num_layers  # fp32 K and V
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.RLock()

    def _build(self) -> _Blocks:
        with torch.device("meta"):
            whole = store.build_hf_model(self.config, self.info.kind)
        parts: Parts = {
            layer: store.load_part(self.store_dir, self.manifest, layer)
            for layer in range(self.spec.first, self.spec.end)
        }
        if self.is_first:
            parts["embed"] = store.load_part(self.store_dir, self.manifest, "embed")
        if self.is_last:
            parts["head"] = store.load_part(self.store_dir, self.manifest, "head")
        return _BLOCKS[self.info.arch](self.config, self.spec, self.is_last, whole, parts)

    # ------------------------------------------------------------------------------------------ properties

    @property
    def is_encoder(self) -> bool:
        return self.info.kind == "encoder"

    @property
    def kv_bytes_per_token(self) -> int:
        """KV bytes this segment adds per token and batch row."""
        return 0 if self.is_encoder else self._kv_bytes_per_token

    @property
    def weight_bytes(self) -> int:
        """Bytes of the parameters this segment holds (a tied head counted once)."""
        seen: set[int] = set()
        total = 0
        for module in self._blocks.modules():
            for tensor in module.parameters():
                if tensor.data_ptr() not in seen:
                    seen.add(tensor.data_ptr())
                    total += tensor.numel() * tensor.element_size()
        return total

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "model": self.spec.model,
                "first": self.spec.first,
                "end": self.spec.end,
                "sessions": len(self._sessions),
                "kv_bytes": self.kv_bytes(),
                "max_sessions": self.max_sessions,
                "max_kv_bytes": self.max_kv_bytes,
                "weight_bytes": self.weight_bytes,
            }

    # ----------------------------------------------------------------------------------------------- forward

    def forward(
        self,
        session: str,
        inputs: torch.Tensor,
        position: int,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the segment on ``inputs``; see the module docstring for the semantics."""
        with self._lock, torch.inference_mode():
            batch, length = self._check_inputs(inputs)
            attention_mask = self._check_mask(attention_mask, batch, position + length)
            position_ids = position_ids_for(attention_mask, position, length)
            if self.is_encoder:
                if position != 0:
                    raise PositionMismatchError(f"an encoder keeps no KV: position must be 0, got {position}")
                return self._run(inputs, attention_mask, position_ids, None)
            state = self._session_for_forward(session, position, batch, length)
            try:
                out = self._run(inputs, attention_mask, position_ids, state.cache)
            except BaseException:
                self._crop(state, position)  # some layers may have appended already
                if position == 0:
                    self._sessions.pop(session, None)
                raise
            state.length = position + length
            return out

    def forward_batch(self, steps: Sequence[tuple[str, torch.Tensor, int]]) -> list[torch.Tensor | Exception]:
        """One-token steps of several sessions, ``(session, inputs [1, 1, ...], position)``, as one forward
        pass; each session's output, or the error that refused its step (the others run).

        Each session's KV is left-padded to the longest and masked (``attention_mask``, position ids from
        it, as ``forward`` takes a left-padded batch), the new token's K and V are appended to each
        session's own cache afterwards. A session's output is its output alone within the rounding of a
        larger matrix product (``tests/segments/test_batching.py``); the weights are read once for all.
        A single step runs as ``forward`` does. A failed pass leaves every session as it was."""
        with self._lock, torch.inference_mode():
            out: list[torch.Tensor | Exception] = []
            ready: list[tuple[int, _Session, torch.Tensor]] = []
            seen: set[str] = set()
            for i, (session, inputs, position) in enumerate(steps):
                try:
                    ready.append((i, self._batch_step(session, inputs, position, seen), inputs))
                    out.append(inputs)  # replaced below
                except (InputError, PositionMismatchError, SessionLimitError, KVMemoryLimitError) as exc:
                    out.append(exc)
            if len(ready) == 1:  # alone: the plain step, bit for bit an unbatched server's
                i, _, inputs = ready[0]
                out[i] = self.forward(steps[i][0], inputs, steps[i][2])
            elif ready:
                try:
                    outputs = self._run_batch([(state, inputs) for _, state, inputs in ready])
                except BaseException:
                    for i, state, _ in ready:  # nothing was appended; a session this step began goes
                        if state.length == 0:
                            self._sessions.pop(steps[i][0], None)
                    raise
                for (i, _, _), row in zip(ready, outputs, strict=True):
                    out[i] = row
            return out

    def _batch_step(self, session: str, inputs: torch.Tensor, position: int, seen: set[str]) -> _Session:
        if self.is_encoder:
            raise InputError("an encoder keeps no sessions to batch")
        if self._check_inputs(inputs) != (1, 1):
            raise InputError(f"a batched step is one token of one row, got shape {tuple(inputs.shape)}")
        if session in seen:
            raise InputError(f"session {session!r} has two steps in one batch")
        seen.add(session)
        return self._session_for_forward(session, position, 1, 1)

    def _run_batch(self, rows: Sequence[tuple[_Session, torch.Tensor]]) -> list[torch.Tensor]:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        lengths = [state.length for state, _ in rows]
        longest = max(lengths)
        mask = torch.zeros(len(rows), longest + 1, dtype=torch.long)
        for row, length in enumerate(lengths):
            mask[row, longest - length :] = 1
        cache = DynamicCache()
        layers = range(self.spec.first, self.spec.end)
        cache.layers.extend(DynamicLayer() for _ in range(self.spec.end))
        if longest:
            held = [state for state, _ in rows if state.length]
            for layer in layers:
                keys = [_kv(state, layer, "keys") for state, _ in rows]
                values = [_kv(state, layer, "values") for state, _ in rows]
                like_k, like_v = _kv(held[0], layer, "keys"), _kv(held[0], layer, "values")
                assert like_k is not None and like_v is not None
                cache.layers[layer].update(
                    torch.cat([_left_pad(k, longest, like_k) for k in keys]),
                    torch.cat([_left_pad(v, longest, like_v) for v in values]),
                )
        inputs = torch.cat([x for _, x in rows])
        outputs = self._run(inputs, mask, position_ids_for(mask, longest, 1), cache)
        for row, (state, _) in enumerate(rows):
            for layer in layers:
                new = cache.layers[layer]
                state.cache.update(new.keys[row : row + 1, :, -1:], new.values[row : row + 1, :, -1:], layer)
            state.length += 1
        return list(outputs.split(1))

    def _run(
        self,
        inputs: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        cache: DynamicCache | None,
    ) -> torch.Tensor:
        hidden = self._blocks.embed(inputs, position_ids) if self.is_first else inputs
        hidden = self._blocks.layers(hidden, attention_mask, position_ids, cache)
        return self._blocks.head(hidden) if self.is_last else hidden

    def _check_inputs(self, inputs: torch.Tensor) -> tuple[int, int]:
        if not isinstance(inputs, torch.Tensor):
            raise InputError(f"inputs must be a torch.Tensor, got {type(inputs).__name__}")
        if self.is_first:
            if inputs.dim() != 2 or inputs.dtype not in (torch.int64, torch.int32):
                raise InputError(
                    f"the first segment takes int64 token ids [B, T], got {inputs.dtype} "
                    f"{tuple(inputs.shape)}"
                )
            if inputs.numel() and (int(inputs.min()) < 0 or int(inputs.max()) >= self.info.vocab_size):
                raise InputError(f"token ids must lie in [0, {self.info.vocab_size})")
        elif inputs.dim() != 3 or inputs.shape[-1] != self.info.hidden_size or inputs.dtype != torch.float32:
            raise InputError(
                f"segment [{self.spec.first}, {self.spec.end}) takes float32 hidden states "
                f"[B, T, {self.info.hidden_size}], got {inputs.dtype} {tuple(inputs.shape)}; convert wire "
                "dtypes first"
            )
        batch, length = int(inputs.shape[0]), int(inputs.shape[1])
        if batch < 1 or length < 1:
            raise InputError(f"inputs must hold at least one token, got shape {tuple(inputs.shape)}")
        return batch, length

    @staticmethod
    def _check_mask(attention_mask: torch.Tensor | None, batch: int, total: int) -> torch.Tensor | None:
        if attention_mask is None:
            return None
        if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, total):
            raise InputError(
                f"attention_mask must be [B, position + T] = [{batch}, {total}], got "
                f"{tuple(attention_mask.shape)}"
            )
        return attention_mask.to(torch.long)

    def _session_for_forward(self, session: str, position: int, batch: int, length: int) -> _Session:
        state = self._sessions.get(session)
        current = 0 if state is None else state.length
        if position != current:
            raise PositionMismatchError(
                f"session {session!r} holds {current} tokens on segment [{self.spec.first}, "
                f"{self.spec.end}), "
                f"but the forward starts at position {position}; send position={current}, or "
                "truncate/import first"
            )
        if state is not None:
            self._check_complete(session, state)
            if batch != state.batch:
                raise InputError(f"session {session!r} has batch size {state.batch}, got {batch}")
        added = batch * length * self._kv_bytes_per_token
        if self.kv_bytes() + added > self.max_kv_bytes:
            raise KVMemoryLimitError(
                f"segment [{self.spec.first}, {self.spec.end}) would hold {self.kv_bytes() + added} KV "
                "bytes, "
                f"over its limit of {self.max_kv_bytes}; drop finished sessions or raise max_kv_bytes"
            )
        if state is None:
            state = self._new_session(session, batch)
        state.used_s = time.monotonic()
        return state

    def _new_session(self, session: str, batch: int) -> _Session:
        from transformers import DynamicCache

        if len(self._sessions) >= self.max_sessions:
            raise SessionLimitError(
                f"segment [{self.spec.first}, {self.spec.end}) already holds {len(self._sessions)} sessions "
                f"(max_sessions={self.max_sessions}); drop finished sessions or raise max_sessions"
            )
        # A lazily grown DynamicCache indexed by global layer number: layers before `first` stay empty.
        state = _Session(
            cache=DynamicCache(), batch=batch, length=0, layers=set(range(self.spec.first, self.spec.end))
        )
        self._sessions[session] = state
        return state

    def _check_complete(self, session: str, state: _Session) -> None:
        missing = sorted(set(range(self.spec.first, self.spec.end)) - state.layers)
        if missing:
            raise PositionMismatchError(
                f"session {session!r} lacks KV for layers {missing} on segment [{self.spec.first}, "
                f"{self.spec.end}); "
                "import them before running it"
            )

    # ------------------------------------------------------------------------------------------ KV management

    def sessions(self) -> list[str]:
        with self._lock:
            return sorted(self._sessions)

    def kv_length(self, session: str) -> int:
        """Tokens cached for ``session`` (0 for a session this segment does not know)."""
        with self._lock:
            state = self._sessions.get(session)
            return 0 if state is None else state.length

    def kv_bytes(self) -> int:
        with self._lock:
            return sum(self._session_bytes(state) for state in self._sessions.values())

    def _session_bytes(self, state: _Session) -> int:
        total = 0
        for layer in state.cache.layers:
            if getattr(layer, "is_initialized", False) and layer.keys is not None:
                total += layer.keys.numel() * layer.keys.element_size()
                total += layer.values.numel() * layer.values.element_size()
        return total

    def _get(self, session: str) -> _Session:
        state = self._sessions.get(session)
        if state is None:
            raise UnknownSessionError(
                f"segment [{self.spec.first}, {self.spec.end}) has no session {session!r}; "
                f"known: {sorted(self._sessions)[:10]}"
            )
        return state

    def _check_range(self, first: int, end: int) -> None:
        if not (self.spec.first <= first < end <= self.spec.end):
            raise InputError(
                f"layer range [{first}, {end}) is not inside this segment's [{self.spec.first}, "
                f"{self.spec.end})"
            )

    def export_kv(self, session: str, first: int, end: int) -> dict[str, torch.Tensor]:
        """Copies of the session's K and V for layers ``[first, end)``: keys ``"<layer>.k"``, ``"<layer>.v"``,
        each ``[B, kv_heads, length, head_dim]`` float32."""
        with self._lock:
            self._check_range(first, end)
            state = self._get(session)
            self._check_complete(session, state)
            out: dict[str, torch.Tensor] = {}
            for layer in range(first, end):
                cache_layer = state.cache.layers[layer]
                out[f"{layer}.k"] = cache_layer.keys.detach().clone().contiguous()
                out[f"{layer}.v"] = cache_layer.values.detach().clone().contiguous()
            return out

    def import_kv(self, session: str, tensors: Mapping[str, torch.Tensor], length: int) -> None:
        """Install K/V for some of this segment's layers (``export_kv`` format), creating the session if new.

        A session may be assembled from several imports (one per old segment); it runs once every layer of
        this segment is present, all at the same ``length``.
        """
        with self._lock:
            layers = self._parse_kv(tensors, length)
            state = self._sessions.get(session)
            if state is not None and state.layers and state.length != length:
                raise PositionMismatchError(
                    f"session {session!r} holds {state.length} tokens here; cannot import KV of length "
                    f"{length}"
                )
            batch = int(next(iter(tensors.values())).shape[0])
            if state is not None and state.layers and batch != state.batch:
                raise InputError(f"session {session!r} has batch size {state.batch}, imported KV has {batch}")
            replaced = 0
            if state is not None:
                for layer in layers & state.layers:
                    cache_layer = state.cache.layers[layer]
                    replaced += 2 * cache_layer.keys.numel() * cache_layer.keys.element_size()
            added = sum(t.numel() * 4 for t in tensors.values())
            if self.kv_bytes() - replaced + added > self.max_kv_bytes:
                raise KVMemoryLimitError(
                    f"importing {added} KV bytes would exceed segment [{self.spec.first}, {self.spec.end})'s "
                    f"limit of {self.max_kv_bytes}; drop finished sessions or raise max_kv_bytes"
                )
            if state is None:
                state = self._new_session(session, batch)
                state.layers = set()
            self._install(state, tensors, layers, length, batch)
            state.used_s = time.monotonic()

    def _parse_kv(self, tensors: Mapping[str, torch.Tensor], length: int) -> set[int]:
        if not tensors:
            raise InputError("import_kv needs at least one layer's K and V")
        if self.is_encoder:
            raise InputError("an encoder keeps no KV cache")
        if length < 1:
            raise InputError(f"imported KV length must be >= 1, got {length}")
        layers: set[int] = set()
        for key in tensors:
            layer_text, _, kind = key.partition(".")
            if kind not in ("k", "v") or not layer_text.isdigit():
                raise InputError(f"KV keys look like '12.k' / '12.v', got {key!r}")
            layers.add(int(layer_text))
        for layer in layers:
            if f"{layer}.k" not in tensors or f"{layer}.v" not in tensors:
                raise InputError(f"layer {layer} needs both '{layer}.k' and '{layer}.v'")
        self._check_range(min(layers), max(layers) + 1)
        width = kv_width(self.config)
        shapes = {tuple(t.shape) for t in tensors.values()}
        if len(shapes) != 1:
            raise InputError(f"imported K/V tensors differ in shape: {sorted(shapes)}")
        shape = shapes.pop()
        if len(shape) != 4 or shape[2] != length or shape[1] * shape[3] != width:
            raise InputError(
                f"imported K/V must be [B, kv_heads, {length}, head_dim] with kv_heads*head_dim={width}, "
                f"got {shape}"
            )
        return layers

    def _install(
        self, state: _Session, tensors: Mapping[str, torch.Tensor], layers: set[int], length: int, batch: int
    ) -> None:
        from transformers.cache_utils import DynamicLayer

        cache = state.cache
        while len(cache.layers) < self.spec.end:
            cache.layers.append(DynamicLayer())
        for layer in sorted(layers):
            fresh = DynamicLayer()
            fresh.update(
                tensors[f"{layer}.k"].detach().to(torch.float32).clone(),
                tensors[f"{layer}.v"].detach().to(torch.float32).clone(),
            )
            cache.layers[layer] = fresh
        state.layers |= layers
        state.length = length
        state.batch = batch

    def truncate(self, session: str, length: int) -> None:
        """Forget the session's tokens from ``length`` on (e.g. to roll back a speculative step)."""
        with self._lock:
            state = self._get(session)
            if not 0 <= length <= state.length:
                raise PositionMismatchError(
                    f"cannot truncate session {session!r} of {state.length} tokens to {length}"
                )
            self._crop(state, length)
            state.length = length

    @staticmethod
    def _crop(state: _Session, length: int) -> None:
        for layer in state.cache.layers:
            if (
                getattr(layer, "is_initialized", False)
                and layer.keys is not None
                and layer.keys.shape[-2] > length
            ):
                layer.keys = layer.keys[..., :length, :].clone()
                layer.values = layer.values[..., :length, :].clone()

    def drop_session(self, session: str) -> bool:
        """Free the session's KV; True if it existed (dropping an unknown session is not an error)."""
        with self._lock:
            return self._sessions.pop(session, None) is not None

    def evict_idle(self, idle_s: float) -> list[str]:
        """Drop the sessions no forward or import has used for ``idle_s``: a gateway that died or lost
        its connection never drops them, and they would hold KV and a place in ``max_sessions``."""
        cutoff = time.monotonic() - idle_s
        with self._lock:
            idle = sorted(sid for sid, state in self._sessions.items() if state.used_s < cutoff)
            for sid in idle:
                del self._sessions[sid]
            return idle


def run_chain(
    runners: list[SegmentRunner],
    session: str,
    inputs: torch.Tensor,
    position: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Feed ``inputs`` through ``runners`` in order, in this process (tests, ``verify``)."""
    out = inputs
    for runner in runners:
        out = runner.forward(session, out, position, attention_mask)
    return out
