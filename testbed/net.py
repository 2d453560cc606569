"""The emulated MEC network: a Mininet topology of Linux bridges with Docker node containers as hosts.

Design (see docs/testbed.md): every scenario link is point-to-point, so each becomes its own Linux
bridge (Mininet ``LinuxBridge``, no controller, no OVS) with exactly two ports, one veth into each
endpoint's node container (Containernet-style: the container-side end is moved into the container's
network namespace by its PID). The bridge ports live in the root namespace, so each direction of a link
is shaped on the egress of the port that faces the receiver, with no IFB, and a failed node's links go
down by setting those ports down. Each link gets its own /24; nodes forward (ip_forward) and carry
static routes along shortest paths, so any node reaches any other across the shaped links only. A
separate, unshaped management bridge connects every node with the host, so that processes on the host
(the daemon, Prefect flows) can reach the segment servers inside the nodes.

``plan_topology`` is pure (names in, addresses/routes out) and unit-tested; ``EmulatedNetwork``
realises a plan with Mininet.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
from collections import deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from testbed.errors import TestbedError
from testbed.shell import DeadlineShell

MAX_IFNAME = 15


class TopologyError(TestbedError):
    """The scenario cannot be turned into a network (names too long, too many links, ...)."""


@dataclass(frozen=True)
class LinkPlan:
    """One scenario link: a two-port bridge, a veth into each endpoint, and a /24."""

    index: int
    a: str
    b: str
    bridge: str
    port_a: str  # root-namespace bridge port facing node a (shape b->a traffic on its egress)
    port_b: str  # root-namespace bridge port facing node b (shape a->b traffic on its egress)
    intf_a: str  # interface name inside node a
    intf_b: str
    subnet: str
    addr_a: str  # "10.213.0.1/24"
    addr_b: str

    @property
    def key(self) -> str:
        return f"{self.a}-{self.b}"

    def port_towards(self, receiver: str) -> str:
        return self.port_b if receiver == self.b else self.port_a

    def address_of(self, node: str) -> str:
        return (self.addr_a if node == self.a else self.addr_b).split("/")[0]


@dataclass(frozen=True)
class Route:
    subnet: str
    via: str


@dataclass(frozen=True)
class NodePlan:
    name: str
    index: int
    mgmt_port: str  # root-namespace port on the management bridge
    mgmt_intf: str  # interface inside the node
    mgmt_addr: str  # "10.214.0.10/24"
    data_addr: str  # canonical data-plane address (first link's address), "" for an isolated node
    routes: tuple[Route, ...]


@dataclass(frozen=True)
class TopologyPlan:
    prefix: str
    nodes: tuple[NodePlan, ...]
    links: tuple[LinkPlan, ...]
    mgmt_bridge: str
    mgmt_host_addr: str

    def node(self, name: str) -> NodePlan:
        for node in self.nodes:
            if node.name == name:
                return node
        raise TopologyError(f"unknown node {name!r}; known: {[n.name for n in self.nodes]}")

    def link(self, a: str, b: str) -> LinkPlan:
        for link in self.links:
            if {link.a, link.b} == {a, b}:
                return link
        raise TopologyError(f"no link between {a!r} and {b!r}; links: {[lk.key for lk in self.links]}")

    def links_of(self, node: str) -> list[LinkPlan]:
        return [lk for lk in self.links if node in (lk.a, lk.b)]


def _check_ifname(name: str) -> str:
    if len(name) > MAX_IFNAME:
        raise TopologyError(
            f"interface name {name!r} is longer than {MAX_IFNAME} characters: use a testbed prefix of at "
            "most 9 characters (MECSPLIT_TESTBED__PREFIX) or fewer links"
        )
    return name


def _first_hops(source: str, adjacency: dict[str, list[tuple[str, int]]]) -> dict[str, tuple[int, str]]:
    """BFS from source: for each reachable node, (hop distance, first-hop neighbour). Deterministic."""
    result: dict[str, tuple[int, str]] = {source: (0, source)}
    queue: deque[str] = deque([source])
    while queue:
        here = queue.popleft()
        dist, first = result[here]
        for neighbour, _ in adjacency[here]:
            if neighbour not in result:
                result[neighbour] = (dist + 1, neighbour if here == source else first)
                queue.append(neighbour)
    return result


def plan_topology(
    node_names: Sequence[str],
    links: Sequence[tuple[str, str]],
    prefix: str,
    data_net: str,
    mgmt_net: str,
) -> TopologyPlan:
    """Names, addresses and static routes for a scenario; pure and deterministic (scenario order)."""
    data = ipaddress.ip_network(data_net)
    mgmt = ipaddress.ip_network(mgmt_net)
    subnets = list(data.subnets(new_prefix=24)) if data.prefixlen <= 24 else []
    if len(links) > len(subnets):
        raise TopologyError(
            f"{len(links)} links need {len(links)} /24s but data_net {data_net} has "
            f"{len(subnets)}: choose a larger MECSPLIT_TESTBED__DATA_NET"
        )
    if len(node_names) + 10 > mgmt.num_addresses - 2:
        raise TopologyError(f"mgmt_net {mgmt_net} is too small for {len(node_names)} nodes")
    known = set(node_names)
    adjacency: dict[str, list[tuple[str, int]]] = {n: [] for n in node_names}
    link_plans: list[LinkPlan] = []
    intf_count = dict.fromkeys(node_names, 0)
    for k, (a, b) in enumerate(links):
        if a not in known or b not in known or a == b:
            raise TopologyError(f"link {k} ({a}-{b}) must join two different known nodes")
        hosts = list(subnets[k].hosts())
        intf_a, intf_b = f"eth{intf_count[a]}", f"eth{intf_count[b]}"
        intf_count[a] += 1
        intf_count[b] += 1
        bridge = _check_ifname(f"{prefix}b{k}")
        link_plans.append(LinkPlan(
            index=k, a=a, b=b, bridge=bridge,
            port_a=_check_ifname(f"{bridge}p0"), port_b=_check_ifname(f"{bridge}p1"),
            intf_a=intf_a, intf_b=intf_b, subnet=str(subnets[k]),
            addr_a=f"{hosts[0]}/24", addr_b=f"{hosts[1]}/24",
        ))  # fmt: skip
        adjacency[a].append((b, k))
        adjacency[b].append((a, k))
    mgmt_hosts = list(mgmt.hosts())
    mgmt_bridge = _check_ifname(f"{prefix}m")
    node_plans = []
    for i, name in enumerate(node_names):
        mine = [lk for lk in link_plans if name in (lk.a, lk.b)]
        node_plans.append(NodePlan(
            name=name, index=i, mgmt_port=_check_ifname(f"{prefix}m{i}"), mgmt_intf="mgmt0",
            mgmt_addr=f"{mgmt_hosts[10 + i]}/{mgmt.prefixlen}",
            data_addr=mine[0].address_of(name) if mine else "",
            routes=_routes_for(name, adjacency, link_plans),
        ))  # fmt: skip
    return TopologyPlan(
        prefix=prefix,
        nodes=tuple(node_plans),
        links=tuple(link_plans),
        mgmt_bridge=mgmt_bridge,
        mgmt_host_addr=f"{mgmt_hosts[0]}/{mgmt.prefixlen}",
    )


def routes_avoiding(plan: TopologyPlan, down: Collection[str]) -> dict[str, tuple[Route, ...]]:
    """Every up node's static routes along shortest paths that avoid the nodes in ``down`` (a failed node
    neither forwards nor answers): what a node failure, a restore or a join re-applies, so that traffic
    takes the surviving path (V2X: the car reaches the MEC through rsu2 once rsu1 is gone)."""
    adjacency: dict[str, list[tuple[str, int]]] = {n.name: [] for n in plan.nodes}
    for lk in plan.links:
        if lk.a in down or lk.b in down:
            continue
        adjacency[lk.a].append((lk.b, lk.index))
        adjacency[lk.b].append((lk.a, lk.index))
    return {n: _routes_for(n, adjacency, list(plan.links)) for n in adjacency if n not in down}


def _routes_for(
    name: str, adjacency: dict[str, list[tuple[str, int]]], links: list[LinkPlan]
) -> tuple[Route, ...]:
    hops = _first_hops(name, adjacency)
    routes = []
    for link in links:
        if name in (link.a, link.b):
            continue
        reachable = [(hops[end][0], i, end) for i, end in enumerate((link.a, link.b)) if end in hops]
        if not reachable:
            continue  # a disconnected part of the graph: nothing to route to
        _, _, target = min(reachable)
        neighbour = hops[target][1]
        via_link = min(adjacency[name], key=lambda nk: (nk[0] != neighbour, nk[1]))[1]
        routes.append(Route(subnet=link.subnet, via=links[via_link].address_of(neighbour)))
    return tuple(routes)


# ----------------------------------------------------------------------------------------------- runtime
def _run(cmd: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise TestbedError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[:300]}")
    return proc


def check_mgmt_net_free(plan: TopologyPlan) -> None:
    """Refuse a management network that a route of the host already covers.

    Two routes to one subnet (a second testbed, or one a killed daemon left behind) make the host's
    packets to the nodes leave by whichever came first, and they fail with "no route to host".
    """
    mgmt = ipaddress.ip_network(plan.mgmt_host_addr, strict=False)
    routes = json.loads(_run(["ip", "-j", "route", "show"]).stdout or "[]")
    for route in routes:
        dst, dev = route.get("dst", "default"), route.get("dev", "?")
        if dst == "default" or dev == plan.mgmt_bridge:
            continue
        if ipaddress.ip_network(dst, strict=False).overlaps(mgmt):
            raise TestbedError(
                f"management network {mgmt} overlaps the host's route {dst} on {dev}: another testbed "
                f"(or one a killed daemon left; `mecsplit testbed down --force` with its prefix) holds it; "
                f"stop it, or give this one another MECSPLIT_TESTBED__MGMT_NET"
            )


def allow_bridge_forwarding(bridge: str, comment: str) -> None:
    """Docker sets FORWARD DROP and br_netfilter makes bridged frames pass it: let our bridge through."""
    rule = _forward_rule("DOCKER-USER", bridge, comment)
    if _run(["iptables", "-w", "-C", *rule], check=False).returncode != 0:
        chain = (
            "DOCKER-USER"
            if _run(["iptables", "-w", "-n", "-L", "DOCKER-USER"], check=False).returncode == 0
            else "FORWARD"
        )
        _run(["iptables", "-w", "-I", chain, *rule[1:]])


def _forward_rule(chain: str, bridge: str, comment: str) -> list[str]:
    """iptables arguments of the rule that lets frames through our bridge (tagged with our comment)."""
    return [chain, "-i", bridge, "-o", bridge, "-m", "comment", "--comment", comment, "-j", "ACCEPT"]


def remove_bridge_forwarding(bridge: str, comment: str) -> None:
    for chain in ("DOCKER-USER", "FORWARD"):
        rule = _forward_rule(chain, bridge, comment)
        while _run(["iptables", "-w", "-C", *rule], check=False).returncode == 0:
            _run(["iptables", "-w", "-D", *rule])


def _mininet_classes() -> tuple[type, type]:
    """Mininet node classes: a host living in a container's netns and a plain Linux bridge switch.

    Imported lazily (Mininet needs root and mnexec). The bridge is our own few lines rather than
    Mininet's ``LinuxBridge`` because the PyPI Mininet lacks it and it relies on brctl and on port names
    containing the bridge name; this one uses iproute2, no STP and no forwarding delay.
    """
    from mininet.node import Host, Switch

    # DeadlineShell first: every command into these nodes' shells has a deadline (testbed.shell).
    class ContainerHost(DeadlineShell, Host):
        """A Mininet host whose shell joins a Docker container's namespaces (``mnexec -a PID``)."""

        def __init__(self, name: str, container_pid: int, **params: object) -> None:
            self.container_pid = container_pid
            super().__init__(name, inNamespace=False, **params)

        def startShell(self, mnopts: str | None = None) -> None:
            super().startShell(mnopts=f"-cda{self.container_pid}")

    class BridgeSwitch(DeadlineShell, Switch):
        """A Linux bridge with all its ports enslaved, no controller."""

        def start(self, _controllers: list[object]) -> None:
            self.cmd(f"ip link add {self.name} type bridge forward_delay 0 stp_state 0")
            for intf in self.intfList():
                if intf.name != "lo":
                    self.cmd(f"ip link set {intf.name} master {self.name}")
            self.cmd(f"ip link set {self.name} up")

        def stop(self, deleteIntfs: bool = True) -> None:
            self.cmd(f"ip link del {self.name}")
            super().stop(deleteIntfs)

    return ContainerHost, BridgeSwitch


