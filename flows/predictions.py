"""What the cost model predicted for each deployed plan against what it then served
(``predictions.json``), and the controller's record of its past moves across deployments
(``decisions.json``), which sets how large a gain a move must promise (``policies.replan.error_bar``)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.calibrate import calibration_path
from flows.state import DeploymentState
from mecsplit.files import append_jsonl, write_json
from mecsplit.settings import Settings, get_settings
from policies.calibration import Calibration
from policies.plan import Plan
from policies.problem import Problem

# A link rate or node load that moved by more than this (relative) since the last evaluation is a
# change worth re-solving for; below it the tick only learns and records.
CHANGE_RATIO = 0.1

# The calibrated prediction of a plan is taken once the model has seen this many of its decode steps.
CALIBRATED_AFTER_STEPS = 100
# A move's measure enters the record once it rests on this many decode steps: fewer are mostly the
# switch's transient and the host's noise.
RECORD_MIN_STEPS = 20
# The record keeps a scenario's latest moves: the model learns, and older errors describe a model it no
# longer is.
RECORD_KEEP = 8


@dataclass
class _Mean:
    total: float = 0.0
    count: int = 0

    def add(self, value: float) -> None:
        self.total += value
        self.count += 1

    def mean(self) -> float:
        return self.total / self.count


class PredictionLog:
    """Predicted against measured per-token latency, per deployed plan (``predictions.json``).

    A plan's prediction is the one made before it was deployed (the decision's), or for the first plan
    the calibrated model's once it has seen ``CALIBRATED_AFTER_STEPS`` of its decode steps; its measure
    is the mean of the gateway's token gaps (step time plus the gateway's time between steps) over the
    decode steps it served after that, until the network left what the prediction assumed (``close``)
    or the controller started a move off it (``close_for_move``).
    A prediction is made for the network of its moment and the range its forecast allowed: the steps a
    plan serves after a link collapsed measure the collapse, not the model (a demo's first plan read
    1.19 with the few seconds before the re-plan; the client's token gaps before the collapse gave
    1.12). Every step of the plan still counts in ``measured_tpot_ms_whole``, and every step until a node
    changed or a move started in ``measured_tpot_ms_held``: what the move to the plan bet on (links
    included, a failure or the next move not)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: dict[int, dict[str, Any]] = {}
        # Token gaps per revision, as running means: inside the window, until a node event or a move,
        # and over every step.
        self._steps: dict[int, _Mean] = {}
        self._held: dict[int, _Mean] = {}
        self._whole: dict[int, _Mean] = {}
        self._seen: dict[int, int] = {}
        # Per revision, when its window closed and the row field that says why.
        self._closed: dict[int, tuple[float, str]] = {}
        self._left: dict[int, float] = {}  # per revision: its first node event or move off it
        self._assumed: dict[int, dict[str, tuple[float, float]]] = {}
        self._dirty = False

    def close(self, revision: int, at_s: float, link: str | None, rate_mbit: float | None) -> None:
        """An event: ``link`` went to ``rate_mbit`` (or a node changed: no link) at ``at_s`` (wall
        clock). Beyond the rates ``revision``'s prediction assumed (by more than ``CHANGE_RATIO``), or
        for a node, its later steps count in the whole measure only. The first such change closes the
        window; later ones change nothing."""
        if link is None:
            self._left.setdefault(revision, at_s)
        band = self._assumed.get(revision, {}).get(link or "")
        if band is not None and rate_mbit is not None:
            low, high = band
            if low * (1 - CHANGE_RATIO) <= rate_mbit <= high * (1 + CHANGE_RATIO):
                return
        self._closed.setdefault(revision, (at_s, "network_changed_at_s"))

    def close_for_move(self, revision: int, at_s: float) -> None:
        """The controller started a move off ``revision`` at ``at_s``: from then on the plan serves
        beside the new plan's starts and loads (which the move's decision priced, ``_beside_starts``),
        then stalls for the switch; its later steps count in the whole measure only. On a demo, the plan
        back from a collapse read 1.34 with the 17 s of a cold start beside it that its window kept."""
        self._closed.setdefault(revision, (at_s, "move_started_at_s"))
        self._left.setdefault(revision, at_s)

    def expect(
        self,
        plan: Plan,
        tpot_s: float,
        kind: str,
        revision: int,
        assumed_mbit: Mapping[str, tuple[float, float]],
    ) -> None:
        """``assumed_mbit``: per link, the lowest and highest rate the prediction allowed for."""
        self.rows[revision] = {
            "revision": revision, "plan": [list(x) for x in plan.layout()], "kind": kind,
            "predicted_tpot_ms": round(tpot_s * 1e3, 2), "predicted_at_s": round(time.time(), 3),
        }  # fmt: skip
        self._steps[revision] = _Mean()
        self._held[revision] = _Mean()
        self._whole[revision] = _Mean()
        self._assumed[revision] = dict(assumed_mbit)
        self._dirty = True

    def add_records(self, state: DeploymentState, records: tuple[dict[str, Any], ...]) -> None:
        """Settled decode steps of the plan serving now (the caller drops those of its transient)."""
        hops = {f"{e.host}:{e.port}" for e in state.segments}
        gaps = self._steps.setdefault(state.revision, _Mean())
        held = self._held.setdefault(state.revision, _Mean())
        whole = self._whole.setdefault(state.revision, _Mean())
        closed_at = self._closed.get(state.revision, (math.inf, ""))[0]
        left_at = self._left.get(state.revision, math.inf)
        for r in records:
            if r["positions"] == 1 and r["idle_s"] > 0 and {s[0] for s in r["stages"]} <= hops:
                self._seen[state.revision] = self._seen.get(state.revision, 0) + 1
                gap_s = r["total_s"] + r["idle_s"]
                whole.add(gap_s)
                if r["at_s"] < left_at:
                    held.add(gap_s)
                if r["at_s"] < closed_at:
                    gaps.add(gap_s)

    def learned_steps(self, revision: int) -> int:
        return self._seen.get(revision, 0)

    def measure(
        self, state: DeploymentState, cal: Calibration, problem: Problem, rates_mbit: Mapping[str, float]
    ) -> None:
        """``rates_mbit``: the links' rates now, which a first plan's calibrated prediction assumes."""
        from policies.analytic import predict

        rev = state.revision
        gaps = self._steps.get(rev, _Mean())
        row = self.rows.get(rev)
        if row is None and gaps.count >= CALIBRATED_AFTER_STEPS and rev not in self._closed:
            plan = Plan.model_validate(state.plan)
            assumed = {link: (rate, rate) for link, rate in rates_mbit.items()}
            self.expect(plan, predict(problem, plan.stages).tpot_s, "calibrated", rev, assumed)
            row, gaps = self.rows[rev], self._steps[rev]
        whole = self._whole.get(rev, _Mean())
        if row is None or not whole.count:
            self._flush()
            return
        if gaps.count:
            row["measured_tpot_ms"] = round(gaps.mean() * 1e3, 2)
            row["measured_steps"] = gaps.count
            row["measured_over_predicted"] = round(row["measured_tpot_ms"] / row["predicted_tpot_ms"], 3)
        held = self._held.get(rev, _Mean())
        if held.count:
            row["measured_tpot_ms_held"] = round(held.mean() * 1e3, 2)
            row["measured_steps_held"] = held.count
        row["measured_tpot_ms_whole"] = round(whole.mean() * 1e3, 2)
        row["measured_steps_whole"] = whole.count
        if rev in self._closed:
            at_s, why = self._closed[rev]
            row[why] = round(at_s, 3)
        self._dirty = True
        self._flush()

    def _flush(self) -> None:
        if not self._dirty:
            return
        write_json(self.path, sorted(self.rows.values(), key=lambda r: r["revision"]), indent=1)
        self._dirty = False


