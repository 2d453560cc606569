"""``mecsplit bench numerics``: each MKL setting really runs in its own process, the unpinned one too."""

from __future__ import annotations

from mecsplit import numerics_bench


def test_each_setting_runs_in_a_process_of_its_own() -> None:
    lines: list[str] = []
    result = numerics_bench.run(1, 1, settings=(None, "AVX2"), progress=lines.append)
    assert set(result["median_ms_per_token"]) == {"unpinned", "AVX2"}
    assert result["ratio_to_unpinned"]["unpinned"] == 1.0
    assert all(v > 0 for v in result["median_ms_per_token"].values())
    assert len(lines) == 2 and "MKL_CBWR=unpinned" in lines[0]
