"""``bench overload``'s figures from the requests its users recorded, and the node memory it reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.overload_bench import phase_figures, rss_bytes
from flows.workload import RequestRecord
from testbed.scenario import Constraints, Scenario


def _served(start_s: float, ttft_s: float, gap_s: float) -> RequestRecord:
    return RequestRecord(
        started_at_s=start_s, asked=5, ttft_s=ttft_s, token_gaps_s=(gap_s,) * 4, received=5, finish="length"
    )


def _refused(start_s: float) -> RequestRecord:
    return RequestRecord(
        started_at_s=start_s, asked=5, ttft_s=None, token_gaps_s=(), received=0, finish=None, refused=True,
        retry_after_s=1.0,
    )  # fmt: skip


def _scenario(slo_ttft_s: float | None, slo_tpot_s: float | None) -> Scenario:
    scenario = Scenario.model_validate({
        "name": "s", "source": "a", "nodes": [{"name": "a", "tier": "device", "cpus": 1, "mem_mb": 512}],
        "links": [],
    })  # fmt: skip
    return scenario.model_copy(
        update={"constraints": Constraints(slo_ttft_s=slo_ttft_s, slo_tpot_s=slo_tpot_s)}
    )


def test_a_request_is_within_the_slo_only_served_inside_both_bounds() -> None:
    assert _served(0, 1.0, 0.1).within_slo(2.0, 0.2)
    assert not _served(0, 3.0, 0.1).within_slo(2.0, 0.2)  # first token too late
    assert not _served(0, 1.0, 0.3).within_slo(2.0, 0.2)  # too slow on average
    assert _served(0, 3.0, 0.3).within_slo(None, None)  # no bounds: every served request
    assert not _refused(0).within_slo(None, None)


def test_a_phase_counts_refusals_apart_and_prices_only_what_it_admitted() -> None:
    records: list[RequestRecord] = []
    for s in range(10):  # each second: one request served fast, one served late, two refused
        records += [_served(s, 0.5, 0.1), _served(s + 0.1, 5.0, 0.1), _refused(s + 0.2), _refused(s + 0.3)]
    figures = phase_figures(records, [(2.0, 4.0), (4.0, 6.0)], _scenario(slo_ttft_s=4.0, slo_tpot_s=None))
    assert (figures["requests"], figures["admitted"], figures["refused"]) == (16, 8, 8)
    assert figures["within_slo_share"] == 0.5
    assert figures["goodput_requests_per_s"] == 1.0  # 4 good requests in 4 s
    assert figures["longest_request_s"] == pytest.approx(5.4)
    assert figures["ttft_p95_ms"] == pytest.approx(5000.0)  # the refusals (no first token) priced nowhere


def test_a_nodes_rss_is_read_from_its_cgroups_memory_stat(tmp_path: Path) -> None:
    stat = tmp_path / "memory.stat"
    stat.write_text("cache 4096\nrss 100\ntotal_cache 8192\ntotal_rss 123456\n")
    assert rss_bytes(stat) == 123456
    assert rss_bytes(tmp_path / "absent") is None
