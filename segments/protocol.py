"""The segment wire protocol: compact, binary, versioned, length-prefixed frames.

Frame layout (all integers little-endian, the byte order of every machine the project targets, so tensor
payloads travel as they lie in memory):

=========  ======  ===================================================================
offset     bytes   field
=========  ======  ===================================================================
0          4       magic ``b"MECS"``
4          1       protocol version (``VERSION``)
5          1       frame type (:class:`FrameType`)
6          2       flags (bit 0: the payload holds tensors described by the header)
8          4       header length H in bytes
12         4       payload length P in bytes
16         H       header: one UTF-8 JSON object
16 + H     P       payload: the raw bytes of the tensors the header lists, in order
=========  ======  ===================================================================

A frame is therefore ``16 + H + P`` bytes and a reader knows its full length after 16 bytes, so it can
refuse an oversized frame before reading (or allocating) anything more.

Tensors are described in the header as ``"tensors": [{"name", "dtype", "shape"}, ...]``; the payload is
their bytes back to back in C order. Wire dtypes: ``f32``, ``f16``, ``bf16``, ``i64`` and ``i8``. bf16 has
no numpy dtype, so it crosses through an int16 view (same bytes, no copy).

Every malformed input raises :class:`ProtocolError` (or a subclass), never anything else: callers turn it
into an error frame and close the connection.
"""

from __future__ import annotations

import asyncio
import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

MAGIC = b"MECS"
VERSION = 1
PREFIX = struct.Struct("<4sBBHII")
PREFIX_BYTES = PREFIX.size  # 16
# A header is routing metadata, never bulk data: 1 MiB leaves room for a long route and a KV tensor list.
MAX_HEADER_BYTES = 1024 * 1024
MAX_TENSOR_RANK = 8
MAX_TENSORS = 4096

FLAG_TENSORS = 0x1
_KNOWN_FLAGS = FLAG_TENSORS


class FrameType(IntEnum):
    HELLO = 1  # server -> peer: nonce, server identity
    AUTH = 2  # peer -> server: HMAC of the nonce, the peer's own nonce
    AUTH_OK = 3  # server -> peer: HMAC of the peer's nonce (mutual authentication)
    ERROR = 4  # either way: code, message, request id
    FORWARD = 10  # activations (or token ids) for one step of a session, plus the remaining route
    RESULT = 11  # last hop -> client channel: token ids, optional logits / hidden states
    CONTROL = 20  # control operation request
    REPLY = 21  # control operation reply


class ProtocolError(Exception):
    """A frame that does not follow the protocol. The receiver replies with an error frame and closes."""

    code = "protocol"


class FrameTooLargeError(ProtocolError):
    code = "frame_too_large"


class TruncatedFrameError(ProtocolError):
    code = "truncated"


class ConnectionClosedError(Exception):
    """The peer closed the connection cleanly between two frames."""


# ----------------------------------------------------------------------------------------------- dtypes


@dataclass(frozen=True)
class _WireDtype:
    name: str
    itemsize: int
    numpy_name: str  # numpy dtype used to move the bytes (bf16 travels as int16)


_WIRE_DTYPES: dict[str, _WireDtype] = {
    "f32": _WireDtype("f32", 4, "<f4"),
    "f16": _WireDtype("f16", 2, "<f2"),
    "bf16": _WireDtype("bf16", 2, "<i2"),
    "i64": _WireDtype("i64", 8, "<i8"),
    "i8": _WireDtype("i8", 1, "<i1"),
}
WIRE_DTYPES: tuple[str, ...] = tuple(_WIRE_DTYPES)
FLOAT_WIRE_DTYPES: tuple[str, ...] = ("f32", "f16", "bf16")


