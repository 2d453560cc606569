"""Who may talk to a segment server: mutual TLS with one identity per node, or a shared secret.

A process proves who it is with :class:`Credentials`, in one of two modes:

* **TLS** (``--tls-dir DIR``; every deployment the flows make): mutual TLS 1.3 with the deployment's CA
  (:mod:`segments.pki`); the peer's certificate names its identity and so its role, which the server
  checks on every operation. No node holds the deployment secret.
* **Shared secret** (``--secret-file FILE`` or ``MECSPLIT_SECRET``; loopback development, tests and
  benches): the HMAC challenge-response below over plain TCP; the secret's holder has every role.

In both modes the first frames are HELLO (the server's identity), AUTH and AUTH_OK. With TLS, AUTH and
AUTH_OK carry nothing (the TLS handshake authenticated both ends); with a shared secret:

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
import socket
import ssl
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from segments import pki
from segments.protocol import (
    VERSION,
    FrameType,
    ProtocolError,
    read_frame,
    require,
    write_frame,
)

SECRET_ENV = "MECSPLIT_SECRET"
MIN_SECRET_BYTES = 16
NONCE_BYTES = 32
# The handshake frames are tiny; an unauthenticated peer never gets to make us allocate more.
HANDSHAKE_MAX_FRAME_BYTES = 64 * 1024
# Every data-plane connection runs this TCP congestion control, whatever the host's default. Split
# inference sends short bursts (a prefill's activations) after idle gaps over links whose rate swings.
# BBR paces such a burst at the bandwidth it last estimated: after a stretch at 0.5 Mbit/s, 74 KB
# prefills over a link back at 20 Mbit/s took 297, 98, 67, 52 ms on the next requests against the
# link's 37.5 ms; Reno took 102 then 35-36 ms (`mecsplit bench links`, docs/segments-wire.md). The cost
# model prices a message at the link's rate, so the host's default would decide whether its predictions
# hold. Reno, not CUBIC: a network namespace (a container) may only select what the host allows, and
# Reno always is.
CONGESTION_CONTROL = b"reno"


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


@dataclass(frozen=True)
class Credentials:
    """This process's proof of identity: a TLS credentials folder, or the deployment secret itself."""

    tls_dir: Path | None = None
    secret: bytes | None = None

    def __post_init__(self) -> None:
        if (self.tls_dir is None) == (self.secret is None):
            raise SecretConfigError("give either a TLS credentials folder or a secret, not both or neither")

    @classmethod
    def of(cls, auth: bytes | Credentials) -> Credentials:
        """Bytes are a shared secret (the loopback mode every bench and test uses)."""
        return auth if isinstance(auth, Credentials) else cls(secret=auth)

    @classmethod
    def load(cls, tls_dir: Path | None, secret_file: Path | None) -> Credentials:
        """A command's credentials: ``--tls-dir`` if given, else the secret (file or environment)."""
        return cls(tls_dir=tls_dir) if tls_dir is not None else cls(secret=load_secret(secret_file))

    @cached_property
    def server_ssl(self) -> ssl.SSLContext | None:
        return pki.server_context(self.tls_dir) if self.tls_dir is not None else None

    @cached_property
    def client_ssl(self) -> ssl.SSLContext | None:
        return pki.client_context(self.tls_dir) if self.tls_dir is not None else None


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


def _peer_of(writer: asyncio.StreamWriter) -> str | None:
    return pki.peer_identity(writer.get_extra_info("ssl_object"))


