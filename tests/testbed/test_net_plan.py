"""Topology planning: deterministic names, addresses and shortest-path routes (pure)."""

from __future__ import annotations

import pytest

from testbed.net import TopologyError, plan_topology


def _plan(links: list[tuple[str, str]], nodes: list[str] | None = None, prefix: str = "mecsplit"):
    nodes = nodes or sorted({n for lk in links for n in lk})
    return plan_topology(nodes, links, prefix, "10.213.0.0/16", "10.214.0.0/24")


def test_each_link_gets_a_bridge_and_a_subnet() -> None:
    plan = _plan([("a", "b"), ("b", "c")])
    ab, bc = plan.links
    assert (ab.bridge, ab.port_a, ab.port_b) == ("mecsplitb0", "mecsplitb0p0", "mecsplitb0p1")
    assert (ab.addr_a, ab.addr_b, bc.subnet) == ("10.213.0.1/24", "10.213.0.2/24", "10.213.1.0/24")
    assert plan.node("b").data_addr == "10.213.0.2"
    assert plan == _plan([("a", "b"), ("b", "c")])  # deterministic


def test_routes_follow_shortest_paths() -> None:
    # a - b - c - d and a shortcut a - d: a reaches the b-c subnet via b (tie broken by link order).
    plan = _plan([("a", "b"), ("b", "c"), ("c", "d"), ("a", "d")], nodes=["a", "b", "c", "d"])
    routes = {r.subnet: r.via for r in plan.node("a").routes}
    assert routes == {"10.213.1.0/24": "10.213.0.2", "10.213.2.0/24": "10.213.3.2"}
    line = _plan([("a", "b"), ("b", "c"), ("c", "d")], nodes=["a", "b", "c", "d"])
    assert {r.subnet: r.via for r in line.node("a").routes} == {
        "10.213.1.0/24": "10.213.0.2",
        "10.213.2.0/24": "10.213.0.2",
    }


def test_interface_names_fit_linux_limit() -> None:
    with pytest.raises(TopologyError, match="15 characters"):
        _plan([("a", "b")], prefix="mecsplitlongx")


def test_unknown_link_end_is_refused() -> None:
    with pytest.raises(TopologyError, match="known nodes"):
        plan_topology(["a"], [("a", "z")], "mecsplit", "10.213.0.0/16", "10.214.0.0/24")
