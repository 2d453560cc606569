"""``mecsplit bench fuzz`` with small counts: its verdict must be real, every requested frame and
handshake sent and answered (or closed), none hanging, the server alive, generating exactly, no fd leaked."""

from __future__ import annotations

from pathlib import Path

from wire_helpers import num_layers

from segments.fuzz import FRAME_KINDS, run_fuzz_bench

MODEL = "gpt2-tiny"
FRAMES = 1_500
HANDSHAKES = 200


def test_fuzz_bench_small_counts(wire_store: Path) -> None:
    lines: list[str] = []
    result = run_fuzz_bench(
        wire_store, MODEL, num_layers(wire_store, MODEL), FRAMES, HANDSHAKES, seed=7,
        progress=lines.append, check_every=500,
    )  # fmt: skip
    frames, handshakes = result["frames"], result["handshakes"]
    assert frames["requested"] == frames["done"] == FRAMES
    assert sum(frames["by_kind"].values()) == FRAMES
    assert handshakes["requested"] == handshakes["done"] == HANDSHAKES
    assert sum(handshakes["by_kind"].values()) == HANDSHAKES
    # The frequent kinds all ran (the rare closing ones may miss a run this short), some closing frames
    # too, and the hostile ones were refused the way the protocol says.
    frequent = {kind for kind, (_, _, weight) in FRAME_KINDS.items() if weight >= 3.0}
    assert frequent <= set(frames["by_kind"])
    assert frames["connections"] > 10 and frames["outcomes"]["error:protocol"] > 0
    assert frames["outcomes"]["error:forbidden"] > 0 and frames["outcomes"]["error:bad_request"] > 0
    assert handshakes["outcomes"]["tls_refused"] > 0
    assert not any(k.startswith("accepted") for k in handshakes["outcomes"])
    assert frames["hangs"] == handshakes["hangs"] == 0 and result["crashes"] == 0
    assert frames["unexpected"] == {} and handshakes["unexpected"] == {}, result
    assert result["generation_checks"] >= 3 and result["generation_exact"] == result["generation_checks"]
    assert result["fds_end"] <= result["fds_start"]
    assert result["verdict"] == {k: True for k in result["verdict"]} and result["ok"]
    assert any("server pid" in line for line in lines)
