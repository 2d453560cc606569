"""The prediction log (one plan's predicted against measured, inside the window its prediction holds
for) and the record of past moves that sets how large a gain a move must promise (pure bookkeeping)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from flows.predictions import (
    RECORD_KEEP,
    RECORD_MIN_STEPS,
    DecisionRecord,
    PredictionLog,
    clear_decision_record,
    decisions_path,
    move_bar,
)
from mecsplit.settings import get_settings
from policies import Metrics, Plan, Stage


def test_a_prediction_is_measured_until_the_network_leaves_what_it_assumed_or_a_move_starts(
    tmp_path: Path,
) -> None:
    """An event within the rates a prediction allowed for (its forecast's range, 10 % either way) leaves
    the window open; one beyond it, or a node's, closes it at the change's own stamp: the later steps
    count in the whole measure only, and later events move nothing. The held measure (what a move bet on)
    ends at the first node event or move, whatever the links did. A first plan whose window closed
    before the model had learned it gets no calibrated prediction."""
    metrics = Metrics(ttft_s=1.0, tpot_s=0.1, throughput_tok_s=10.0, privacy_exposure=0.0, bottleneck_s=0.1,
                      request_latency_s=1.0)  # fmt: skip
    stages = (Stage(node="edge", first=0, end=4),)
    plan = Plan(stages=stages, policy="p", predicted=metrics, objective_value=1.0)
    log = PredictionLog(tmp_path / "predictions.json")
    log.expect(plan, 0.100, "decision", 1, {"device-edge": (10.0, 20.0)})
    serving = cast(Any, SimpleNamespace(revision=1, segments=()))

    def steps(start_s: float, count: int, total_s: float) -> tuple[dict[str, Any], ...]:
        return tuple({"positions": 1, "idle_s": 0.001, "total_s": total_s, "stages": [], "at_s": start_s + i}
                     for i in range(count))  # fmt: skip

    log.add_records(serving, steps(100.0, 10, 0.099))
    log.close(1, 104.0, "device-edge", 9.5)  # within the forecast's range, give or take 10 %
    log.close(1, 110.0, "device-edge", 0.1)
    log.close(1, 105.0, None, None)  # a later event with an older stamp moves nothing
    log.add_records(serving, steps(108.0, 2, 0.099) + steps(110.0, 4, 0.999))
    log.measure(serving, cast(Any, None), cast(Any, None), {})
    row = log.rows[1]
    assert row["measured_steps"] == 12 and row["measured_tpot_ms"] == pytest.approx(100.0)
    assert row["measured_over_predicted"] == pytest.approx(1.0)
    assert row["measured_steps_whole"] == 16
    assert row["measured_tpot_ms_whole"] == pytest.approx((12 * 100.0 + 4 * 1000.0) / 16)
    assert row["network_changed_at_s"] == 110.0
    # The node's event at 105 came after the first ten steps were read: the held measure ends there.
    assert (row["measured_steps_held"], row["measured_tpot_ms_held"]) == (10, pytest.approx(100.0))
    log.close_for_move(1, 120.0)  # closed already: the network's change stays the reason
    log.measure(serving, cast(Any, None), cast(Any, None), {})
    assert "move_started_at_s" not in log.rows[1]

    # A move started off the plan closes its window: the plan then serves beside the new one's starts.
    log.expect(plan, 0.100, "decision", 2, {"device-edge": (10.0, 20.0)})
    moving = cast(Any, SimpleNamespace(revision=2, segments=()))
    log.add_records(moving, steps(200.0, 10, 0.099))
    log.close_for_move(2, 210.0)
    log.add_records(moving, steps(210.0, 10, 0.199))
    log.measure(moving, cast(Any, None), cast(Any, None), {})
    row = log.rows[2]
    assert (row["measured_steps"], row["measured_steps_held"], row["measured_steps_whole"]) == (10, 10, 20)
    assert row["measured_over_predicted"] == pytest.approx(1.0)
    assert row["move_started_at_s"] == 210.0 and "network_changed_at_s" not in row

    first = cast(Any, SimpleNamespace(revision=0, segments=(), plan=plan.model_dump()))
    log.add_records(first, steps(0.0, 50, 0.099))
    log.close(0, 50.0, None, None)  # a node event
    log.add_records(first, steps(50.0, 200, 0.099))
    log.measure(first, cast(Any, None), cast(Any, None), {"device-edge": 20.0})
    assert 0 not in log.rows


def _move(at_s: float, ratio: float, steps: int = RECORD_MIN_STEPS, kind: str = "decision") -> dict[str, Any]:
    """A prediction row whose plan served ``steps`` steps at ``ratio`` times its prediction until a node
    event, the first few inside its window (which a link's swing closed early), then a failover's stall."""
    return {"predicted_at_s": at_s, "plan": [["edge", 0, 4]], "kind": kind, "predicted_tpot_ms": 100.0,
            "measured_tpot_ms": 100.0, "measured_steps": 3, "measured_over_predicted": 1.0,
            "measured_tpot_ms_held": 100.0 * ratio, "measured_steps_held": steps,
            "measured_tpot_ms_whole": 900.0, "measured_steps_whole": steps + 50}  # fmt: skip


def test_the_record_keeps_each_scenarios_latest_measured_moves_across_deployments(tmp_path: Path) -> None:
    """Only moves (not a first plan's calibrated prediction) count, once their plan served enough steps
    (until a node event: not only those inside its prediction's window, not a failover's stall after
    it); a move measured again replaces
    itself; each scenario keeps its latest ``RECORD_KEEP``; a new controller (the next deployment's)
    reads what the last one wrote."""
    path = tmp_path / "decisions.json"
    record = DecisionRecord(path, "v2x")
    record.add([_move(1.0, 1.5, steps=RECORD_MIN_STEPS - 1), _move(2.0, 1.4, kind="calibrated")])
    assert record.ratios() == [] and not path.exists()
    record.add([_move(1.0, 1.2)])
    record.add([_move(1.0, 1.3, steps=40)])  # the same move, measured longer
    other = DecisionRecord(path, "smart-city")
    other.add([_move(5.0, 0.7)])
    assert DecisionRecord(path, "v2x").ratios() == [1.3]
    record = DecisionRecord(path, "v2x")
    record.add([_move(10.0 + k, 1.0 + k / 100) for k in range(RECORD_KEEP)])
    again = DecisionRecord(path, "v2x")
    assert again.ratios() == pytest.approx([1.0 + k / 100 for k in range(RECORD_KEEP)])  # 1.3 aged out
    assert DecisionRecord(path, "smart-city").ratios() == [0.7]


def test_the_bar_a_move_must_clear_follows_the_record_and_a_run_starts_from_none(flows_home: Path) -> None:
    settings = get_settings()
    floor = settings.policies.replan_min_gain_ratio
    assert move_bar(settings, "v2x") == {"min_gain_ratio": pytest.approx(floor), "moves_recorded": 0}
    try:
        DecisionRecord(decisions_path(settings), "v2x").add([_move(1.0, 1.35), _move(2.0, 0.6)])
        bar = move_bar(settings, "v2x")
        assert bar == {"min_gain_ratio": pytest.approx(max(floor, 0.35)), "moves_recorded": 2}
    finally:
        clear_decision_record(settings)
    assert move_bar(settings, "v2x")["moves_recorded"] == 0