def torch_dtype(wire: str) -> torch.dtype:
    import torch

    table = {
        "f32": torch.float32,
        "f16": torch.float16,
        "bf16": torch.bfloat16,
        "i64": torch.int64,
        "i8": torch.int8,
    }
    if wire not in table:
        raise ProtocolError(f"unknown wire dtype {wire!r}; use one of {', '.join(WIRE_DTYPES)}")
    return table[wire]


def wire_dtype(dtype: torch.dtype) -> str:
    import torch

    table = {
        torch.float32: "f32",
        torch.float16: "f16",
        torch.bfloat16: "bf16",
        torch.int64: "i64",
        torch.int8: "i8",
    }
    if dtype not in table:
        raise ProtocolError(f"dtype {dtype} cannot travel on the wire; convert to one of {WIRE_DTYPES}")
    return table[dtype]


# ------------------------------------------------------------------------------------------- tensors


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _WIRE_DTYPES[self.dtype].itemsize

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


def _parse_tensor_specs(raw: object, max_bytes: int) -> list[TensorSpec]:
    if not isinstance(raw, list):
        raise ProtocolError("header 'tensors' must be a list of {name, dtype, shape}")
    if len(raw) > MAX_TENSORS:
        raise ProtocolError(f"frame lists {len(raw)} tensors; at most {MAX_TENSORS} are allowed")
    specs: list[TensorSpec] = []
    names: set[str] = set()
    for item in raw:
        if not isinstance(item, dict) or set(item) != {"name", "dtype", "shape"}:
            raise ProtocolError("each tensor entry must be an object with exactly name, dtype, shape")
        name, dtype, shape = item["name"], item["dtype"], item["shape"]
        if not isinstance(name, str) or not name or name in names:
            raise ProtocolError(f"tensor name {name!r} must be a non-empty, unique string")
        if not isinstance(dtype, str) or dtype not in _WIRE_DTYPES:
            raise ProtocolError(f"tensor {name!r}: unknown dtype {dtype!r}; use one of {WIRE_DTYPES}")
        if not isinstance(shape, list) or len(shape) > MAX_TENSOR_RANK:
            raise ProtocolError(f"tensor {name!r}: shape must be a list of at most {MAX_TENSOR_RANK} ints")
        dims: list[int] = []
        for d in shape:
            # bool is an int subclass in Python; JSON true must not pass as a dimension.
            if not isinstance(d, int) or isinstance(d, bool) or d < 0 or d > max_bytes:
                raise ProtocolError(f"tensor {name!r}: bad dimension {d!r}")
            dims.append(d)
        spec = TensorSpec(name, dtype, tuple(dims))
        if spec.nbytes > max_bytes:
            raise ProtocolError(f"tensor {name!r} needs {spec.nbytes} bytes, more than the frame allows")
        names.add(name)
        specs.append(spec)
    return specs


def _tensor_to_buffer(t: torch.Tensor) -> tuple[TensorSpec, memoryview]:
    import torch

    if t.device.type != "cpu":
        t = t.cpu()
    t = t.detach().contiguous()
    dtype = wire_dtype(t.dtype)
    # bf16 has no numpy dtype: reinterpret the same bytes as int16 (no copy).
    view = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
    import numpy as np

    # Flat uint8 view of the same memory (memoryview.cast refuses zero-size shapes).
    arr = view.numpy().reshape(-1).view(np.uint8)
    return TensorSpec("", dtype, tuple(t.shape)), memoryview(arr)


def _buffer_to_tensor(spec: TensorSpec, buf: memoryview) -> torch.Tensor:
    import numpy as np
    import torch

    arr = np.frombuffer(buf, dtype=_WIRE_DTYPES[spec.dtype].numpy_name).reshape(spec.shape)
    t = torch.from_numpy(arr)
    if spec.dtype == "bf16":
        t = t.view(torch.bfloat16)
    return t


# --------------------------------------------------------------------------------------------- frames


@dataclass(frozen=True)
class Frame:
    """One decoded frame. ``tensors`` views the payload buffer (no copy); clone before mutating."""

    type: FrameType
    header: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    wire_bytes: int = 0


