"""``mecsplit verify`` and ``mecsplit generate`` as a user runs them (separate processes, tiny model)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def _mecsplit(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-c", "from mecsplit.cli import main; main()", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.mark.exactness
def test_verify_prints_exact_steps(wire_store: Path) -> None:
    out = _mecsplit("verify", "--model", "llama-tiny", "--boundaries", "1,3", "--tokens", "3", "--json",
                    "--store", str(wire_store))  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["segments"] == [[0, 1], [1, 3], [3, 4]]
    assert len(result["steps"]) == 4
    assert result["max_abs_diff"] == 0.0 and result["tokens_equal"] is True


def test_generate_prints_text_and_timings(wire_store: Path) -> None:
    out = _mecsplit("generate", "--model", "gpt2-tiny", "--segments", "2", "--max-new-tokens", "4",
                    "--temperature", "0.7", "--seed", "5", "--json", "--store", str(wire_store))  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["new_tokens"] == 4 and result["ttft_ms"] > 0 and result["per_token_median_ms"] > 0
    assert len(result["rss_bytes"]) == 2


def test_bench_batching_prints_both_chains_per_concurrency(wire_store: Path) -> None:
    out = _mecsplit("bench", "batching", "--model", "llama-tiny", "--sessions", "1,4", "--tokens", "3",
                    "--runs", "1", "--prompt-tokens", "4", "--max-batch", "4", "--json",
                    "--store", str(wire_store))  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert set(result["by_sessions"]) == {"1", "4"}
    for row in result["by_sessions"].values():
        for chain in ("unbatched", "batched"):
            assert (
                row[chain]["tokens_per_s"] > 0 and row[chain]["tpot_p95_ms"] >= row[chain]["tpot_p50_ms"] > 0
            )
        assert row["batched_over_unbatched_tokens_per_s"] > 0
    bad = _mecsplit("bench", "batching", "--sessions", "0", "--store", str(wire_store))
    assert bad.returncode == 1 and "--sessions takes positive counts" in bad.stderr
