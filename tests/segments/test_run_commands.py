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