async def server_handshake(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    auth: bytes | Credentials,
    identity: dict[str, Any],
    timeout_s: float,
) -> str:
    """Authenticate a connecting peer and return its identity (a certificate's common name; the secret's
    holder is the orchestrator). Raises AuthError (the caller sends the error frame) or ProtocolError."""
    credentials = Credentials.of(auth)
    tls = credentials.tls_dir is not None
    s_nonce = secrets.token_bytes(NONCE_BYTES)
    write_frame(
        writer,
        FrameType.HELLO,
        {"nonce": s_nonce.hex(), "version": VERSION, "auth": "tls" if tls else "secret", **identity},
    )
    await writer.drain()
    try:
        frame = await asyncio.wait_for(
            read_frame(reader, HANDSHAKE_MAX_FRAME_BYTES, timeout_s), timeout=timeout_s
        )
    except TimeoutError:
        raise AuthError(f"no authentication within {timeout_s} s") from None
    if frame.type != FrameType.AUTH:
        raise AuthError(f"expected an AUTH frame first, got {frame.type.name}; authenticate before use")
    if tls:
        peer = _peer_of(writer) or ""
        if pki.role_of(peer) == "unknown":
            raise AuthError(f"certificate identity {peer!r} has no role in this deployment")
        write_frame(writer, FrameType.AUTH_OK, {})
    else:
        assert credentials.secret is not None
        p_nonce = _nonce_from(frame.header)
        mac = require(frame.header, "mac", str)
        if not hmac.compare_digest(mac, peer_proof(credentials.secret, s_nonce, p_nonce)):
            raise AuthError("wrong secret: this peer is not part of the deployment")
        write_frame(writer, FrameType.AUTH_OK, {"mac": server_proof(credentials.secret, p_nonce, s_nonce)})
        peer = pki.ORCHESTRATOR
    await writer.drain()
    return peer


async def client_handshake(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    auth: bytes | Credentials,
    timeout_s: float,
) -> dict[str, Any]:
    """Authenticate to a server; returns its HELLO header (identity). Raises AuthError on refusal or when
    the server is not a segment server of this deployment."""
    credentials = Credentials.of(auth)

    async def _run() -> dict[str, Any]:
        hello = await read_frame(reader, HANDSHAKE_MAX_FRAME_BYTES, timeout_s)
        if hello.type == FrameType.ERROR:
            raise AuthError(f"server refused: {hello.header.get('message')}")
        if hello.type != FrameType.HELLO:
            raise ProtocolError(f"expected HELLO from the server, got {hello.type.name}")
        s_nonce = _nonce_from(hello.header)
        p_nonce = secrets.token_bytes(NONCE_BYTES)
        if credentials.tls_dir is not None:
            server = _peer_of(writer) or ""
            if pki.role_of(server) != "segment":
                raise AuthError(f"the server's certificate names {server!r}, not a segment server")
            write_frame(writer, FrameType.AUTH, {})
        else:
            assert credentials.secret is not None
            mac = peer_proof(credentials.secret, s_nonce, p_nonce)
            write_frame(writer, FrameType.AUTH, {"nonce": p_nonce.hex(), "mac": mac})
        await writer.drain()
        reply = await read_frame(reader, HANDSHAKE_MAX_FRAME_BYTES, timeout_s)
        if reply.type == FrameType.ERROR:
            raise AuthError(f"server refused authentication: {reply.header.get('message')}")
        if reply.type != FrameType.AUTH_OK:
            raise ProtocolError(f"expected AUTH_OK, got {reply.type.name}")
        if credentials.secret is not None:
            expected = server_proof(credentials.secret, p_nonce, s_nonce)
            if not hmac.compare_digest(require(reply.header, "mac", str), expected):
                raise AuthError("the server does not hold this deployment's secret; refusing to talk to it")
        return {**hello.header, "peer": _peer_of(writer) or pki.ORCHESTRATOR}

    try:
        return await asyncio.wait_for(_run(), timeout=timeout_s)
    except TimeoutError:
        raise AuthError(f"authentication did not complete within {timeout_s} s") from None


async def open_connection(
    host: str, port: int, auth: bytes | Credentials, **kwargs: Any
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection to a segment server, inside TLS when the credentials are a TLS identity.
    A failed TLS handshake raises ``ssl.SSLError`` (an ``OSError``)."""
    reader, writer = await asyncio.open_connection(host, port, ssl=Credentials.of(auth).client_ssl, **kwargs)
    set_congestion_control(writer)
    return reader, writer


def set_congestion_control(writer: asyncio.StreamWriter) -> bool:
    """Put the connection under :data:`CONGESTION_CONTROL`; False where the kernel refuses (the host's
    default then stays: a slower start after a rate rise, not an error)."""
    sock = writer.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, CONGESTION_CONTROL)
    except OSError:
        return False
    return True


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