def encode_frame(
    ftype: FrameType,
    header: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor] | None = None,
) -> list[bytes | memoryview]:
    """Encode a frame as a list of buffers for ``writelines`` (tensor bytes are not copied)."""
    if "tensors" in header:
        raise ValueError("the header key 'tensors' is reserved for the payload description")
    specs: list[dict[str, Any]] = []
    buffers: list[memoryview] = []
    for name, t in (tensors or {}).items():
        spec, buf = _tensor_to_buffer(t)
        specs.append({"name": name, "dtype": spec.dtype, "shape": list(spec.shape)})
        buffers.append(buf)
    full_header = dict(header)
    flags = 0
    if tensors:
        full_header["tensors"] = specs
        flags |= FLAG_TENSORS
    header_bytes = json.dumps(full_header, separators=(",", ":")).encode()
    payload_len = sum(b.nbytes for b in buffers)
    if len(header_bytes) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(header_bytes)} bytes exceeds {MAX_HEADER_BYTES}")
    prefix = PREFIX.pack(MAGIC, VERSION, int(ftype), flags, len(header_bytes), payload_len)
    return [prefix + header_bytes, *buffers]


def encode_frame_bytes(
    ftype: FrameType, header: Mapping[str, Any], tensors: Mapping[str, torch.Tensor] | None = None
) -> bytes:
    return b"".join(bytes(b) for b in encode_frame(ftype, header, tensors))


@dataclass(frozen=True)
class Prefix:
    ftype: FrameType
    flags: int
    header_len: int
    payload_len: int


def parse_prefix(data: bytes, max_frame_bytes: int) -> Prefix:
    if len(data) < PREFIX_BYTES:
        raise TruncatedFrameError(f"frame prefix has {len(data)} of {PREFIX_BYTES} bytes")
    magic, version, ftype, flags, header_len, payload_len = PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r}; this port speaks the mecsplit segment protocol")
    if version != VERSION:
        raise ProtocolError(f"protocol version {version} is not supported; this server speaks {VERSION}")
    try:
        frame_type = FrameType(ftype)
    except ValueError:
        raise ProtocolError(f"unknown frame type {ftype}") from None
    if flags & ~_KNOWN_FLAGS:
        raise ProtocolError(f"unknown flag bits {flags & ~_KNOWN_FLAGS:#x}")
    if header_len == 0 or header_len > MAX_HEADER_BYTES:
        raise ProtocolError(f"header length {header_len} outside 1..{MAX_HEADER_BYTES}")
    total = PREFIX_BYTES + header_len + payload_len
    if total > max_frame_bytes:
        raise FrameTooLargeError(
            f"frame of {total} bytes exceeds the limit of {max_frame_bytes} bytes "
            "(raise MECSPLIT_SEGMENTS__MAX_FRAME_BYTES on both ends or send smaller chunks)"
        )
    return Prefix(frame_type, flags, header_len, payload_len)


