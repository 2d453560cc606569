"""The experiment flow end to end on the local backend: two policies, the tiny model, a short window.

Real segment processes and gateway on loopback, real streamed chat requests, Prefect's test server; the
summary must carry every figure, lose no token, and the run folder must hold its samples and plots.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TINY_SCENARIO

pytestmark = [pytest.mark.prefect, pytest.mark.slow]

FIELDS = (
    "requests", "failed_requests", "tokens", "tokens_asked", "tokens_lost", "mean_tpot_ms", "median_tpot_ms",
    "p95_tpot_ms", "mean_ttft_ms", "p95_ttft_ms", "throughput_tok_s", "stalls", "total_stall_s",
    "longest_gap_ms", "reconfigurations", "initial_plan", "final_plan", "predicted_tpot_ms", "window_s",
)  # fmt: skip


def test_experiment_two_policies_local(flows_home: Path, prefect_api: str, tmp_path: Path) -> None:
    from flows.experiment import experiment

    summary = experiment(
        scenario=str(TINY_SCENARIO), policies=["adaptive", "exo"], backend="local", duration_s=4.0,
        results_root=str(tmp_path),
    )  # fmt: skip
    assert summary["backend"] == "local" and summary["timeline_replayed"] is False
    assert list(summary["policies"]) == ["adaptive", "exo"]
    for name, stats in summary["policies"].items():
        missing = [f for f in FIELDS if f not in stats]
        assert not missing, f"{name} lacks {missing}"
        assert stats["tokens"] > 0 and stats["mean_tpot_ms"] > 0
        assert stats["tokens_lost"] == 0 and stats["failed_requests"] == 0
        assert stats["reconfigurations"] == 0  # nothing replayed, nothing served
    cmp = summary["adaptive_vs_best_static"]
    assert cmp["best_static"] == "exo" and cmp["speedup_mean_tpot"] > 0
    run_dir = Path(summary["results_dir"])
    for name in ("summary.json", "latency.png", "bars.png", "adaptive/samples.parquet", "exo/requests.json"):
        assert (run_dir / name).exists(), name


def test_an_experiment_refuses_while_a_deployment_runs(
    flows_home: Path, prefect_api: str, tmp_path: Path
) -> None:
    from flows.experiment import experiment
    from flows.runtime import RuntimeFailure
    from flows.state import DeploymentState, Endpoint, clear_state, save_state, state_path

    # What a killed run leaves: its deployment, whose servers may be gone with their testbed.
    segment = Endpoint(node="device", first=0, end=4, host="127.0.0.1", port=9, handle="1")
    save_state(DeploymentState(
        scenario=str(TINY_SCENARIO), model="llama-tiny", backend="local", revision=3, plan={},
        segments=(segment,), gateway_url="http://127.0.0.1:9", gateway_handle="1", secret="s" * 32,
        updated_at_s=0.0,
    ))  # fmt: skip
    before = state_path().read_text()
    try:
        with pytest.raises(RuntimeFailure, match="mecsplit down"):
            experiment(scenario=str(TINY_SCENARIO), policies=["adaptive"], backend="local", duration_s=4.0,
                       results_root=str(tmp_path))  # fmt: skip
        assert state_path().read_text() == before  # left for `mecsplit down` to stop
        assert not list(tmp_path.iterdir())  # no run folder started
    finally:
        clear_state()