class EmulatedNetwork:
    """Realises a TopologyPlan with Mininet: LinuxBridge switches, container hosts, static routes."""

    def __init__(self, plan: TopologyPlan, container_pids: dict[str, int], shell_timeout_s: float) -> None:
        self.plan = plan
        self.container_pids = container_pids
        self.shell_timeout_s = shell_timeout_s  # per command sent into a Mininet shell (testbed.shell)
        self.net = None  # mininet.net.Mininet once built

    def _host_name(self, node: str) -> str:
        # The shell's argv carries it (``mininet:<prefix>-<node>``): cleanup finds leftover shells by it.
        return f"{self.plan.prefix}-{node}"

    def build(self) -> None:
        from mininet.link import Link
        from mininet.net import Mininet

        container_host, bridge_switch = _mininet_classes()
        # Mininet.init() would raise machine-wide sysctls and rlimits (fixLimits); we need none of it.
        Mininet.inited = True
        net = Mininet(
            topo=None,
            build=False,
            controller=None,
            switch=bridge_switch,
            host=container_host,
            link=Link,
            autoSetMacs=False,
            waitConnected=False,
        )
        self.net = net
        for node in self.plan.nodes:
            # Mininet's node names only label shells here; interface names are given explicitly.
            net.addHost(
                self._host_name(node.name),
                cls=container_host,
                container_pid=self.container_pids[node.name],
                ip=None,
                cmd_timeout_s=self.shell_timeout_s,
            )
        for link in self.plan.links:
            net.addSwitch(
                link.bridge, cls=bridge_switch, dpid=f"{link.index + 1:x}", cmd_timeout_s=self.shell_timeout_s
            )
        mgmt = net.addSwitch(
            self.plan.mgmt_bridge, cls=bridge_switch, dpid=f"{len(self.plan.links) + 1:x}",
            cmd_timeout_s=self.shell_timeout_s,
        )  # fmt: skip
        for link in self.plan.links:
            switch = net.get(link.bridge)
            net.addLink(
                switch, net.get(self._host_name(link.a)), intfName1=link.port_a, intfName2=link.intf_a
            )
            net.addLink(
                switch, net.get(self._host_name(link.b)), intfName1=link.port_b, intfName2=link.intf_b
            )
        for node in self.plan.nodes:
            net.addLink(
                mgmt, net.get(self._host_name(node.name)), intfName1=node.mgmt_port, intfName2=node.mgmt_intf
            )
        for bridge in [lk.bridge for lk in self.plan.links] + [self.plan.mgmt_bridge]:
            # The comment is the testbed's prefix: cleanup finds the rules of this testbed only.
            allow_bridge_forwarding(bridge, self.plan.prefix)
        net.start()
        _run(["ip", "addr", "replace", self.plan.mgmt_host_addr, "dev", self.plan.mgmt_bridge])
        for node in self.plan.nodes:
            self._configure_node(node)

    def _configure_node(self, node: NodePlan) -> None:
        host = self.net.get(self._host_name(node.name))
        lines = [
            "ip link set lo up",
            f"ip addr add {node.mgmt_addr} dev {node.mgmt_intf}",
            f"ip link set {node.mgmt_intf} up",
        ]
        for link in self.plan.links_of(node.name):
            intf = link.intf_a if node.name == link.a else link.intf_b
            addr = link.addr_a if node.name == link.a else link.addr_b
            lines += [f"ip addr add {addr} dev {intf}", f"ip link set {intf} up"]
        lines += [f"ip route add {r.subnet} via {r.via}" for r in node.routes]
        out = host.cmd(" && ".join(lines) + " && echo mecsplit-ok")
        if "mecsplit-ok" not in out:
            raise TestbedError(f"configuring node {node.name} failed: {out.strip()[:400]}")

    def set_node_links(self, node: str, up: bool) -> None:
        """Set every port of a node (its links and management port) up or down."""
        state = "up" if up else "down"
        ports = [lk.port_towards(node) for lk in self.plan.links_of(node)] + [self.plan.node(node).mgmt_port]
        for port in ports:
            _run(["ip", "link", "set", port, state])

    def stop(self) -> None:
        try:
            if self.net is not None:
                net, self.net = self.net, None
                try:
                    net.stop()
                except TestbedError:
                    # A dead or stuck shell stopped Mininet half-way: end every shell now (with a
                    # deadline); the caller's prefix-wide teardown removes the interfaces left.
                    for node in net.hosts + net.switches:
                        node.terminate()
                    raise
        finally:
            for bridge in [lk.bridge for lk in self.plan.links] + [self.plan.mgmt_bridge]:
                remove_bridge_forwarding(bridge, self.plan.prefix)