def load_predictions(settings: Settings | None = None) -> list[dict[str, Any]]:
    path = (settings or get_settings()).run_dir / "predictions.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return []


def clear_run_learning(settings: Settings | None = None) -> None:
    """A new deployment learns afresh: the last one's calibration, predictions and moves describe
    another."""
    settings = settings or get_settings()
    (settings.run_dir / "predictions.json").unlink(missing_ok=True)
    moves_path(settings).unlink(missing_ok=True)
    calibration_path(settings).unlink(missing_ok=True)


def clear_decision_record(settings: Settings | None = None) -> None:
    """A demo or an experiment starts from no record, so that its result does not depend on what ran
    on this machine before it."""
    (decisions_path(settings or get_settings())).unlink(missing_ok=True)


def moves_path(settings: Settings) -> Path:
    """The deployment's adopted moves, one JSON line each, with what each promised."""
    return settings.run_dir / "moves.jsonl"


def record_move(settings: Settings, move: dict[str, Any]) -> None:
    append_jsonl(moves_path(settings), move)


def load_moves(settings: Settings) -> list[dict[str, Any]]:
    try:
        lines = moves_path(settings).read_text().splitlines()
    except OSError:
        return []
    moves = []
    for line in lines:
        try:
            moves.append(json.loads(line))
        except ValueError:  # a line cut short by a crash: the others stand
            continue
    return moves


