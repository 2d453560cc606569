"""Mutual TLS on segment links: identities derived from the deployment secret, roles enforced per op."""

from __future__ import annotations

import asyncio
import json
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from wire_helpers import children_alive, num_layers

from segments import pki
from segments.auth import AuthError, Credentials, client_handshake, open_connection, server_handshake
from segments.client import ChainClient, ChainError, Session
from segments.launch import LocalChain
from segments.protocol import FrameType, read_frame, write_frame
from segments.reference import ReferenceModel, greedy_generate

MODEL = "gpt2-tiny"
SECRET = b"0123456789abcdef0123456789abcdef"
HIDDEN = 64  # gpt2-tiny's width


@pytest.fixture(scope="module")
def tls3(wire_store: Path) -> Iterator[LocalChain]:
    """Three servers over TLS (identities segment.p0..p2); the chain is the first two."""
    n = num_layers(wire_store, MODEL)
    with LocalChain.even(wire_store, MODEL, n, 2, tls=True) as lc:
        lc.specs = (*lc.specs, lc.specs[1])
        lc.processes.append(
            subprocess.Popen(lc._command(2, lc.specs[2]), stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        )
        lc.ports.append(lc._wait_ready(lc.processes[2], lc.specs[2]))
        pids = lc.pids
        lc.specs = lc.specs[:2]  # the chain: p0, p1 (p2 is a spare holding p1's range)
        yield lc
    assert children_alive(pids) == []


def test_keys_derive_from_the_secret_and_are_written_private(tmp_path: Path) -> None:
    a, b = pki.issue(SECRET, "segment.edge"), pki.issue(SECRET, "segment.edge")
    assert a.key_pem == b.key_pem  # re-issued at will: nothing private to store
    assert pki.issue(SECRET, "segment.cloud").key_pem != a.key_pem
    assert pki.issue(b"another-deployment-secret-000000", "segment.edge").key_pem != a.key_pem
    folder = pki.write_credentials(a, tmp_path / "edge")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / pki.KEY_FILE).stat().st_mode) == 0o400
    assert pki.own_identity(folder) == "segment.edge"
    with pytest.raises(pki.PkiError, match="unknown identity"):
        pki.issue(SECRET, "root")


