"""The re-split benchmark's own network: two namespaces, a veth pair shaped both ways, removed after."""

from __future__ import annotations

import subprocess
import sys

import pytest

from flows.resplit_bench import DEV_IF, DEV_NS, EDGE_IF, EDGE_IP, EDGE_NS, TwoNodeNet
from testbed.link import Netns, get_rate_mbit

pytestmark = pytest.mark.root

LISTEN = f"""
import socket
server = socket.create_server(({EDGE_IP!r}, 7999))
print("listening", flush=True)
server.accept()
print("ok", flush=True)
"""
CONNECT = f"""
import socket
socket.create_connection(({EDGE_IP!r}, 7999), 5).close()
"""


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_two_node_net_is_shaped_both_ways_and_removed() -> None:
    with TwoNodeNet() as net:
        assert {DEV_NS, EDGE_NS} <= _namespaces()
        net.shape(10.0)
        assert get_rate_mbit(Netns(name=DEV_NS), DEV_IF) == pytest.approx(10.0)
        assert get_rate_mbit(Netns(name=EDGE_NS), EDGE_IF) == pytest.approx(10.0)
        # TCP across the pair: a listener in the edge namespace, a connection from the device's.
        listener = subprocess.Popen(
            ["ip", "netns", "exec", EDGE_NS, sys.executable, "-c", LISTEN], stdout=subprocess.PIPE, text=True
        )
        try:
            assert listener.stdout is not None and listener.stdout.readline().strip() == "listening"
            subprocess.run(
                ["ip", "netns", "exec", DEV_NS, sys.executable, "-c", CONNECT], check=True, timeout=30
            )
            assert listener.communicate(timeout=30)[0].strip() == "ok"
        finally:
            if listener.poll() is None:
                listener.kill()
                listener.wait()
    assert not {DEV_NS, EDGE_NS} & _namespaces()
