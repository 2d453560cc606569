"""The re-split benchmark's own network: two namespaces, a veth pair shaped both ways, removed after."""

from __future__ import annotations

import subprocess

import pytest

from flows.resplit_bench import DEV_IF, DEV_NS, EDGE_IF, EDGE_IP, EDGE_NS, TwoNodeNet
from testbed.link import Netns, get_rate_mbit

pytestmark = pytest.mark.root


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_two_node_net_is_shaped_both_ways_and_removed() -> None:
    with TwoNodeNet() as net:
        assert {DEV_NS, EDGE_NS} <= _namespaces()
        net.shape(10.0)
        assert get_rate_mbit(Netns(name=DEV_NS), DEV_IF) == pytest.approx(10.0)
        assert get_rate_mbit(Netns(name=EDGE_NS), EDGE_IF) == pytest.approx(10.0)
        ping = ["ip", "netns", "exec", DEV_NS, "ping", "-c", "1", "-W", "2", EDGE_IP]
        assert subprocess.run(ping, capture_output=True).returncode == 0
    assert not {DEV_NS, EDGE_NS} & _namespaces()
