"""The whole model in one process, from the same store: the ground truth for ``verify`` and the tests.

``ReferenceModel.forward`` has the segment chain's semantics (session, position, padding mask) but runs the
stock Hugging Face model class end to end, so a chain of ``SegmentRunner`` objects can be compared with it
bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from segments import store
from segments.errors import InputError, PositionMismatchError
from segments.runner import position_ids_for
from segments.spec import ModelInfo

ForwardFn = Callable[[str, torch.Tensor, int, "torch.Tensor | None"], torch.Tensor]


class ReferenceModel:
    """The stock Hugging Face model with the full state dict of a store entry."""

    def __init__(self, store_dir: Path, name: str) -> None:
        self.store_dir = Path(store_dir)
        self.manifest = store.read_manifest(self.store_dir, name)
        self.info: ModelInfo = self.manifest.info
        self.config = store.load_config(self.store_dir, self.manifest)
        with torch.device("meta"):
            model = store.build_hf_model(self.config, self.info.kind)
        state: dict[str, torch.Tensor] = {}
        for part in ["embed", *range(self.info.num_layers), "head"]:
            state.update(store.load_part(self.store_dir, self.manifest, part))
        # strict: every tensor of the whole model must come from the store.
        model.load_state_dict(state, strict=True, assign=True)
        if getattr(self.config, "tie_word_embeddings", False) and self.info.kind == "causal_lm":
            model.tie_weights()
        self._rebuild_buffers(model)
        self.model = model.eval()
        self._caches: dict[str, object] = {}

    def _rebuild_buffers(self, model: torch.nn.Module) -> None:
        """Recreate computed (non-persistent) buffers that a meta build left empty."""
        for name, module in model.named_modules():
            if any(b.is_meta for b in module.buffers(recurse=False)):
                fresh = type(module)(self.config)
                for buffer_name, buffer in fresh.named_buffers(recurse=False):
                    module.register_buffer(buffer_name, buffer, persistent=False)
                if any(b.is_meta for b in module.buffers(recurse=False)):
                    raise RuntimeError(f"cannot rebuild the buffers of {name}")

    def kv_length(self, session: str) -> int:
        cache = self._caches.get(session)
        return 0 if cache is None else int(cache.get_seq_length())

    def drop_session(self, session: str) -> None:
        self._caches.pop(session, None)

    def forward(
        self,
        session: str,
        inputs: torch.Tensor,
        position: int,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, V] (causal LM) or final hidden states [B, T, H] (encoder) for token ids [B, T]."""
        from transformers import DynamicCache

        if inputs.dim() != 2:
            raise InputError(f"the reference takes token ids [B, T], got shape {tuple(inputs.shape)}")
        length = int(inputs.shape[1])
        if attention_mask is not None:
            attention_mask = attention_mask.to(torch.long)
        with torch.inference_mode():
            if self.info.kind == "encoder":
                if position != 0:
                    raise PositionMismatchError("an encoder keeps no KV: position must be 0")
                return self.model(input_ids=inputs, attention_mask=attention_mask).last_hidden_state
            if position != self.kv_length(session):
                raise PositionMismatchError(
                    f"reference session {session!r} holds {self.kv_length(session)} tokens, got position "
                    f"{position}"
                )
            cache = self._caches.setdefault(session, DynamicCache())
            out = self.model(
                input_ids=inputs,
                attention_mask=attention_mask,
                position_ids=position_ids_for(attention_mask, position, length),
                cache=cache,
                use_cache=True,
            )
            return out.logits


def greedy_generate(
    forward: ForwardFn,
    session: str,
    input_ids: torch.Tensor,
    steps: int,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy decoding through any ``forward`` with the shared semantics (a reference or a runner chain).

    Returns the generated ids [B, steps] and the logits of every step (prompt logits first).
    """
    logits = forward(session, input_ids, 0, attention_mask)
    all_logits = [logits]
    position = int(input_ids.shape[1])
    tokens: list[torch.Tensor] = []
    for _ in range(steps):
        next_ids = logits[:, -1, :].argmax(dim=-1, keepdim=True)
        tokens.append(next_ids)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, torch.ones_like(next_ids)], dim=1)
        logits = forward(session, next_ids, position, attention_mask)
        all_logits.append(logits)
        position += 1
    return torch.cat(tokens, dim=1), all_logits
