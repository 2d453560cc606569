"""The controller's link history: what the network monitor reports becomes each link's past only while
both of the link's nodes are up (pure bookkeeping, a fake monitor)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from conftest import TINY_SCENARIO

from flows.controller import Controller, ControllerConfig, NetworkSample
from mecsplit.settings import get_settings


class _Monitor:
    def __init__(self) -> None:
        self.samples: list[NetworkSample] = []

    def sample(self) -> NetworkSample:
        return self.samples.pop(0)


def test_a_link_to_a_node_that_is_down_gathers_no_history(flows_home: Path) -> None:
    monitor = _Monitor()
    settings = get_settings()
    controller = Controller(
        TINY_SCENARIO, ControllerConfig.from_settings(settings, "latency_dp"), lambda _: "run", lambda: False,
        view=monitor, settings=settings,
    )  # fmt: skip
    state = cast(Any, SimpleNamespace(backend="testbed"))
    rates = {"device-edge": 20.0, "edge-cloud": 50.0}
    everyone = frozenset({"device", "edge", "cloud"})
    for t, alive in enumerate([everyone - {"cloud"}] * 3 + [everyone] * 2):
        monitor.samples.append(NetworkSample(at_s=float(t), rates_mbit=rates, loads={}, alive=alive))
        assert controller._network(state) is not None
    assert len(controller.history.series("device-edge", 0.0)[0]) == 5
    times, _ = controller.history.series("edge-cloud", 0.0)  # the nominal 50 while cloud was down: not kept
    assert list(times) == [3.0, 4.0]
