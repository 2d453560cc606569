"""Helpers shared by the wire-side tests: a prepared tiny store and a blocking raw-socket peer."""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path

from segments.auth import peer_proof
from segments.protocol import PREFIX_BYTES, Frame, FrameType, decode_body, encode_frame_bytes, parse_prefix

TINY = ("gpt2-tiny", "llama-tiny")


def num_layers(store_dir: Path, model: str) -> int:
    from segments.store import read_manifest

    return read_manifest(store_dir, model).info.num_layers


def recv_exact(sock: socket.socket, n: int) -> bytes | None:
    chunks = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def recv_frame(sock: socket.socket, limit: int = 1 << 26) -> Frame | None:
    """One frame, or None on EOF."""
    head = recv_exact(sock, PREFIX_BYTES)
    if head is None:
        return None
    prefix = parse_prefix(head, limit)
    body = recv_exact(sock, prefix.header_len + prefix.payload_len)
    assert body is not None, "server closed in the middle of a frame"
    return decode_body(prefix, body, limit)


def raw_connect(port: int, secret: bytes | None, timeout_s: float = 10.0) -> socket.socket:
    """A blocking socket, authenticated when ``secret`` is given (else only the HELLO is read)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
    hello = recv_frame(sock)
    assert hello is not None and hello.type == FrameType.HELLO
    if secret is not None:
        p_nonce = secrets.token_bytes(32)
        mac = peer_proof(secret, bytes.fromhex(hello.header["nonce"]), p_nonce)
        sock.sendall(encode_frame_bytes(FrameType.AUTH, {"nonce": p_nonce.hex(), "mac": mac}))
        ok = recv_frame(sock)
        assert ok is not None and ok.type == FrameType.AUTH_OK, ok
    return sock


def assert_error_then_closed(sock: socket.socket, code: str | None = None) -> Frame:
    frame = recv_frame(sock)
    assert frame is not None and frame.type == FrameType.ERROR, frame
    if code is not None:
        assert frame.header["code"] == code, frame.header
    assert recv_exact(sock, 1) is None, "the server must close the connection after a bad frame"
    return frame


def children_alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        alive.append(pid)
    return alive