def test_issue_command_writes_a_credentials_folder(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET.decode())
    out = subprocess.run(
        [sys.executable, "-m", "segments.pki", "issue", "--secret-file", str(secret_file),
         "--identity", "gateway", str(tmp_path / "gw")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert pki.own_identity(tmp_path / "gw") == "gateway"
    bad = subprocess.run(
        [sys.executable, "-m", "segments.pki", "issue", "--secret-file", str(secret_file),
         "--identity", "admin", str(tmp_path / "x")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2 and "unknown identity" in bad.stderr and not (tmp_path / "x").exists()


def test_generation_over_tls_is_exact(tls3: LocalChain, wire_store: Path) -> None:
    prompt = [5, 6, 7, 8]
    want, _ = greedy_generate(ReferenceModel(wire_store, MODEL).forward, "r", torch.tensor([prompt]), 6)
    with ChainClient(tls3.chain, tls3.auth(pki.GATEWAY)) as client:
        assert list(client.generate(Session(tokens=list(prompt)), 6)) == want[0].tolist()


def test_a_kv_push_between_servers_runs_as_the_segment_identity(tls3: LocalChain) -> None:
    """The gateway asks p1 to push a session's KV to the spare p2: p1 connects to p2 as segment.p1,
    which may import KV (and nothing that reconfigures)."""
    with ChainClient(tls3.chain, tls3.auth(pki.GATEWAY)) as client:
        session = Session(tokens=[9, 10, 11])
        list(client.generate(session, 2))
        hop = tls3.chain.hops[1]
        target = f"{hop.host}:{tls3.ports[2]}"
        result, _ = client.control(
            1, "push_kv", session=session.id, first=hop.first, end=hop.end, target=target
        )
        assert result["length"] == session.kv_length
        client.drop(session)


def _controls_on_one_connection(port: int, auth: bytes | Credentials, ops: list[tuple[str, dict]]) -> list:
    """Send each control op in turn on one authenticated connection; the frames that answer them."""

    async def run() -> list:
        reader, writer = await open_connection("127.0.0.1", port, auth)
        await client_handshake(reader, writer, auth, 10.0)
        answers = []
        for i, (op, args) in enumerate(ops):
            write_frame(writer, FrameType.CONTROL, {"op": op, "request_id": f"r{i}", **args})
            await writer.drain()
            answers.append(await read_frame(reader, 1 << 26, 10.0))
        writer.close()
        return answers

    return asyncio.run(run())


@pytest.mark.parametrize(
    ("identity", "op", "args"),
    [
        ("gateway", "load_range", {"model": MODEL, "first": 0, "end": 1}),
        ("gateway", "drain", {}),
        ("gateway", "sessions", {}),
        ("segment.p1", "export_kv", {"session": "s", "first": 0, "end": 1}),
        ("segment.p1", "drop", {"session": "s"}),
        ("segment.p1", "subscribe", {"channel": "stolen"}),
        ("segment.p1", "load_range", {"model": MODEL, "first": 0, "end": 1}),
    ],
)
def test_an_op_outside_the_role_is_forbidden_and_the_connection_serves_on(
    tls3: LocalChain, identity: str, op: str, args: dict[str, object]
) -> None:
    refused, health = _controls_on_one_connection(
        tls3.ports[0], tls3.auth(identity), [(op, args), ("health", {})]
    )
    assert refused.type == FrameType.ERROR and refused.header["code"] == "forbidden", refused
    assert identity in refused.header["message"]
    assert health.type == FrameType.REPLY and health.header["result"]["healthy"] is True
    (sessions,) = _controls_on_one_connection(tls3.ports[0], tls3.auth(), [("sessions", {})])
    assert sessions.type == FrameType.REPLY  # the orchestrator may


def test_a_plain_client_and_another_deployments_certificate_are_refused(
    tls3: LocalChain, tmp_path: Path
) -> None:
    with pytest.raises((AuthError, ChainError)):
        ChainClient(tls3.chain, SECRET)  # a shared secret over plain TCP
    other = pki.write_credentials(
        pki.issue(b"another-deployment-secret-000000", "orchestrator"), tmp_path / "o"
    )
    with pytest.raises(ChainError, match="cannot connect"):
        ChainClient(tls3.chain, Credentials(tls_dir=other))
    with ChainClient(tls3.chain, tls3.auth()) as client:  # the servers took no harm
        assert list(client.generate(Session(tokens=[1, 2]), 1))


def test_health_command_over_tls(tls3: LocalChain) -> None:
    credentials = tls3.auth()
    assert isinstance(credentials, Credentials) and credentials.tls_dir is not None
    out = subprocess.run(
        [sys.executable, "-m", "segments.client", "health", "--port", str(tls3.ports[0]),
         "--tls-dir", str(credentials.tls_dir)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads(out.stdout)["healthy"] is True


def test_a_client_refuses_a_server_whose_certificate_is_not_a_segment(tmp_path: Path) -> None:
    """Activations go only to segment servers: a gateway's certificate behind a listening port (a
    compromised source node posing as the next hop) is refused by the connecting side."""
    gateway = Credentials(tls_dir=pki.write_credentials(pki.issue(SECRET, "gateway"), tmp_path / "gw"))
    orchestrator = Credentials(
        tls_dir=pki.write_credentials(pki.issue(SECRET, "orchestrator"), tmp_path / "o")
    )

    async def run() -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with pytest.raises(Exception):  # noqa: B017 (the client hangs up during the handshake)
                await server_handshake(reader, writer, gateway, {"first": 0, "end": 1}, 5.0)
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=gateway.server_ssl)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=orchestrator.client_ssl)
        with pytest.raises(AuthError, match="not a segment server"):
            await client_handshake(reader, writer, orchestrator, 5.0)
        writer.close()
        server.close()
        await server.wait_closed()

    asyncio.run(run())


def _forward_once(port: int, auth: Credentials | bytes, first: int) -> dict:
    """One FORWARD of two positions of hidden states (as a previous hop sends) on its own connection;
    the header of the frame that answers it."""

    async def run() -> dict:
        reader, writer = await open_connection("127.0.0.1", port, auth)
        await client_handshake(reader, writer, auth, 10.0)
        header = {"session": "fw", "request_id": "f1", "position": 0, "layer": first, "route": [],
                  "channel": "nobody"}  # fmt: skip
        write_frame(writer, FrameType.FORWARD, header, {"x": torch.zeros(1, 2, HIDDEN)})
        await writer.drain()
        frame = await read_frame(reader, 1 << 26, 10.0)
        writer.close()
        return frame.header

    return asyncio.run(run())


def test_forward_only_from_the_hop_before_in_a_chain_a_gateway_built(tls3: LocalChain) -> None:
    """p0 precedes p1 in the chain the gateway opened: p0 may step p1. The spare p2 was never before p1:
    its FORWARD is forbidden, although it is a member of the deployment with the forward role."""
    first = tls3.specs[1].first
    with ChainClient(tls3.chain, tls3.auth(pki.GATEWAY)):
        refused = _forward_once(tls3.ports[1], tls3.auth("segment.p2"), first)
        assert refused["code"] == "forbidden" and "segment.p2" in refused["message"]
        served = _forward_once(tls3.ports[1], tls3.auth("segment.p0"), first)
        assert served["code"] != "forbidden"  # past the check: it computed, then found no subscriber
