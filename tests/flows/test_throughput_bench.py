"""``bench throughput``'s figures from the requests its sessions recorded."""

from __future__ import annotations

import pytest

from flows.throughput_bench import token_times, window_figures
from flows.workload import RequestRecord


def _request(start_s: float, ttft_s: float, gaps_s: tuple[float, ...]) -> RequestRecord:
    return RequestRecord(
        started_at_s=start_s, asked=len(gaps_s) + 1, ttft_s=ttft_s, token_gaps_s=gaps_s,
        received=len(gaps_s) + 1, finish="length",
    )  # fmt: skip


def test_tokens_are_counted_inside_each_window_and_latencies_over_the_requests_begun_in_them() -> None:
    # Two sessions, each a request every 1 s: first token 0.2 s in, then 4 more 0.1 s apart.
    records = [_request(s + 0.5 * k, 0.2, (0.1,) * 4) for s in range(10) for k in range(2)]
    assert list(token_times(records[0])) == pytest.approx([0.2, 0.3, 0.4, 0.5, 0.6])
    figures = window_figures(records, [(2.05, 4.05), (4.05, 6.05)])
    assert figures["tokens_per_s_runs"] == [10.0, 10.0]  # 2 requests a second, 5 tokens each
    assert figures["tokens_per_s"] == 10.0 and figures["requests"] == 8
    assert figures["ttft_p50_ms"] == pytest.approx(200.0) and figures["tpot_p95_ms"] == pytest.approx(100.0)
    empty = window_figures(records, [(100.0, 101.0)])
    assert empty["tokens_per_s"] == 0.0 and empty["ttft_p50_ms"] is None
