"""The deployment's certificates: mutual TLS on every segment link, one identity per node.

Every key is derived from the deployment secret (HKDF-SHA256 over the secret, with the identity as
``info``), so the orchestrator, which holds the secret, can issue any identity's credentials again at any
time and stores no private key; a node receives only its own key and certificate and never the secret.

Identities are certificate common names, and each names a role:

* ``orchestrator``: the flows that deploy and reconfigure (every control operation);
* ``gateway``: the source node's gateway (steps, and moving and dropping its own sessions);
* ``segment.<node>``: a segment server on ``<node>`` (steps to the next hop, pushing KV to a peer).

A credentials folder holds ``key.pem`` (mode 0400), ``cert.pem`` and ``ca.pem``. Issue one with
``python -m segments.pki issue --secret-file FILE --identity segment.edge DIR``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import os
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import NameOID

ORCHESTRATOR = "orchestrator"
GATEWAY = "gateway"
SEGMENT_PREFIX = "segment."
CA_IDENTITY = "mecsplit-deployment-ca"
KEY_FILE, CERT_FILE, CA_FILE = "key.pem", "cert.pem", "ca.pem"
# Fixed validity: the credentials are re-derived, never renewed; a deployment's life is its secret's.
_NOT_BEFORE = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
_NOT_AFTER = dt.datetime(2125, 1, 1, tzinfo=dt.UTC)
_CURVE_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551  # NIST P-256


class PkiError(Exception):
    """Credentials missing, unreadable or not of this deployment."""


def segment_identity(node: str) -> str:
    return SEGMENT_PREFIX + node


def role_of(identity: str) -> str:
    """``orchestrator``, ``gateway`` or ``segment``; anything else is ``unknown`` (refused everywhere)."""
    if identity in (ORCHESTRATOR, GATEWAY):
        return identity
    if identity.startswith(SEGMENT_PREFIX) and len(identity) > len(SEGMENT_PREFIX):
        return "segment"
    return "unknown"


def derive_key(secret: bytes, identity: str) -> ec.EllipticCurvePrivateKey:
    """The P-256 key of ``identity``: the same secret and identity always give the same key."""
    okm = HKDF(algorithm=hashes.SHA256(), length=48, salt=b"mecsplit-pki-v1", info=identity.encode()).derive(
        secret
    )
    # 48 bytes reduced modulo the order: the bias is below 2^-128.
    scalar = int.from_bytes(okm, "big") % (_CURVE_ORDER - 1) + 1
    return ec.derive_private_key(scalar, ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _serial(identity: str) -> int:
    return int.from_bytes(hashlib.sha256(identity.encode()).digest()[:16], "big") >> 1


def _certificate(
    subject: str, key: ec.EllipticCurvePrivateKey, ca_key: ec.EllipticCurvePrivateKey, *, is_ca: bool
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(CA_IDENTITY))
        .public_key(key.public_key())
        .serial_number(_serial(subject))
        .not_valid_before(_NOT_BEFORE)
        .not_valid_after(_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=0 if is_ca else None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if is_ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
    return builder.sign(ca_key, hashes.SHA256())


@dataclass(frozen=True)
class Issued:
    """One identity's credentials, PEM-encoded."""

    identity: str
    key_pem: bytes
    cert_pem: bytes
    ca_pem: bytes


def issue(secret: bytes, identity: str) -> Issued:
    """Credentials for ``identity``, signed by the deployment's CA (itself derived from the secret)."""
    if role_of(identity) == "unknown":
        raise PkiError(f"unknown identity {identity!r}: use orchestrator, gateway or segment.<node>")
    ca_key = derive_key(secret, CA_IDENTITY)
    key = derive_key(secret, identity)
    ca = _certificate(CA_IDENTITY, ca_key, ca_key, is_ca=True)
    cert = _certificate(identity, key, ca_key, is_ca=False)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pem = serialization.Encoding.PEM
    return Issued(identity, key_pem, cert.public_bytes(pem), ca.public_bytes(pem))


def credential_files(issued: Issued) -> dict[str, bytes]:
    """File name -> content of a credentials folder."""
    return {KEY_FILE: issued.key_pem, CERT_FILE: issued.cert_pem, CA_FILE: issued.ca_pem}


def write_credentials(issued: Issued, folder: Path, uid: int | None = None) -> Path:
    """A credentials folder readable by its owner only (``uid``: hand it to the server's user)."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)
    for name, content in credential_files(issued).items():
        path = folder / name
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        with os.fdopen(fd, "wb") as fh:
            fh.write(content)
        if uid is not None:
            os.chown(path, uid, -1)
    if uid is not None:
        os.chown(folder, uid, -1)
    return folder


def _context(purpose: ssl.Purpose, folder: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(purpose, cafile=str(folder / CA_FILE))
    # Peers are named by certificate identity, not by host name: the caller checks the identity.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(str(folder / CERT_FILE), str(folder / KEY_FILE))
    return context


def server_context(folder: Path) -> ssl.SSLContext:
    """A server context that requires a client certificate of the deployment."""
    return _checked(ssl.Purpose.CLIENT_AUTH, folder)


def client_context(folder: Path) -> ssl.SSLContext:
    """A client context that presents this identity and accepts servers of the deployment only."""
    return _checked(ssl.Purpose.SERVER_AUTH, folder)


def _checked(purpose: ssl.Purpose, folder: Path) -> ssl.SSLContext:
    try:
        return _context(purpose, folder)
    except (OSError, ssl.SSLError) as exc:
        raise PkiError(
            f"cannot load TLS credentials from {folder} ({KEY_FILE}, {CERT_FILE}, {CA_FILE}): {exc}"
        ) from None


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
    """The common name of the verified peer certificate, or None without TLS."""
    if ssl_object is None:
        return None
    cert = ssl_object.getpeercert()
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def own_identity(folder: Path) -> str:
    """The common name of a credentials folder's certificate."""
    try:
        cert = x509.load_pem_x509_certificate((folder / CERT_FILE).read_bytes())
    except (OSError, ValueError) as exc:
        raise PkiError(f"cannot read {folder / CERT_FILE}: {exc}") from None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def main(argv: list[str] | None = None) -> int:
    from segments.auth import SecretConfigError, load_secret

    parser = argparse.ArgumentParser(prog="python -m segments.pki", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    cmd = sub.add_parser("issue", help="write IDENTITY's credentials folder (key 0400) to DIR")
    cmd.add_argument("--secret-file", type=Path, required=True, help="the deployment secret")
    cmd.add_argument("--identity", required=True, help="orchestrator, gateway or segment.<node>")
    cmd.add_argument("dir", type=Path)
    args = parser.parse_args(argv)
    try:
        folder = write_credentials(issue(load_secret(args.secret_file), args.identity), args.dir)
    except (PkiError, SecretConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
