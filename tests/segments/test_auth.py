"""Connection helpers of segments.auth: the congestion control every data-plane socket runs."""

from __future__ import annotations

import asyncio
import socket

from segments.auth import CONGESTION_CONTROL, open_connection, set_congestion_control

SECRET = b"0123456789abcdef0123456789abcdef"


def _algorithm(writer: asyncio.StreamWriter) -> bytes:
    sock = writer.get_extra_info("socket")
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\0")


def test_both_ends_of_a_connection_run_the_pinned_congestion_control() -> None:
    async def run() -> tuple[bytes, bytes, bool]:
        accepted: asyncio.Future[tuple[bytes, bool]] = asyncio.get_running_loop().create_future()

        async def handle(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            pinned = set_congestion_control(writer)
            accepted.set_result((_algorithm(writer), pinned))
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _reader, writer = await open_connection("127.0.0.1", port, SECRET)
        client_side = _algorithm(writer)
        server_side, pinned = await asyncio.wait_for(accepted, 10.0)
        writer.close()
        server.close()
        await server.wait_closed()
        return client_side, server_side, pinned

    client_side, server_side, pinned = asyncio.run(run())
    assert pinned
    assert client_side == server_side == CONGESTION_CONTROL


def test_a_socket_that_is_not_tcp_is_left_alone() -> None:
    class NoSocket:
        def get_extra_info(self, _name: str) -> None:
            return None

    assert set_congestion_control(NoSocket()) is False  # type: ignore[arg-type]