def decode_body(prefix: Prefix, body: bytes | bytearray | memoryview, max_frame_bytes: int) -> Frame:
    """Decode header and payload of a frame whose prefix is already parsed."""
    if len(body) != prefix.header_len + prefix.payload_len:
        raise TruncatedFrameError(
            f"frame body has {len(body)} bytes, expected {prefix.header_len + prefix.payload_len}"
        )
    view = memoryview(body)
    try:
        header = json.loads(bytes(view[: prefix.header_len]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ProtocolError(f"header is not UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header must be a JSON object")
    has_tensors = bool(prefix.flags & FLAG_TENSORS)
    if has_tensors != ("tensors" in header):
        raise ProtocolError("the tensors flag and the header's 'tensors' list disagree")
    specs = _parse_tensor_specs(header.pop("tensors"), max_frame_bytes) if has_tensors else []
    expected = sum(s.nbytes for s in specs)
    if expected != prefix.payload_len:
        raise ProtocolError(
            f"tensors need {expected} payload bytes but the frame carries {prefix.payload_len}"
        )
    payload = view[prefix.header_len :]
    # torch wants a writable buffer; one copy of the payload per frame, then the tensors view it.
    if payload.readonly:
        payload = memoryview(bytearray(payload))
    tensors: dict[str, torch.Tensor] = {}
    offset = 0
    for spec in specs:
        tensors[spec.name] = _buffer_to_tensor(spec, payload[offset : offset + spec.nbytes])
        offset += spec.nbytes
    return Frame(prefix.ftype, header, tensors, PREFIX_BYTES + prefix.header_len + prefix.payload_len)


def decode_frame(data: bytes | bytearray | memoryview, max_frame_bytes: int) -> Frame:
    """Decode exactly one whole frame from ``data`` (trailing bytes are an error)."""
    prefix = parse_prefix(bytes(data[:PREFIX_BYTES]), max_frame_bytes)
    return decode_body(prefix, memoryview(data)[PREFIX_BYTES:], max_frame_bytes)


async def read_frame(reader: asyncio.StreamReader, max_frame_bytes: int, body_timeout_s: float) -> Frame:
    """Read one frame. Clean EOF between frames raises ConnectionClosedError; a stalled or cut frame
    raises TruncatedFrameError, so a peer can never hold a reader forever in the middle of a frame."""
    try:
        head = await reader.readexactly(PREFIX_BYTES)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            raise ConnectionClosedError("peer closed the connection") from None
        raise TruncatedFrameError(f"connection closed after {len(exc.partial)} prefix bytes") from None
    prefix = parse_prefix(head, max_frame_bytes)
    try:
        body = await asyncio.wait_for(
            reader.readexactly(prefix.header_len + prefix.payload_len), timeout=body_timeout_s
        )
    except asyncio.IncompleteReadError as exc:
        raise TruncatedFrameError(
            f"connection closed after {len(exc.partial)} of {prefix.header_len + prefix.payload_len} "
            "body bytes"
        ) from None
    except TimeoutError:
        raise TruncatedFrameError(f"frame body not complete within {body_timeout_s} s") from None
    return decode_body(prefix, body, max_frame_bytes)


def write_frame(
    writer: asyncio.StreamWriter,
    ftype: FrameType,
    header: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor] | None = None,
) -> int:
    """Queue one frame on ``writer`` without awaiting, so frames from concurrent tasks never interleave.
    Returns the number of bytes queued; the caller awaits ``writer.drain()`` for back-pressure."""
    buffers = encode_frame(ftype, header, tensors)
    writer.writelines(buffers)
    return sum(len(b) if isinstance(b, bytes) else b.nbytes for b in buffers)


def error_header(code: str, message: str, request_id: str | None = None) -> dict[str, Any]:
    header: dict[str, Any] = {"code": code, "message": message}
    if request_id is not None:
        header["request_id"] = request_id
    return header


def require(header: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    """Fetch a typed header field or raise ProtocolError naming it."""
    if key not in header:
        raise ProtocolError(f"header lacks required field {key!r}")
    value = header[key]
    if isinstance(value, bool) and kind in (int, (int,)):
        raise ProtocolError(f"header field {key!r} must be an integer, not a boolean")
    if not isinstance(value, kind):
        raise ProtocolError(f"header field {key!r} has the wrong type {type(value).__name__}")
    return value


def optional(header: Mapping[str, Any], key: str, kind: type | tuple[type, ...], default: Any) -> Any:
    if key not in header or header[key] is None:
        return default
    return require(header, key, kind)


def str_list(header: Mapping[str, Any], key: str) -> Sequence[str]:
    value = optional(header, key, list, [])
    if not all(isinstance(v, str) for v in value):
        raise ProtocolError(f"header field {key!r} must be a list of strings")
    return value