def decisions_path(settings: Settings) -> Path:
    return settings.run_dir / "decisions.json"


def move_bar(settings: Settings, scenario: str) -> dict[str, Any]:
    """The least gain a move must promise now on ``scenario`` and how many past moves set it."""
    from policies.replan import error_bar

    ratios = DecisionRecord(decisions_path(settings), scenario).ratios()
    bar = error_bar(ratios, settings.policies.replan_min_gain_ratio)
    return {"min_gain_ratio": round(bar, 3), "moves_recorded": len(ratios)}


class DecisionRecord:
    """Measured over predicted per-token latency of the plans the controller's moves went to, per
    scenario and across deployments (``decisions.json``): a ``mecsplit serve`` keeps it from one
    deployment to the next; ``demo`` and ``experiment run`` start afresh.

    A move is a bet on its plan while it serves, the links' later changes included, so it is measured
    over every step the plan served until a node changed or the next move started
    (``measured_tpot_ms_held``), not only inside the window that checks the model (which a swinging link
    closes within seconds: on V2X no move's window reached 20 steps), and not across a node's failure
    (on V2X a plan through a road-side unit that failed measured 4.3x its prediction with the minute of
    failover, which then barred every move). It counts once that rests on ``RECORD_MIN_STEPS`` decode
    steps; a later measure of the same move replaces it."""

    def __init__(self, path: Path, scenario: str) -> None:
        self.path = path
        self.scenario = scenario
        self.rows: list[dict[str, Any]] = _read_list(path)

    def ratios(self) -> list[float]:
        return [float(r["measured_over_predicted"]) for r in self.rows if r.get("scenario") == self.scenario]

    def add(self, rows: Iterable[dict[str, Any]]) -> None:
        """``rows``: a ``PredictionLog``'s; only its moves (kind ``decision``) measured long enough count."""
        changed = False
        for row in rows:
            if row.get("kind") != "decision" or (row.get("measured_steps_held") or 0) < RECORD_MIN_STEPS:
                continue
            entry = {
                "scenario": self.scenario, **{k: row[k] for k in _RECORDED},
                "measured_over_predicted": round(row["measured_tpot_ms_held"] / row["predicted_tpot_ms"], 3),
            }  # fmt: skip
            if entry in self.rows:
                continue
            key = (self.scenario, entry["predicted_at_s"])
            self.rows = [r for r in self.rows if (r.get("scenario"), r.get("predicted_at_s")) != key]
            self.rows.append(entry)
            changed = True
        if not changed:
            return
        mine = sorted((r for r in self.rows if r.get("scenario") == self.scenario), key=_predicted_at)
        self.rows = [r for r in self.rows if r.get("scenario") != self.scenario] + mine[-RECORD_KEEP:]
        write_json(self.path, self.rows, indent=1)


_RECORDED = ("predicted_at_s", "plan", "predicted_tpot_ms", "measured_tpot_ms_held", "measured_steps_held")


def _predicted_at(row: dict[str, Any]) -> float:
    return float(row.get("predicted_at_s", 0.0))


def _read_list(path: Path) -> list[dict[str, Any]]:
    try:
        rows = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []
