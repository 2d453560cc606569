"""Wire protocol: round trips of every dtype and shape, and typed errors for every kind of malformed frame."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from segments.protocol import (
    MAGIC,
    PREFIX,
    PREFIX_BYTES,
    VERSION,
    FrameTooLargeError,
    FrameType,
    ProtocolError,
    TruncatedFrameError,
    decode_frame,
    encode_frame_bytes,
)

LIMIT = 1 << 20
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int8]

shapes = st.lists(st.integers(min_value=0, max_value=5), min_size=0, max_size=4)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**53), 2**53), st.text(max_size=20))
headers = st.dictionaries(
    st.text(min_size=1, max_size=10).filter(lambda k: k != "tensors"),
    st.one_of(json_scalars, st.lists(json_scalars, max_size=4)),
    max_size=6,
)


def _tensor(dtype: torch.dtype, shape: list[int], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    return torch.randint(-100, 100, shape, generator=gen).to(dtype)


@settings(max_examples=200, deadline=None)
@given(
    ftype=st.sampled_from(list(FrameType)),
    header=headers,
    specs=st.lists(st.tuples(st.sampled_from(DTYPES), shapes), max_size=4),
    seed=st.integers(0, 1000),
)
def test_round_trip(ftype: FrameType, header: dict, specs: list, seed: int) -> None:
    tensors = {f"t{i}": _tensor(dtype, shape, seed + i) for i, (dtype, shape) in enumerate(specs)}
    data = encode_frame_bytes(ftype, header, tensors)
    frame = decode_frame(data, LIMIT)
    assert frame.type == ftype
    assert frame.header == header
    assert frame.wire_bytes == len(data)
    assert list(frame.tensors) == list(tensors)
    for name, t in tensors.items():
        got = frame.tensors[name]
        assert got.dtype == t.dtype and got.shape == t.shape
        assert torch.equal(got, t)


def test_bf16_bits_survive_exactly() -> None:
    t = torch.tensor([1.0, -0.0, float("inf"), 3.140625, 1e-38], dtype=torch.bfloat16)
    got = decode_frame(encode_frame_bytes(FrameType.FORWARD, {}, {"x": t}), LIMIT).tensors["x"]
    assert torch.equal(got.view(torch.int16), t.view(torch.int16))


def test_non_contiguous_tensor_is_sent_in_logical_order() -> None:
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).T
    got = decode_frame(encode_frame_bytes(FrameType.FORWARD, {}, {"x": t}), LIMIT).tensors["x"]
    assert torch.equal(got, t)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200))
def test_random_bytes_raise_protocol_error_only(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_frame(data, LIMIT)


@settings(max_examples=300, deadline=None)
@given(cut=st.integers(0, 10_000), seed=st.integers(0, 100))
def test_truncated_frames_raise(cut: int, seed: int) -> None:
    data = encode_frame_bytes(
        FrameType.FORWARD, {"session": "s"}, {"x": _tensor(torch.float32, [2, 3, 8], seed)}
    )
    cut = cut % len(data)
    with pytest.raises(ProtocolError):
        decode_frame(data[:cut], LIMIT)


@settings(max_examples=300, deadline=None)
@given(pos=st.integers(0, 10_000), value=st.integers(0, 255), seed=st.integers(0, 100))
def test_corrupted_frames_decode_or_raise_protocol_error(pos: int, value: int, seed: int) -> None:
    data = bytearray(
        encode_frame_bytes(FrameType.FORWARD, {"a": 1}, {"x": _tensor(torch.float16, [2, 5], seed)})
    )
    data[pos % len(data)] = value
    try:
        frame = decode_frame(bytes(data), LIMIT)
    except ProtocolError:
        return
    # A flip inside the payload is still a well-formed frame: the protocol does not checksum tensors.
    assert frame.type in set(FrameType)


def _raw(
    header: bytes,
    payload: bytes = b"",
    *,
    ftype: int = FrameType.FORWARD,
    flags: int = 0,
    magic: bytes = MAGIC,
    version: int = VERSION,
) -> bytes:
    return PREFIX.pack(magic, version, ftype, flags, len(header), len(payload)) + header + payload


@pytest.mark.parametrize(
    ("data", "what"),
    [
        (_raw(b"{}", magic=b"HTTP"), "magic"),
        (_raw(b"{}", version=VERSION + 1), "version"),
        (_raw(b"{}", ftype=99), "frame type"),
        (_raw(b"{}", flags=0x80), "flag"),
        (_raw(b""), "header length"),
        (_raw(b"\xff\xfe"), "UTF-8 JSON"),
        (_raw(b"[1, 2]"), "JSON object"),
        (_raw(b'{"tensors": []}'), "disagree"),
        (
            _raw(
                json.dumps({"tensors": [{"name": "x", "dtype": "f64", "shape": [1]}]}).encode(),
                b"\0" * 8,
                flags=1,
            ),
            "dtype",
        ),
        (
            _raw(
                json.dumps({"tensors": [{"name": "x", "dtype": "f32", "shape": [2]}]}).encode(),
                b"\0" * 4,
                flags=1,
            ),
            "payload bytes",
        ),
        (
            _raw(json.dumps({"tensors": [{"name": "x", "dtype": "f32", "shape": [-1]}]}).encode(), flags=1),
            "dimension",
        ),
        (
            _raw(
                json.dumps({"tensors": [{"name": "x", "dtype": "f32", "shape": [True]}]}).encode(),
                b"\0" * 4,
                flags=1,
            ),
            "dimension",
        ),
        (
            _raw(
                json.dumps({"tensors": [{"name": "x", "dtype": "f32", "shape": [2**19, 2**19]}]}).encode(),
                flags=1,
            ),
            "bytes",
        ),
        (
            _raw(
                json.dumps(
                    {
                        "tensors": [
                            {"name": "x", "dtype": "i8", "shape": [1]},
                            {"name": "x", "dtype": "i8", "shape": [1]},
                        ]
                    }
                ).encode(),
                b"\0\0",
                flags=1,
            ),
            "unique",
        ),
        (_raw(b"{}") + b"extra", "body has"),
    ],
)
def test_malformed_frames_name_the_problem(data: bytes, what: str) -> None:
    with pytest.raises(ProtocolError, match=what):
        decode_frame(data, LIMIT)


def test_oversized_frame_is_refused_from_the_prefix_alone() -> None:
    prefix = struct.pack("<4sBBHII", MAGIC, VERSION, FrameType.FORWARD, 0, 10, LIMIT)
    with pytest.raises(FrameTooLargeError, match="MAX_FRAME_BYTES"):
        decode_frame(prefix, LIMIT)


def test_short_prefix_is_truncated() -> None:
    with pytest.raises(TruncatedFrameError):
        decode_frame(b"MECS\x01", LIMIT)
    assert PREFIX_BYTES == 16
