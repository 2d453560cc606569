"""Per-deployment shared secret and the mutual HMAC-SHA256 challenge-response on every connection.

Handshake (before any other frame is accepted):

1. server -> peer  ``HELLO   {nonce: hex(32 random bytes), version, model, first, end}``
2. peer -> server  ``AUTH    {nonce: hex(32 random bytes), mac}`` with
   ``mac = HMAC(secret, "mecsplit-peer" | s_nonce | p_nonce)``
3. server -> peer  ``AUTH_OK {mac: HMAC(secret, "mecsplit-server" | p_nonce | s_nonce)}``
   or ``ERROR {code: "auth"}`` and the connection is closed.

Both sides prove knowledge of the secret without sending it, fresh nonces defeat replay, and the peer
learns that it talks to a server of the same deployment (so activations never go to an impostor).

Create a secret with ``python -m segments.auth create FILE``; servers and clients read it from
``--secret-file FILE`` or from the environment variable ``MECSPLIT_SECRET``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from segments.protocol import (
    VERSION,
    FrameType,
    ProtocolError,
    error_header,
    read_frame,
    require,
    write_frame,
)

SECRET_ENV = "MECSPLIT_SECRET"
MIN_SECRET_BYTES = 16
NONCE_BYTES = 32
# The handshake frames are tiny; an unauthenticated peer never gets to make us allocate more.
HANDSHAKE_MAX_FRAME_BYTES = 64 * 1024


class AuthError(Exception):
    """Authentication failed: the peer does not hold this deployment's secret."""

    code = "auth"


class SecretConfigError(Exception):
    """No usable secret was configured."""


def create_secret(path: Path) -> Path:
    """Write a fresh random secret (hex, 32 bytes of entropy) readable only by its owner."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32) + "\n")
    return path


def load_secret(secret_file: Path | None = None) -> bytes:
    """The deployment secret from ``secret_file`` or, without one, from ``MECSPLIT_SECRET``."""
    if secret_file is not None:
        try:
            raw = secret_file.read_text().strip()
        except OSError as exc:
            raise SecretConfigError(
                f"cannot read secret file {secret_file}: {exc}; create one with "
                "`python -m segments.auth create FILE`"
            ) from None
    else:
        raw = os.environ.get(SECRET_ENV, "").strip()
        if not raw:
            raise SecretConfigError(
                f"no secret: pass --secret-file FILE or set {SECRET_ENV}; create one with "
                "`python -m segments.auth create FILE`"
            )
    secret = raw.encode()
    if len(secret) < MIN_SECRET_BYTES:
        raise SecretConfigError(f"the secret has {len(secret)} bytes; use at least {MIN_SECRET_BYTES}")
    return secret


def _mac(secret: bytes, label: bytes, first: bytes, second: bytes) -> str:
    return hmac.new(secret, label + b"|" + first + b"|" + second, hashlib.sha256).hexdigest()


def peer_proof(secret: bytes, server_nonce: bytes, peer_nonce: bytes) -> str:
    """The MAC a connecting peer sends in its AUTH frame."""
    return _mac(secret, b"mecsplit-peer", server_nonce, peer_nonce)


def server_proof(secret: bytes, peer_nonce: bytes, server_nonce: bytes) -> str:
    """The MAC the server answers with in AUTH_OK."""
    return _mac(secret, b"mecsplit-server", peer_nonce, server_nonce)


def _nonce_from(header: dict[str, Any], key: str = "nonce") -> bytes:
    value = require(header, key, str)
    try:
        nonce = bytes.fromhex(value)
    except ValueError:
        raise ProtocolError(f"{key} is not hex") from None
    if len(nonce) != NONCE_BYTES:
        raise ProtocolError(f"{key} must be {NONCE_BYTES} bytes")
    return nonce


async def server_handshake(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    secret: bytes,
    identity: dict[str, Any],
    timeout_s: float,
) -> None:
    """Authenticate a connecting peer; raises AuthError (after sending an error frame) or ProtocolError."""
    s_nonce = secrets.token_bytes(NONCE_BYTES)
    write_frame(writer, FrameType.HELLO, {"nonce": s_nonce.hex(), "version": VERSION, **identity})
    await writer.drain()
    try:
        frame = await asyncio.wait_for(
            read_frame(reader, HANDSHAKE_MAX_FRAME_BYTES, timeout_s), timeout=timeout_s
        )
    except TimeoutError:
        raise AuthError(f"no authentication within {timeout_s} s") from None
    if frame.type != FrameType.AUTH:
        raise AuthError(f"expected an AUTH frame first, got {frame.type.name}; authenticate before use")
    p_nonce = _nonce_from(frame.header)
    mac = require(frame.header, "mac", str)
    if not hmac.compare_digest(mac, peer_proof(secret, s_nonce, p_nonce)):
        raise AuthError("wrong secret: this peer is not part of the deployment")
    write_frame(writer, FrameType.AUTH_OK, {"mac": server_proof(secret, p_nonce, s_nonce)})
    await writer.drain()


async def client_handshake(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, secret: bytes, timeout_s: float
) -> dict[str, Any]:
    """Authenticate to a server; returns its HELLO header (identity). Raises AuthError on refusal."""

    async def _run() -> dict[str, Any]:
        hello = await read_frame(reader, HANDSHAKE_MAX_FRAME_BYTES, timeout_s)
        if hello.type == FrameType.ERROR:
            raise AuthError(f"server refused: {hello.header.get('message')}")
        if hello.type != FrameType.HELLO:
            raise ProtocolError(f"expected HELLO from the server, got {hello.type.name}")
        s_nonce = _nonce_from(hello.header)
        p_nonce = secrets.token_bytes(NONCE_BYTES)
        mac = peer_proof(secret, s_nonce, p_nonce)
        write_frame(writer, FrameType.AUTH, {"nonce": p_nonce.hex(), "mac": mac})
        await writer.drain()
        reply = await read_frame(reader, HANDSHAKE_MAX_FRAME_BYTES, timeout_s)
        if reply.type == FrameType.ERROR:
            raise AuthError(f"server refused authentication: {reply.header.get('message')}")
        if reply.type != FrameType.AUTH_OK:
            raise ProtocolError(f"expected AUTH_OK, got {reply.type.name}")
        expected = server_proof(secret, p_nonce, s_nonce)
        if not hmac.compare_digest(require(reply.header, "mac", str), expected):
            raise AuthError("the server does not hold this deployment's secret; refusing to talk to it")
        return hello.header

    try:
        return await asyncio.wait_for(_run(), timeout=timeout_s)
    except TimeoutError:
        raise AuthError(f"authentication did not complete within {timeout_s} s") from None


def auth_error_header(message: str) -> dict[str, Any]:
    return error_header(AuthError.code, message)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m segments.auth", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    create = sub.add_parser("create", help="write a new random secret to FILE (mode 0600)")
    create.add_argument("file", type=Path)
    args = parser.parse_args(argv)
    if args.cmd == "create":
        path = create_secret(args.file)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
