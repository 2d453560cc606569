"""Testbed events reach a Prefect server when PREFECT_API_URL is set (Prefect's offline test server)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from testbed.events import EventSink, TestbedEvent

pytestmark = [pytest.mark.prefect, pytest.mark.slow]


def test_event_sink_emits_to_prefect_and_logs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import httpx
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        api = str(PREFECT_API_URL.value())
        monkeypatch.setenv("PREFECT_API_URL", api)
        sink = EventSink(tmp_path / "events.jsonl")
        payload = {"link": "a-b", "bw_mbit": 3.0, "previous_bw_mbit": 20.0}
        sink.publish(TestbedEvent("mec.link.degraded", "mec.link.a-b", payload, 1.0))
        deadline = time.monotonic() + 30
        found: list[dict] = []
        while not found and time.monotonic() < deadline:
            resp = httpx.post(
                f"{api}/events/filter", json={"filter": {"event": {"name": ["mec.link.degraded"]}}}
            )
            found = [
                e for e in resp.json()["events"] if e["resource"]["prefect.resource.id"] == "mec.link.a-b"
            ]
            time.sleep(0.5)
    assert found, "event never reached the Prefect server"
    assert found[0]["payload"]["bw_mbit"] == 3.0
    logged = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert logged[0]["event"] == "mec.link.degraded"
