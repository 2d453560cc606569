"""Typed errors of the segments package.

Every error carries a stable ``code`` so that a segment server can send it over the wire and the client can
raise the same type again on its side (``error_for_code``). Messages say what to do about the problem.
"""

from __future__ import annotations

from typing import ClassVar


class SegmentError(Exception):
    """Base of every error raised by ``segments``."""

    code: ClassVar[str] = "segment_error"


class UnknownModelError(SegmentError):
    """The model name is not one of the presets."""

    code: ClassVar[str] = "unknown_model"


class StoreError(SegmentError):
    """The model store is missing, incomplete or damaged."""

    code: ClassVar[str] = "store_error"


class ModelNotPreparedError(StoreError):
    """The model has no (complete) entry in the store."""

    code: ClassVar[str] = "model_not_prepared"


class ChecksumError(StoreError):
    """A store file does not match the sha256 recorded in its manifest."""

    code: ClassVar[str] = "checksum_mismatch"


class LayerRangeError(SegmentError, ValueError):
    """A layer range is empty, reversed or outside the model."""

    code: ClassVar[str] = "layer_range"


class InputError(SegmentError, ValueError):
    """A forward input has the wrong dtype or shape for this segment."""

    code: ClassVar[str] = "bad_input"


class SessionError(SegmentError):
    """Base of the per-session (KV cache) errors."""

    code: ClassVar[str] = "session_error"


class UnknownSessionError(SessionError):
    """The session has no KV cache on this segment."""

    code: ClassVar[str] = "unknown_session"


class SessionLimitError(SessionError):
    """Opening the session would exceed the segment's ``max_sessions``."""

    code: ClassVar[str] = "session_limit"


class KVMemoryLimitError(SessionError):
    """Growing the KV cache would exceed the segment's ``max_kv_bytes``."""

    code: ClassVar[str] = "kv_memory_limit"


class PositionMismatchError(SessionError):
    """A forward's ``position`` is not the session's current KV length."""

    code: ClassVar[str] = "position_mismatch"


_ALL: tuple[type[SegmentError], ...] = (
    SegmentError,
    UnknownModelError,
    StoreError,
    ModelNotPreparedError,
    ChecksumError,
    LayerRangeError,
    InputError,
    SessionError,
    UnknownSessionError,
    SessionLimitError,
    KVMemoryLimitError,
    PositionMismatchError,
)
ERRORS_BY_CODE: dict[str, type[SegmentError]] = {cls.code: cls for cls in _ALL}


def error_for_code(code: str, message: str) -> SegmentError:
    """The typed error for a wire ``code`` (a plain ``SegmentError`` for an unknown code)."""
    return ERRORS_BY_CODE.get(code, SegmentError)(message)
