"""The testbed runtime: what the daemon owns (node containers, network, shaping, load, replay, monitor).

One :class:`Testbed` per daemon process. Every public method is safe to call from the API's worker
threads (one lock serialises changes to the network).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from testbed import cleanup
from testbed import link as tc
from testbed import node as nodes
from testbed.errors import TestbedError, UnknownNodeError
from testbed.events import Detector, EventSink, LinkSample, NodeSample, Thresholds
from testbed.net import (
    EmulatedNetwork,
    LinkPlan,
    TopologyPlan,
    check_mgmt_net_free,
    plan_topology,
    routes_avoiding,
)
from testbed.scenario import (
    CpuLoadEvent,
    FailEvent,
    JoinEvent,
    RestoreEvent,
    Scenario,
    SetLinkEvent,
    TraceEvent,
)
from testbed.trace import iter_rates, load_trace

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


# The kernel's HTB rates are read back this often to check the shaping (a tc call per port).
READ_BACK_EVERY_S = 2.0


class Testbed:
    def __init__(self, scenario: Scenario, settings: Any, state_dir: Path, progress: Progress) -> None:
        self.scenario = scenario
        self.settings = settings  # mecsplit.settings.Settings
        self.tb = settings.testbed
        self.prefix: str = self.tb.prefix
        self.state_dir = state_dir
        self.progress = progress
        self.lock = threading.RLock()
        # Probes use fixed ports in the nodes' namespaces: one measurement at a time.
        self._measure_lock = threading.Lock()
        self.plan: TopologyPlan = plan_topology(
            [n.name for n in scenario.nodes], [(lk.a, lk.b) for lk in scenario.links], self.prefix,
            self.tb.data_net, self.tb.mgmt_net,
        )  # fmt: skip
        self.containers: dict[str, nodes.NodeContainer] = {}
        self.network: EmulatedNetwork | None = None
        self.shapers: dict[tuple[str, str], tc.DirectionShaper] = {}  # (sender, receiver)
        self.shapes: dict[str, tc.LinkShape] = {}  # link key -> current shape (both directions)
        # (link key, sending node) -> the rate its direction is shaped to now (what the monitor reports)
        self.rates: dict[tuple[str, str], float] = {}
        self.changed_at: dict[str, float] = {}  # link key -> wall clock of the last set_link
        self.loads: dict[str, nodes.BackgroundLoad] = {}
        self.failed: set[str] = set()
        self.segments: dict[str, dict[str, str]] = {}  # node -> segment name -> container id
        self.image = ""
        # The interpreter that segment commands should name inside containers: the host's venv python
        # (bind-mounted at the same path) with the offline image, "python" with a built image.
        self.container_python = sys.executable
        self.mounts: nodes.HostMounts | None = None
        self._stop = threading.Event()
        self._replay_stop = threading.Event()
        self._replay_threads: list[threading.Thread] = []
        self.replay_started_s: float | None = None
        tb = self.tb
        self.detector = Detector(Thresholds(
            link_degraded_ratio=tb.link_degraded_ratio, link_recovered_ratio=tb.link_recovered_ratio,
            node_overloaded_pct=tb.node_overloaded_pct, node_recovered_pct=tb.node_recovered_pct,
            samples=tb.event_samples,
        ))  # fmt: skip
        self.sink = EventSink(state_dir / "events.jsonl")
        self.events: list[dict[str, Any]] = []
        self.last_samples: dict[str, dict[str, Any]] = {}
        self._monitor: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------- up/down
    def up(self) -> None:
        check_mgmt_net_free(self.plan)  # before anything starts: nothing is left half-done
        store = Path(self.settings.store_dir)
        store.mkdir(parents=True, exist_ok=True)
        nodes.check_readable_by_containers(store.resolve())
        if self.tb.image:
            # A self-contained image (testbed/Dockerfile): only the model store comes from the host.
            self.progress(f"image: {self.tb.image}")
            self.image, self.container_python = self.tb.image, "python"
            self.mounts = nodes.HostMounts(paths=(store.resolve(),))
        else:
            self.progress("image: ensuring the offline base image")
            self.image = nodes.ensure_base_image(self.prefix)
            self.mounts = nodes.HostMounts.discover(store)
        for n in self.scenario.nodes:
            self.progress(f"node {n.name}: container ({n.cpus} cpus, {n.mem_mb} MiB)")
            self.containers[n.name] = nodes.start_node(
                self.prefix, n.name, n.cpus, n.mem_bytes, self.image, self.mounts
            )
            self.loads[n.name] = nodes.BackgroundLoad(self.containers[n.name].cgroup, n.cpus)
        self.progress(f"network: {len(self.plan.links)} links, routes, management bridge")
        self.network = EmulatedNetwork(
            self.plan, {k: c.pid for k, c in self.containers.items()}, self.tb.shell_timeout_s
        )
        self.network.build()
        for lk in self.scenario.links:
            self.progress(f"link {lk.a}-{lk.b}: {lk.bw_mbit} Mbit/s, {lk.delay_ms} ms, {lk.loss_pct} %")
            self._shape(
                self.plan.link(lk.a, lk.b),
                tc.LinkShape(bw_mbit=lk.bw_mbit, delay_ms=lk.delay_ms, loss_pct=lk.loss_pct),
                "both",
            )
        for name in sorted(self.scenario.late_nodes()):
            self.progress(f"node {name}: joins later (held failed until then)")
            self.fail(name)
        self._monitor = threading.Thread(target=self._monitor_loop, name="monitor", daemon=True)
        self._monitor.start()

    def down(self) -> None:
        self._stop.set()
        self.replay_stop()
        with self.lock:
            for load in self.loads.values():
                load.stop()
            for shaper in self.shapers.values():
                try:
                    shaper.close()
                except Exception as exc:  # the interface may be gone already; cleanup follows
                    log.warning("closing shaper: %s", exc)
            self.shapers.clear()
            segments = nodes.list_containers(self.prefix, role="segment")
            for name in segments:
                nodes.docker("unpause", name, check=False)
            nodes.remove_containers(segments)
            shutil.rmtree(self._files_root(), ignore_errors=True)
            if self.network is not None:
                try:
                    self.network.stop()
                except Exception as exc:  # the prefix-wide cleanup below removes whatever is left
                    log.warning("stopping the network: %s", exc)
                self.network = None
        left = cleanup.teardown(self.prefix, run_dir=None, exact=True)
        if not left.empty():
            raise TestbedError(f"teardown left {left.as_dict()}; run `mecsplit testbed down --force`")

    # ------------------------------------------------------------------------------------------- links
    def _direction(self, lp: LinkPlan, sender: str) -> tc.DirectionShaper:
        receiver = lp.b if sender == lp.a else lp.a
        key = (sender, receiver)
        if key not in self.shapers:
            rx_dev = lp.intf_b if receiver == lp.b else lp.intf_a
            self.shapers[key] = tc.DirectionShaper(
                tc.ROOT_NS, lp.port_towards(receiver), tc.Netns(pid=self.containers[receiver].pid), rx_dev,
                prefix=self.prefix, state_dir=self.state_dir,
            )  # fmt: skip
        return self.shapers[key]

    def _shape(self, lp: LinkPlan, shape: tc.LinkShape, direction: str) -> None:
        senders = {"both": (lp.a, lp.b), "a_to_b": (lp.a,), "b_to_a": (lp.b,)}[direction]
        for sender in senders:
            self._direction(lp, sender).apply(shape)
            self.rates[(lp.key, sender)] = shape.bw_mbit
        self.shapes[lp.key] = shape

    def set_link(
        self,
        a: str,
        b: str,
        bw_mbit: float | None = None,
        delay_ms: float | None = None,
        loss_pct: float | None = None,
        direction: str = "both",
    ) -> dict[str, Any]:
        with self.lock:
            lp = self._link(a, b)
            old = self.shapes[lp.key]
            if direction != "both" and (lp.a, lp.b) != (a, b):
                direction = "b_to_a" if direction == "a_to_b" else "a_to_b"
            shape = tc.LinkShape(
                bw_mbit=old.bw_mbit if bw_mbit is None else bw_mbit,
                delay_ms=old.delay_ms if delay_ms is None else delay_ms,
                loss_pct=old.loss_pct if loss_pct is None else loss_pct,
            )
            self._shape(lp, shape, direction)
            self.changed_at[lp.key] = time.time()
            return {"link": lp.key, **shape.model_dump(), "changed_at_s": self.changed_at[lp.key]}

    def _link(self, a: str, b: str) -> LinkPlan:
        try:
            return self.plan.link(a, b)
        except TestbedError as exc:
            raise UnknownNodeError(str(exc)) from None

    def _node(self, name: str) -> nodes.NodeContainer:
        if name not in self.containers:
            raise UnknownNodeError(f"unknown node {name!r}; nodes: {sorted(self.containers)}")
        return self.containers[name]

    # ------------------------------------------------------------------------------------------- nodes
    def set_load(self, node: str, pct: float) -> dict[str, Any]:
        with self.lock:
            self._node(node)
            self.loads[node].set(pct)
            return {"node": node, "load_pct": pct}

    def fail(self, node: str) -> dict[str, Any]:
        with self.lock:
            self._node(node)
            assert self.network is not None
            self.network.set_node_links(node, up=False)
            nodes.pause_node(self.prefix, node)
            self.failed.add(node)
            self._reroute()
            return {"node": node, "failed": True}

    def restore(self, node: str) -> dict[str, Any]:
        with self.lock:
            self._node(node)
            assert self.network is not None
            nodes.unpause_node(self.prefix, node)
            self.network.set_node_links(node, up=True)
            self.failed.discard(node)
            self._reroute()
            return {"node": node, "failed": False}

    def _reroute(self) -> None:
        """Static routes along shortest paths around the failed nodes, replaced in every up node."""
        for name, routes in routes_avoiding(self.plan, self.failed).items():
            if not routes:
                continue
            script = " && ".join(f"ip route replace {r.subnet} via {r.via}" for r in routes)
            done = self.exec_in_node(name, ["sh", "-c", script], timeout_s=30.0)
            if done["returncode"] != 0:
                raise TestbedError(f"re-routing {name} failed: {done['stderr'].strip()[:400]}")

    def deploy_segment(
        self,
        node: str,
        name: str,
        command: Sequence[str],
        env: dict[str, str] | None,
        port: int | None,
        mem_bytes: int | None,
        files: dict[str, str] | None = None,
        cpus: float | None = None,
    ) -> dict[str, Any]:
        """``files`` (name -> text, e.g. TLS credentials) reach the container only, read-only at
        ``nodes.FILES_MOUNT``: never through the environment, which ``docker inspect`` shows."""
        with self.lock:
            container = self._node(node)
            if not name.replace("-", "").isalnum():
                raise TestbedError(f"segment name {name!r} must be alphanumeric (dashes allowed)")
            assert self.mounts is not None
            cname = nodes.container_name(self.prefix, node, name)
            files_dir = self._write_files(cname, files) if files else None
            try:
                cid = nodes.start_segment(
                    self.prefix, container, name, command, self.image, self.mounts, env=env,
                    mem_bytes=mem_bytes, files_dir=files_dir, cpus=cpus,
                )  # fmt: skip
            except Exception:
                self._remove_files(cname)
                raise
            self.segments.setdefault(node, {})[name] = cid
            np = self.plan.node(node)
            return {
                "node": node,
                "name": name,
                "container": nodes.container_name(self.prefix, node, name),
                "container_id": cid,
                "address": np.data_addr,
                "mgmt_address": np.mgmt_addr.split("/")[0],
                "port": port,
            }

    def uncap_segment(self, node: str, name: str) -> dict[str, Any]:
        with self.lock:
            self._node(node)
            if name not in self.segments.get(node, {}):
                raise TestbedError(f"no segment {name!r} on {node!r}")
            nodes.uncap(self.prefix, node, name)
            return {"node": node, "name": name}

    def stop_segment(self, node: str, name: str, timeout_s: float = 10.0) -> dict[str, Any]:
        with self.lock:
            self._node(node)
            cname = nodes.container_name(self.prefix, node, name)
            nodes.docker("stop", "-t", str(int(timeout_s)), cname, check=False, timeout_s=timeout_s + 30)
            logs = nodes.docker("logs", "--tail", "50", cname, check=False)
            nodes.docker("rm", "-f", cname, check=False)
            self._remove_files(cname)
            self.segments.get(node, {}).pop(name, None)
            return {"node": node, "name": name, "stopped": True, "log_tail": logs[-4000:]}

    def _files_root(self) -> Path:
        return self.state_dir / "files"

    def _write_files(self, container: str, files: dict[str, str]) -> Path:
        """A fresh folder (0700) of read-only files (0400) for one container, owned by the user its
        processes run as (``nodes.SEGMENT_UID``): nobody else on the host or in another container reads
        them."""
        for file_name in files:
            if not file_name.replace(".", "").replace("-", "").replace("_", "").isalnum():
                raise TestbedError(f"file name {file_name!r}: letters, digits, '.', '-' and '_' only")
        self._files_root().mkdir(mode=0o700, exist_ok=True)
        folder = self._files_root() / container
        self._remove_files(container)  # a leftover of a container of the same name
        folder.mkdir(mode=0o700)
        for file_name, content in files.items():
            fd = os.open(folder / file_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            with os.fdopen(fd, "w") as fh:
                fh.write(content)
            os.chown(folder / file_name, nodes.SEGMENT_UID, nodes.SEGMENT_GID)
        os.chown(folder, nodes.SEGMENT_UID, nodes.SEGMENT_GID)
        return folder

    def _remove_files(self, container: str) -> None:
        shutil.rmtree(self._files_root() / container, ignore_errors=True)

    def segment_logs(self, node: str, name: str) -> str:
        return nodes.docker(
            "logs", "--tail", "200", nodes.container_name(self.prefix, node, name), check=False
        )

    def exec_in_node(self, node: str, command: Sequence[str], timeout_s: float = 60.0) -> dict[str, Any]:
        """Run a command in the node's network namespace (host filesystem, like a node-local agent)."""
        pid = self._node(node).pid
        proc = subprocess.run(
            ["nsenter", "-t", str(pid), "-n", *command], capture_output=True, text=True, timeout=timeout_s
        )
        return {"returncode": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}

    def _probe(self, node: str, args: Sequence[str]) -> list[str]:
        return [
            "nsenter",
            "-t",
            str(self._node(node).pid),
            "-n",
            sys.executable,
            "-m",
            "testbed.probe",
            *args,
        ]

    def measure_link(
        self, a: str, b: str, seconds: float = 2.0, pings: int = 10, warmup_s: float = 0.5, bin_s: float = 0.1
    ) -> dict[str, Any]:
        """Active probe a->b in the nodes' namespaces: TCP RTT (median of pings) then TCP goodput.

        Goodput counts what the receiver got after ``warmup_s`` (slow start excluded); ``series_mbit``
        holds [t_monotonic_s, Mbit/s] per ``bin_s`` so callers can line it up with link changes.
        """
        lp = self._link(a, b)
        self._node(a)
        with self._measure_lock:
            return self._measure(lp, a, b, seconds, pings, warmup_s, bin_s)

    def measure_bursts(
        self,
        a: str,
        b: str,
        size_bytes: int,
        batches: Sequence[tuple[float, int, float]],
        congestion: str | None,
    ) -> dict[str, Any]:
        """Messages of ``size_bytes`` a->b on one TCP connection under ``congestion`` (None: the
        namespace's default); each batch (rate Mbit/s, count, gap s) first sets both directions to its
        rate. The algorithm that ran and the one-way milliseconds per message, a list per batch."""
        lp = self._link(a, b)
        self._node(a)
        argv = ["bursts", "--host", lp.address_of(b), "--port", "5203", "--bytes", str(size_bytes)]
        with self._measure_lock, self._listening(b, ["stamp", "--port", "5203"]):
            client = subprocess.Popen(
                self._probe(a, [*argv, *(["--congestion", congestion] if congestion else [])]),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            return self._run_batches(a, b, client, batches)

    @contextlib.contextmanager
    def _listening(self, node: str, args: Sequence[str]) -> Iterator[subprocess.Popen[str]]:
        """A probe listening in ``node``'s namespace, once it says it listens; killed on leaving."""
        proc = subprocess.Popen(self._probe(node, args), stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            proc.stdout.readline()
            yield proc
        finally:
            proc.kill()
            proc.wait()

    def _run_batches(
        self, a: str, b: str, client: subprocess.Popen[str], batches: Sequence[tuple[float, int, float]]
    ) -> dict[str, Any]:
        assert client.stdin is not None and client.stdout is not None and client.stderr is not None
        used, out = "", []
        try:
            for rate_mbit, count, gap_s in batches:
                self.set_link(a, b, bw_mbit=rate_mbit)
                client.stdin.write(f"{count} {gap_s}\n")
                client.stdin.flush()
                line = client.stdout.readline()
                if not line:
                    raise TestbedError(f"burst probe {a}->{b} failed: {client.stderr.read()[-300:]}")
                batch = json.loads(line)
                used = batch["congestion"]
                out.append(batch["one_way_ms"])
        finally:
            client.stdin.close()
            client.wait(timeout=30)
        return {"congestion": used, "one_way_ms": out}

    def _measure(
        self, lp: LinkPlan, a: str, b: str, seconds: float, pings: int, warmup_s: float, bin_s: float
    ) -> dict[str, Any]:
        addr = lp.address_of(b)
        rtt: dict[str, Any] = {}
        if pings > 0:
            with self._listening(b, ["echo", "--port", "5202"]):
                out = subprocess.run(
                    self._probe(a, ["ping", "--host", addr, "--port", "5202", "--count", str(pings),
                                    "--interval-s", "0.02"]),
                    capture_output=True, text=True, timeout=60,
                )  # fmt: skip
            if out.returncode != 0:
                raise TestbedError(f"ping {a}->{b} failed: {out.stderr.strip()[-300:]}")
            rtt = json.loads(out.stdout)
        sink = subprocess.Popen(
            self._probe(b, ["sink", "--port", "5201", "--duration-s", str(seconds), "--bin-s", str(bin_s)]),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert sink.stderr is not None
        sink.stderr.readline()
        blast = subprocess.run(
            self._probe(a, ["blast", "--host", addr, "--port", "5201", "--duration-s", str(seconds)]),
            capture_output=True, text=True, timeout=seconds + 60,
        )  # fmt: skip
        out_text, err_text = sink.communicate(timeout=seconds + 60)
        if sink.returncode != 0 or blast.returncode != 0:
            raise TestbedError(f"goodput probe {a}->{b} failed: {err_text[-300:]} {blast.stderr[-300:]}")
        result = json.loads(out_text)
        bins = result["bins"]
        start = result["start_s"]
        counted = [n for t, n in bins if t - bin_s - start >= warmup_s - 1e-9]
        goodput = sum(counted) * 8 / max(len(counted) * bin_s, 1e-9) / 1e6
        shape = self.shapes[lp.key]
        return {
            "a": a, "b": b, "goodput_mbit": goodput, "rtt_ms": rtt.get("median_ms"),
            "rtt_min_ms": rtt.get("min_ms"), "set_bw_mbit": shape.bw_mbit, "set_rtt_ms": 2 * shape.delay_ms,
            "series_mbit": [[t, n * 8 / bin_s / 1e6] for t, n in bins],
        }  # fmt: skip

    # ------------------------------------------------------------------------------------------- timeline
    def replay_start(self) -> dict[str, Any]:
        """Play the scenario's timeline from now: traces (one thread each, a rate a second) and events."""
        with self.lock:
            if self._replay_threads and any(t.is_alive() for t in self._replay_threads):
                return {"replaying": True, "already": True}
            self._replay_stop.clear()
            self.replay_started_s = time.monotonic()
            threads = []
            for i, event in enumerate(self.scenario.events()):
                target = self._replay_trace if isinstance(event, TraceEvent) else self._replay_event
                threads.append(
                    threading.Thread(target=target, args=(event,), name=f"replay-{i}", daemon=True)
                )
            for t in threads:
                t.start()
            self._replay_threads = threads
            return {"replaying": True, "events": len(threads), "started_monotonic_s": self.replay_started_s}

    def replay_stop(self) -> dict[str, Any]:
        self._replay_stop.set()
        for t in self._replay_threads:
            t.join(timeout=5)
        self._replay_threads = []
        return {"replaying": False}

    def _wait_until(self, at_s: float) -> bool:
        assert self.replay_started_s is not None
        delay = self.replay_started_s + at_s - time.monotonic()
        return not self._replay_stop.wait(max(0.0, delay))

    def _replay_trace(self, ev: TraceEvent) -> None:
        trace = load_trace(ev.path, ev.column, scale=ev.scale, max_mbit=ev.max_mbit)
        a, b = ev.link
        for t_s, bw in iter_rates(trace, loop=ev.loop):
            if not self._wait_until(ev.at_s + t_s):
                return
            try:
                self.set_link(a, b, bw_mbit=bw, direction=ev.direction)
            except Exception as exc:
                log.error("replay %s-%s at %.0f s: %s", a, b, t_s, exc)

    def _replay_event(self, ev: Any) -> None:
        if not self._wait_until(ev.at_s):
            return
        try:
            if isinstance(ev, CpuLoadEvent):
                self.set_load(ev.node, ev.pct)
                if ev.duration_s is not None and self._wait_until(ev.at_s + ev.duration_s):
                    self.set_load(ev.node, 0.0)
            elif isinstance(ev, FailEvent):
                self.fail(ev.node)
            elif isinstance(ev, RestoreEvent | JoinEvent):
                self.restore(ev.node)
            elif isinstance(ev, SetLinkEvent):
                a, b = ev.link
                self.set_link(a, b, ev.bw_mbit, ev.delay_ms, ev.loss_pct, ev.direction)
        except Exception as exc:
            log.error("replay event %s: %s", ev, exc)

    # ------------------------------------------------------------------------------------------- monitor
    def _port_tx_bytes(self, port: str) -> int:
        try:
            return int(Path(f"/sys/class/net/{port}/statistics/tx_bytes").read_text())
        except OSError:
            return 0

    def _monitor_loop(self) -> None:
        """Links every ``link_sample_interval_s`` (it sets how soon a change is detected; their kernel
        shaping is read back every ``READ_BACK_EVERY_S``), in this thread; nodes every
        ``monitor_interval_s`` in one of their own (a node sample asks Docker, which takes a while and must
        not hold up the links)."""
        nodes_thread = threading.Thread(target=self._node_loop, name="monitor-nodes", daemon=True)
        nodes_thread.start()
        link_every = self.tb.link_sample_interval_s
        prev_t = prev_read_t = time.monotonic()
        prev_tx = {p: self._port_tx_bytes(p) for lp in self.plan.links for p in (lp.port_a, lp.port_b)}
        while not self._stop.wait(link_every):
            now = time.monotonic()
            try:
                read_back = now - prev_read_t >= READ_BACK_EVERY_S
                self._sample_links(now, max(now - prev_t, 1e-6), prev_tx, read_back)
                prev_t, prev_read_t = now, now if read_back else prev_read_t
            except Exception as exc:  # keep measuring; a transient tc error is no reason to stop
                log.warning("monitor: %s", exc)
        nodes_thread.join(timeout=5)

    def _node_loop(self) -> None:
        every = self.tb.monitor_interval_s
        prev_t = time.monotonic()
        prev_cpu = {n: self._cpu_ns(n) for n in self.containers}
        while not self._stop.wait(every):
            now = time.monotonic()
            try:
                self._sample_nodes(now, max(now - prev_t, 1e-6), prev_cpu)
                prev_t = now
            except Exception as exc:  # keep measuring; a transient docker error is no reason to stop
                log.warning("monitor: %s", exc)

    def monitor(self) -> dict[str, Any]:
        """What the monitor knows now, cheaply (no Docker, no tc): each link's rate (the slower
        direction) and when it last changed, each node's background load, the share of its CPU quota all
        its processes used over the last second, and whether it is up."""
        links = {}
        for lp in self.plan.links:
            shaped = [r for (key, _), r in self.rates.items() if key == lp.key]
            links[lp.key] = {"bw_mbit": min(shaped, default=0.0), "changed_at_s": self.changed_at.get(lp.key)}
        nodes_up = {
            n.name: n.name not in self.failed
            and self.last_samples.get(f"node:{n.name}", {}).get("alive", True)
            for n in self.scenario.nodes
        }
        loads = {name: load.pct for name, load in self.loads.items()}
        busy = {
            n.name: self.last_samples.get(f"node:{n.name}", {}).get("busy_pct") for n in self.scenario.nodes
        }
        return {
            "links": links,
            "nodes": {
                n: {"up": up, "load_pct": loads.get(n, 0.0), "busy_pct": busy[n]}
                for n, up in nodes_up.items()
            },
        }

    def _total_cpu_ns(self, node: str) -> int:
        """Everything the node runs (its segments, standbys, gateway and load): how much of its quota is
        used, which is what throttles it."""
        try:
            return self.containers[node].cgroup.cpu_usage_ns()
        except OSError:
            return 0

    def _cpu_ns(self, node: str) -> int:
        # Overload means CPU taken from the node by others, not the node computing its own segments.
        try:
            return self.containers[node].cgroup.foreign_cpu_usage_ns()
        except OSError:
            return 0

    def _sample_links(self, now: float, dt: float, prev_tx: dict[str, int], read_back: bool) -> None:
        """Each link's rate (the slower direction) as shaped now, and the goodput it carried. The rate
        comes from the shaping this daemon applied (as a MEC platform's radio network information service
        reports a link's capacity), so a change is seen within one sampling period; ``read_back`` also
        reads the kernel's HTB rates (a tc call per port, too costly for every period) and says where they
        disagree."""
        for lk in self.scenario.links:
            lp = self.plan.link(lk.a, lk.b)
            shaped = [r for (key, _), r in self.rates.items() if key == lp.key]
            bw = min(shaped, default=0.0)
            if read_back:
                kernel = [tc.get_rate_mbit(tc.ROOT_NS, p) for p in (lp.port_a, lp.port_b)]
                low = min((r for r in kernel if r is not None), default=0.0)
                if abs(low - bw) > 0.01 * max(bw, 1e-3):
                    log.warning("link %s: shaped %.3f Mbit/s but the kernel reports %.3f", lp.key, bw, low)
            observed = 0.0
            for p in (lp.port_a, lp.port_b):
                tx = self._port_tx_bytes(p)
                observed = max(observed, (tx - prev_tx.get(p, tx)) * 8 / dt / 1e6)
                prev_tx[p] = tx
            sample = LinkSample(lp.key, now, bw, lk.bw_mbit, observed, self.changed_at.get(lp.key))
            self.last_samples[f"link:{lp.key}"] = {"bw_mbit": bw, "observed_mbit": round(observed, 3)}
            for e in self.detector.link(sample):
                self._publish(e)

    def _sample_nodes(self, now: float, dt: float, prev_cpu: dict[str, int]) -> None:
        states = nodes.container_states(self.prefix)
        for n in self.scenario.nodes:
            cpu = self._cpu_ns(n.name)
            pct = (cpu - prev_cpu.get(n.name, cpu)) / 1e9 / dt / n.cpus * 100
            prev_cpu[n.name] = cpu
            total = self._total_cpu_ns(n.name)
            busy = (total - prev_cpu.get(f"total:{n.name}", total)) / 1e9 / dt / n.cpus * 100
            prev_cpu[f"total:{n.name}"] = total
            alive = n.name not in self.failed and states.get(self.containers[n.name].name) == "running"
            sample = {"cpu_pct": round(pct, 1), "busy_pct": round(busy, 1), "alive": alive}
            self.last_samples[f"node:{n.name}"] = sample
            for e in self.detector.node(NodeSample(n.name, now, alive, pct)):
                self._publish(e)

    def _publish(self, event: Any) -> None:
        self.events.append(event.as_dict())
        del self.events[:-200]
        self.sink.publish(event)

    # ------------------------------------------------------------------------------------------- status
    def status(self) -> dict[str, Any]:
        states = nodes.container_states(self.prefix)
        node_rows = []
        for n in self.scenario.nodes:
            np = self.plan.node(n.name)
            c = self.containers.get(n.name)
            node_rows.append({
                "name": n.name, "tier": n.tier, "cpus": n.cpus, "mem_bytes": n.mem_bytes,
                "container": c.name if c else None, "pid": c.pid if c else None,
                "state": states.get(c.name, "missing") if c else "missing",
                "failed": n.name in self.failed,
                "load_pct": self.loads[n.name].pct if n.name in self.loads else 0.0,
                "address": np.data_addr, "mgmt_address": np.mgmt_addr.split("/")[0],
                "segments": sorted(self.segments.get(n.name, {})),
                **self.last_samples.get(f"node:{n.name}", {}),
            })  # fmt: skip
        link_rows = []
        for lp in self.plan.links:
            shape = self.shapes.get(lp.key)
            link_rows.append({
                "link": lp.key, "a": lp.a, "b": lp.b, "bridge": lp.bridge, "subnet": lp.subnet,
                "addr_a": lp.address_of(lp.a), "addr_b": lp.address_of(lp.b),
                **(shape.model_dump() if shape else {}),
                **{f"measured_{k}": v for k, v in self.last_samples.get(f"link:{lp.key}", {}).items()},
                "changed_at_s": self.changed_at.get(lp.key),
            })  # fmt: skip
        return {
            "scenario": self.scenario.name, "prefix": self.prefix, "source": self.scenario.source,
            "nodes": node_rows, "links": link_rows,
            "replaying": any(t.is_alive() for t in self._replay_threads),
            "mgmt_host_address": self.plan.mgmt_host_addr.split("/")[0], "recent_events": self.events[-20:],
            "container_python": self.container_python, "store_dir": str(self.settings.store_dir),
        }  # fmt: skip
