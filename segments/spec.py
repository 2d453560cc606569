"""Value types that cross process boundaries: a segment's layer range and a model's shape.

Both are frozen and validated on construction, and travel as JSON (``to_json`` / ``from_json``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Literal

from segments.errors import LayerRangeError

ModelKind = Literal["causal_lm", "encoder"]
_KINDS: tuple[str, ...] = ("causal_lm", "encoder")


def _require_int(name: str, value: object) -> int:
    # bool is an int subclass; a range bound of True is a bug, not a layer index.
    if isinstance(value, bool) or not isinstance(value, int):
        raise LayerRangeError(f"{name} must be an int, got {value!r}")
    return value


@dataclass(frozen=True)
class SegmentSpec:
    """The half-open layer range ``[first, end)`` of ``model`` that one segment runs."""

    model: str
    first: int
    end: int

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise LayerRangeError(f"model must be a non-empty name, got {self.model!r}")
        first = _require_int("first", self.first)
        end = _require_int("end", self.end)
        if first < 0:
            raise LayerRangeError(f"first layer must be >= 0, got {first}")
        if end <= first:
            raise LayerRangeError(
                f"layer range [{first}, {end}) is empty: end must be greater than first (ranges are "
                "half-open)"
            )

    @property
    def num_layers(self) -> int:
        return self.end - self.first

    def check_within(self, model_layers: int) -> None:
        """Raise ``LayerRangeError`` unless the range fits a model of ``model_layers`` layers."""
        if self.end > model_layers:
            raise LayerRangeError(
                f"layer range [{self.first}, {self.end}) exceeds {self.model}, which has {model_layers} "
                f"layers (valid ends are 1..{model_layers})"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SegmentSpec:
        missing = {"model", "first", "end"} - set(data)
        if missing:
            raise LayerRangeError(f"segment spec lacks {sorted(missing)}: {data!r}")
        return cls(model=data["model"], first=data["first"], end=data["end"])

    @classmethod
    def from_json(cls, text: str) -> SegmentSpec:
        return cls.from_dict(json.loads(text))


def split_evenly(model: str, num_layers: int, parts: int) -> tuple[SegmentSpec, ...]:
    """``parts`` contiguous ranges covering ``[0, num_layers)``, sizes differing by at most one."""
    if parts < 1 or parts > num_layers:
        raise LayerRangeError(f"cannot split {num_layers} layers into {parts} non-empty segments")
    base, extra = divmod(num_layers, parts)
    specs: list[SegmentSpec] = []
    first = 0
    for index in range(parts):
        end = first + base + (1 if index < extra else 0)
        specs.append(SegmentSpec(model, first, end))
        first = end
    return tuple(specs)


@dataclass(frozen=True)
class ModelInfo:
    """The shape of a prepared model, as its store manifest records it."""

    name: str
    kind: ModelKind
    arch: str
    num_layers: int
    hidden_size: int
    vocab_size: int

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"model kind must be one of {_KINDS}, got {self.kind!r}")
        for field in ("num_layers", "hidden_size", "vocab_size"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{field} must be a positive int, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelInfo:
        return cls(**{key: data[key] for key in cls.__dataclass_fields__})

    @classmethod
    def from_json(cls, text: str) -> ModelInfo:
        return cls.from_dict(json.loads(text))
