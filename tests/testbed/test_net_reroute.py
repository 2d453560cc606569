"""Routes around failed nodes (pure): the V2X handover, where the car must reach the MEC through rsu2
once rsu1 is gone; with nothing down the routes are the plan's own."""

from __future__ import annotations

from testbed.net import plan_topology, routes_avoiding

NODES = ["car", "rsu1", "rsu2", "mec", "cloud"]
LINKS = [("car", "rsu1"), ("car", "rsu2"), ("rsu1", "mec"), ("rsu2", "mec"), ("mec", "cloud")]


def _plan():
    return plan_topology(NODES, LINKS, "mecsplit", "10.213.0.0/16", "10.214.0.0/24")


def test_nothing_down_gives_the_plans_routes() -> None:
    plan = _plan()
    assert routes_avoiding(plan, set()) == {n.name: n.routes for n in plan.nodes}


def test_routes_avoid_a_failed_node() -> None:
    plan = _plan()
    car_rsu2, rsu1_mec, rsu2_mec = plan.links[1], plan.links[2], plan.links[3]
    before = {r.subnet: r.via for r in plan.node("car").routes}
    assert before[rsu1_mec.subnet] == plan.links[0].address_of("rsu1")  # the MEC's address: via rsu1
    routes = routes_avoiding(plan, {"rsu1"})
    assert "rsu1" not in routes
    car = {r.subnet: r.via for r in routes["car"]}
    assert car[rsu1_mec.subnet] == car_rsu2.address_of("rsu2")  # now via rsu2
    assert car[plan.links[4].subnet] == car_rsu2.address_of("rsu2")  # the cloud too
    mec = {r.subnet: r.via for r in routes["mec"]}
    assert mec[plan.links[0].subnet] == rsu2_mec.address_of("rsu2")  # replies reach the car's first address
    rsu1_addresses = {lk.address_of("rsu1") for lk in plan.links_of("rsu1")}
    assert not any(r.via in rsu1_addresses for rs in routes.values() for r in rs)
