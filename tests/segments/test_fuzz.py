"""Fuzz a live segment server with >= 10,000 random, truncated, oversized and wrong-shape frames.

Every malformed frame must get an ERROR reply and a closed connection (a mutated frame that is still
well-formed may instead get an ERROR for its content, or a clean close), never a crash or a hang, and a
session on another connection keeps generating exactly as it would undisturbed.
"""

from __future__ import annotations

import json
import os
import random
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

import torch
from wire_helpers import num_layers, raw_connect, recv_exact, recv_frame

from segments.client import ChainClient, Session
from segments.launch import LocalChain
from segments.protocol import MAGIC, PREFIX, VERSION, FrameType, encode_frame_bytes
from segments.spec import split_evenly

MODEL = "gpt2-tiny"
FRAMES = 10_000
MAX_FRAME_BYTES = 256 * 1024
SEED = 20260101


def _forward_header(rng: random.Random) -> dict:
    return {
        "session": f"fz{rng.randrange(4)}",
        "request_id": f"r{rng.randrange(10**6)}",
        "position": 0,
        "layer": 0,
        "route": [],
        "channel": "nobody",
    }


def _valid_forward(rng: random.Random) -> bytes:
    ids = torch.randint(
        0, 1000, (1, rng.randint(1, 4)), generator=torch.Generator().manual_seed(rng.randrange(99))
    )
    return encode_frame_bytes(FrameType.FORWARD, _forward_header(rng), {"x": ids})


def _random_bytes(rng: random.Random) -> bytes:
    return rng.randbytes(rng.randint(1, 64))


def _garbage_body(rng: random.Random) -> bytes:
    body = rng.randbytes(rng.randint(1, 64))
    return PREFIX.pack(MAGIC, VERSION, rng.choice([10, 20]), 0, len(body), 0) + body


def _truncated(rng: random.Random) -> bytes:
    data = _valid_forward(rng)
    return data[: rng.randrange(1, len(data))]


def _oversized(rng: random.Random) -> bytes:
    return PREFIX.pack(MAGIC, VERSION, FrameType.FORWARD, 1, 64, MAX_FRAME_BYTES + rng.randrange(1, 1 << 30))


def _wrong_shape(rng: random.Random) -> bytes:
    choice = rng.randrange(5)
    header = _forward_header(rng)
    tensors: dict[str, torch.Tensor]
    if choice == 0:
        tensors = {"x": torch.zeros(1, 3, 7)}  # hidden states to the first segment
    elif choice == 1:
        tensors = {"x": torch.zeros(2, dtype=torch.int64)}  # rank 1
    elif choice == 2:
        tensors = {"x": torch.tensor([[10**9]])}  # token id outside the vocabulary
    elif choice == 3:
        tensors = {"x": torch.tensor([[1, 2]]), "mask": torch.ones(1, 7, dtype=torch.int64)}
    else:
        tensors = {"x": torch.zeros(1, 0, dtype=torch.int64)}  # empty
    return encode_frame_bytes(FrameType.FORWARD, header, tensors)


_BAD_VALUES: dict[str, list[object]] = {
    "position": ["3", -3, [1], True, 1.5, None],
    "route": ["nohost", [1, 2], ["nohost"], ["h:99999"], {"a": 1}],
    "session": ["x" * 500, "", 3, [1], None],
    "request_id": ["x" * 500, "", 3.5, None],
    "layer": [-3, "0", 5, True, None],
    "sampling": [{"a": 1}, "greedy", {"temperature": -1}, {"top_p": 0}],
    "wire_dtype": ["f64", 3],
    "logits": ["some", 3],
    "channel": ["", 7, None],
}


def _bad_fields(rng: random.Random) -> bytes:
    """A well-framed FORWARD with one field of the wrong type or value (None: the field is missing)."""
    header = _forward_header(rng)
    key = rng.choice(sorted(_BAD_VALUES))
    value = rng.choice(_BAD_VALUES[key])
    if value is None:
        del header[key]
    else:
        header[key] = value
    return encode_frame_bytes(FrameType.FORWARD, header, {"x": torch.tensor([[1, 2, 3]])})


def _wrong_type(rng: random.Random) -> bytes:
    ftype = rng.choice([FrameType.RESULT, FrameType.REPLY, FrameType.HELLO, FrameType.AUTH_OK])
    return encode_frame_bytes(ftype, {"request_id": "x"})


def _bad_prefix(rng: random.Random) -> bytes:
    fields = [MAGIC, VERSION, int(FrameType.FORWARD), 0, 2, 0]
    index = rng.randrange(4)
    fields[index] = [b"XXXX", VERSION + rng.randint(1, 200), rng.choice([0, 5, 99, 255]), 0x8000][index]
    return struct.pack("<4sBBHII", *fields) + b"{}"


def _mutated(rng: random.Random) -> bytes:
    data = bytearray(_valid_forward(rng))
    for _ in range(rng.randint(1, 3)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data)


# (maker, authenticate first, must close after the error)
_KINDS: list[tuple[Callable[[random.Random], bytes], bool, bool]] = [
    (_random_bytes, False, True),
    (_random_bytes, True, True),
    (_garbage_body, True, True),
    (_truncated, True, True),
    (_oversized, True, True),
    (_wrong_shape, True, True),
    (_bad_fields, True, True),
    (_wrong_type, True, True),
    (_bad_prefix, True, True),
    (_bad_prefix, False, True),
    (_mutated, True, False),
]


def _hit(port: int, secret: bytes, data: bytes, authenticate: bool, must_close: bool) -> str:
    sock = raw_connect(port, secret if authenticate else None, timeout_s=20.0)
    try:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)  # a cut frame ends in EOF, so the server never waits for the rest
        frame = recv_frame(sock)
        assert frame is not None, f"no error reply to {data[:40]!r}"
        assert frame.type == FrameType.ERROR, frame
        if must_close:
            assert recv_exact(sock, 1) is None, f"connection left open after {data[:40]!r}"
        return str(frame.header["code"])
    finally:
        sock.close()


def test_fuzz_ten_thousand_frames(wire_store: Path) -> None:
    rng = random.Random(SEED)
    specs = split_evenly(MODEL, num_layers(wire_store, MODEL), 1)
    with LocalChain(wire_store, specs, max_frame_bytes=MAX_FRAME_BYTES) as lc:
        secret = lc.secret()
        with ChainClient(lc.chain, secret) as client:
            undisturbed = Session(tokens=[1, 2, 3])
            expected = list(client.generate(undisturbed, 20))
            client.drop(undisturbed)
            live = Session(tokens=[1, 2, 3])
            codes: dict[str, int] = {}
            t0 = time.monotonic()
            for i in range(FRAMES):
                maker, authenticate, must_close = _KINDS[i % len(_KINDS)]
                code = _hit(lc.ports[0], secret, maker(rng), authenticate, must_close)
                codes[code] = codes.get(code, 0) + 1
                if i % 500 == 0:
                    assert len(list(client.generate(live, 1))) == 1
            elapsed_s = time.monotonic() - t0
            assert live.tokens[3:] == expected[: len(live.tokens) - 3]
            stats = client.stats()[0]
        assert lc.processes[0].poll() is None, "the server died"
    assert sum(codes.values()) == FRAMES
    assert stats["errors"] >= FRAMES
    if os.environ.get("MECSPLIT_FUZZ_REPORT"):
        print(json.dumps({"frames": FRAMES, "elapsed_s": round(elapsed_s, 1), "replies": codes}))
