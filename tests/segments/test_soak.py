"""``bench soak`` for a few seconds: real servers over TLS, the gateway process, clients, kills."""

from __future__ import annotations

from pathlib import Path

import pytest
from wire_helpers import children_alive

from segments.soak import Expected, SoakConfig, run_soak_bench


def test_tokens_delivered_is_the_longest_prefix_whose_text_arrived() -> None:
    # Token 2 completes a character that token 1 began: the text after 1 token is still "a".
    want = Expected("completion", "p", 4, (10, 11, 12, 13), ("", "a", "a", "abé", "abéc"), "length")
    assert want.tokens_delivered("abéc") == 4 and want.text == "abéc"
    assert want.tokens_delivered("abé") == 3
    assert want.tokens_delivered("a") == 2
    assert want.tokens_delivered("x") == 0 and want.tokens_delivered("") == 0


@pytest.mark.slow  # 55 s measured under a load average of 4 (6 server starts, 6 s of load)
def test_a_short_soak_passes_with_real_figures(wire_store: Path) -> None:
    config = SoakConfig(minutes=0.1, clients=6, kills=2, seed=3)
    lines: list[str] = []
    result = run_soak_bench(wire_store, config, progress=lines.append)
    good, kills = result["well_behaved"], result["kills"]
    assert good["completed"] > 0 and good["exact"] == good["requests"] == good["completed"]
    assert good["tokens_expected"] > 0 and good["tokens_lost"] == 0
    assert result["misbehaving"]["requests"] > 0 and result["misbehaving"]["status_5xx"] == 0
    assert kills["done"] == kills["requested"] == 2 and kills["replace_s_median"] > 0
    assert [h["sessions"] for h in result["end"]["hops"]] == [0, 0, 0]
    assert result["rss"]["long_lived"]["gateway"]["end_bytes"] > 0
    assert result["verdict"]["pass"], result["verdict"]
    assert any(line.startswith("kill 2/2") for line in lines)
    assert len(result["pids_started"]) >= 1 + 7  # the gateway, the chain and its first spares
    assert children_alive(result["pids_started"]) == []
