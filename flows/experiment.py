"""Experiments: one scenario, its workload and timeline, under each chosen policy, side by side.

For every policy, from the same start: a fresh testbed, the deploy flow with that policy, the served
reconfigure deployment, the scenario's concurrent chat sessions streaming through the gateway, and the
scenario's timeline replayed by the testbed daemon (bandwidth traces, CPU load, failures).

- ``adaptive`` starts from the best plan (``latency_dp``) and its served deployment re-plans on every
  event, adopting a new plan when the predicted gain beats the migration cost.
- ``static`` is the best plan for the start, kept for the whole run.
- a baseline name (``neurosurgeon``, ``exo``, ``petals``, ``edgeshard``, ...) deploys that policy's plan
  and keeps it.

Static plans and baselines are served with ``failover_only``: they re-plan (with their own policy, on
the surviving nodes) only when a node of their chain dies, so a node failure costs them a rebuild, not
the rest of the run; they never adapt to the network otherwise.

With ``repeats`` > 1 every policy runs that many times, interleaved: repeat k runs every policy once, in
the given order rotated by k - 1, so that repeat k of each policy ran close in time to the others' and no
policy always runs first or last. Each figure then gets its mean over the repeats with a 95 % interval,
and the comparison a verdict from the paired per-repeat ratios (is adaptive's difference beyond noise?).

``results/<run>/``: scenario.yaml, meta.json, summary.json, and per policy window (``<policy>/`` with one
repeat, ``<policy>/r<k>/`` with several): samples.parquet (one row per streamed token), requests.json
(every request: asked, received, lost, error), policy.json (its figures, reconfigurations with their
times), serve.log and calibration.json (the controller's decisions and what the cost model had learned
when the window ended; testbed windows); latency.png (per-token latency over time, one panel per
policy, timeline events marked) and bars.png (the per-policy figures, means over repeats with 95 %
error bars).
Every figure is defined in docs/experiments.md.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows import results
from flows.calibrate import calibration_path
from flows.headroom import headroom
from flows.predictions import (
    clear_decision_record,
    clear_run_learning,
    load_moves,
    load_predictions,
    move_bar,
)
from flows.prefect_server import ensure_server
from flows.runtime import RuntimeFailure
from flows.state import load_state
from flows.workload import (
    Client,
    OpenLoopClients,
    RequestRecord,
    choose_backend,
    prepare_model,
    serve_process,
    stop_process,
    teardown,
    users,
)
from mecsplit.files import write_json
from mecsplit.settings import Settings, get_settings
from testbed.scenario import Constraints, load_scenario

ADAPTIVE = "adaptive"
STATIC = "static"
BASE_POLICY = "latency_dp"  # what adaptive and static start from, and what adaptive re-plans with
STALL_FACTOR = 2.0  # a token gap longer than this many times the policy's median gap is a stall
GOAL_SPEEDUP = 1.3  # adaptive's mean per-token latency against the best static-like policy's
DRAIN_TIMEOUT_S = 180.0  # a reconfiguration still running when the workload ends may finish this long


def _deploy_policy(policy: str) -> str:
    return BASE_POLICY if policy in (ADAPTIVE, STATIC) else policy


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 1]) of already sorted values."""
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _ms(value_s: float | None) -> float | None:
    return None if value_s is None else round(value_s * 1e3, 2)


def policy_stats(
    records: Sequence[RequestRecord],
    window_s: float,
    *,
    stall_factor: float = STALL_FACTOR,
    slo: Constraints | None = None,
) -> dict[str, Any]:
    """The figures of one policy's run (docs/experiments.md defines each).

    Per-token latency is the gap between two streamed tokens of a request; TTFT the time from sending a
    request to its first token. A stall is a token gap longer than ``stall_factor`` times the policy's
    median gap, or a TTFT longer than ``stall_factor`` times its median TTFT; ``total_stall_s`` sums, over
    stalls, the wait minus the median (the waiting beyond normal), plus each failed request's wait from
    its last token (or its start) to the failure, minus the median gap.
    Tokens lost are the tokens a request asked for and never got (none when the model ended the answer
    itself)."""
    gaps = sorted(g for r in records for g in r.token_gaps_s)
    ttfts = sorted(r.ttft_s for r in records if r.ttft_s is not None)
    median_gap = statistics.median(gaps) if gaps else None
    median_ttft = statistics.median(ttfts) if ttfts else None
    stalls = [] if median_gap is None else [g - median_gap for g in gaps if g > stall_factor * median_gap]
    # A request held before its first token (a chain being rebuilt) stalls its user just the same, and so
    # does a failed request's wait from its last token to the failure (beyond the median gap).
    first_stalls = (
        [] if median_ttft is None else [t - median_ttft for t in ttfts if t > stall_factor * median_ttft]
    )
    # A request's latency over its tokens (vLLM's "normalized latency"): what a user waits per token, the
    # first one included, where the gap figures leave TTFT out.
    per_token = [
        (r.ttft_s + sum(r.token_gaps_s)) / r.received
        for r in records
        if r.ttft_s is not None and r.received > 0
    ]
    reference = median_gap or median_ttft or 0.0
    failed_waits = [
        max(0.0, r.waited_before_failure_s - reference) for r in records if r.failed_after_s is not None
    ]
    return {
        "requests": len(records),
        "failed_requests": sum(1 for r in records if r.error is not None),
        "refused_requests": sum(1 for r in records if r.refused),
        "tokens": sum(r.received for r in records),
        "tokens_asked": sum(r.asked for r in records),
        "tokens_lost": sum(r.lost for r in records),
        "mean_tpot_ms": _ms(statistics.fmean(gaps)) if gaps else None,
        "median_tpot_ms": _ms(median_gap),
        "p95_tpot_ms": _ms(_percentile(gaps, 0.95)) if gaps else None,
        "mean_ttft_ms": _ms(statistics.fmean(ttfts)) if ttfts else None,
        "p95_ttft_ms": _ms(_percentile(ttfts, 0.95)) if ttfts else None,
        "mean_latency_per_token_ms": _ms(statistics.fmean(per_token)) if per_token else None,
        "throughput_tok_s": round(sum(r.received for r in records) / window_s, 3) if window_s > 0 else None,
        "stalls": len(stalls) + len(first_stalls) + len(failed_waits),
        "total_stall_s": round(sum(stalls) + sum(first_stalls) + sum(failed_waits), 3),
        "token_stall_s": round(sum(stalls), 3),
        "first_token_stall_s": round(sum(first_stalls), 3),
        "failed_wait_s": round(sum(failed_waits), 3),
        "longest_gap_ms": _ms(gaps[-1]) if gaps else None,
        **(_slo_figures(records, window_s, slo) if slo is not None else {}),
    }


def _slo_figures(records: Sequence[RequestRecord], window_s: float, slo: Constraints) -> dict[str, Any]:
    """Requests served within the scenario's TTFT and TPOT bounds, and their rate (goodput)."""
    good = sum(1 for r in records if r.within_slo(slo.slo_ttft_s, slo.slo_tpot_s))
    return {
        "within_slo_requests": good,
        "goodput_requests_per_s": round(good / window_s, 3) if window_s > 0 else None,
    }


# Figures averaged over a policy's repeats, each with a 95 % interval of its mean. Any other key of a
# window's figures (plans, counts, keys added later such as predicted_tpot_ms) stays per repeat only.
AGGREGATED_FIGURES = (
    "mean_tpot_ms", "median_tpot_ms", "p95_tpot_ms", "mean_ttft_ms", "p95_ttft_ms",
    "mean_latency_per_token_ms", "throughput_tok_s", "total_stall_s", "reconfigurations", "tokens_lost",
    "goodput_requests_per_s",
)  # fmt: skip
T_QUANTILE = 0.975  # two-sided 95 % Student-t interval
ONE_RUN = results.ONE_RUN
FASTER = "adaptive faster"
SLOWER = "adaptive slower"
UNRESOLVED = "no difference resolved"


@dataclass(frozen=True)
class MeanInterval:
    """The mean of per-repeat values and the 95 % Student-t interval of that mean (none from one value)."""

    values: tuple[float, ...]
    mean: float
    low: float | None
    high: float | None

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def half_width(self) -> float | None:
        return None if self.low is None or self.high is None else (self.high - self.low) / 2

    def as_json(self, digits: int = 3) -> dict[str, Any]:
        def r(x: float | None) -> float | None:
            return None if x is None else round(x, digits)

        return {"n": self.n, "mean": r(self.mean), "low": r(self.low), "high": r(self.high),
                "half_width": r(self.half_width), "values": list(self.values)}  # fmt: skip


def mean_interval(values: Sequence[float]) -> MeanInterval:
    """Mean and 95 % t-interval over per-repeat values: mean ± t(0.975, n-1) · s / √n (s: sample standard
    deviation). With one value there is no spread to estimate, so no interval."""
    if not values:
        raise ValueError("mean_interval needs at least one value")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return MeanInterval(tuple(values), mean, None, None)
    from scipy.stats import t

    half = float(t.ppf(T_QUANTILE, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))
    return MeanInterval(tuple(values), mean, mean - half, mean + half)


def run_order(policies: Sequence[str], repeats: int) -> tuple[tuple[str, ...], ...]:
    """The policies of each repeat in the order they run: repeat k is the given order rotated by k - 1, so
    no policy always runs first or last (slow drifts of a shared machine spread over every policy)."""
    shifts = [k % len(policies) if policies else 0 for k in range(repeats)]
    return tuple(tuple(policies[s:]) + tuple(policies[:s]) for s in shifts)


def window_dir(out_dir: Path, policy: str, repeat: int, repeats: int) -> Path:
    """Where one (policy, repeat) window keeps its files: ``<policy>/`` for a single repeat (the layout of
    runs made before repeats existed), ``<policy>/r<k>/`` otherwise."""
    return out_dir / policy if repeats == 1 else out_dir / policy / f"r{repeat}"


def policy_runs(entry: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A policy's per-repeat figure dicts from its summary entry. An entry written before repeats existed
    (its figures flat, no ``runs``) is one run, repeat 1."""
    if "runs" in entry:
        return [dict(r) for r in entry["runs"]]
    return [{"repeat": 1, **entry}]


def _numeric(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def aggregate_policy(policy: str, runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A policy's summary entry from its windows' figures (one dict per repeat, ``error`` where it could
    not run): for each of AGGREGATED_FIGURES the mean over repeats (flat, so that tables and plots read it
    as before) and under ``over_repeats`` its 95 % interval; ``tokens_lost_total`` sums the repeats;
    ``runs`` keeps every window's figures. With exactly one run the entry also carries that run's figures
    flat, as before repeats existed."""
    ok = [dict(r) for r in runs if "error" not in r]
    failed = [r for r in runs if "error" in r]
    counts: dict[str, Any] = {"policy": policy, "repeats": len(ok), "failed_repeats": len(failed)}
    if not ok:
        error = failed[0]["error"] if failed else "no window ran"
        return {**counts, "error": error, "runs": [dict(r) for r in runs]}
    entry: dict[str, Any] = {**(ok[0] if len(ok) == 1 else {}), **counts}
    n = len(ok)
    entry["interval"] = ONE_RUN if n == 1 else f"95 % Student-t interval of the mean over {n} repeats"
    over: dict[str, Any] = {}
    for key in AGGREGATED_FIGURES:
        values = [r[key] for r in ok if _numeric(r.get(key))]
        if not values:
            entry[key] = None
            continue
        interval = mean_interval(values)
        over[key] = interval.as_json()
        entry[key] = values[0] if len(values) == 1 else round(interval.mean, 3)
    entry["tokens_lost_total"] = sum(r.get("tokens_lost") or 0 for r in ok)
    entry["over_repeats"] = over
    entry["runs"] = [dict(r) for r in runs]
    return entry


def _promised(move: Mapping[str, Any], t0_wall_s: float) -> dict[str, Any]:
    """An adopted move as the window keeps it: when (from the workload's start) and the gain its
    decision promised over its horizon (None for a move forced by a broken constraint)."""
    cur, new = move.get("served_current"), move.get("served_candidate")
    promised = None if not cur or new is None else round(new / cur - 1.0, 4)
    return {"t_s": round(move["decided_at_s"] - t0_wall_s, 2), "from": move["from"], "to": move["to"],
            "horizon_s": move["horizon_s"], "predicted_gain": promised}  # fmt: skip


def audit_moves(
    out_dir: Path, per_policy: Mapping[str, Mapping[str, Any]], repeats: int, against: str | None
) -> dict[str, Any] | None:
    """Each adopted move of the adaptive windows: the gain its decision promised against the gain it
    realised, from the decision to the end of its horizon (or of the shorter window): the tokens the
    adaptive window delivered over those the ``against`` window of the same repeat delivered over the
    same stretch of the timeline, minus 1. The timeline replays alike in every window, so the paired
    static window is what staying would have served (where it served the plan the move left:
    ``left_static_plan``); the realised gain includes what the move led to (a move back within the
    horizon)."""
    if against is None or ADAPTIVE not in per_policy or against not in per_policy:
        return None
    statics = {int(r.get("repeat", 1)): r for r in policy_runs(per_policy[against]) if "error" not in r}
    rows = []
    for run in policy_runs(per_policy[ADAPTIVE]):
        k = int(run.get("repeat", 1))
        if "error" in run or k not in statics or not run.get("moves"):
            continue
        ours = _token_times(window_dir(out_dir, ADAPTIVE, k, repeats))
        theirs = _token_times(window_dir(out_dir, against, k, repeats))
        end_s = min(run["window_s"], statics[k]["window_s"])
        for move in run["moves"]:
            start_s, stop_s = move["t_s"], min(move["t_s"] + move["horizon_s"], end_s)
            if stop_s <= start_s:
                continue
            n_ours, n_theirs = (sum(start_s <= t < stop_s for t in times) for times in (ours, theirs))
            rows.append({
                "repeat": k, "t_s": start_s, "to": move["to"], "span_s": round(stop_s - start_s, 2),
                "left_static_plan": move["from"] == statics[k].get("initial_plan"),
                "predicted_gain": move["predicted_gain"], "tokens": [n_ours, n_theirs],
                "realised_gain": round(n_ours / n_theirs - 1.0, 4) if n_theirs else None,
            })  # fmt: skip
    return {"against": against, "moves": rows}


def _token_times(window: Path) -> list[float]:
    """When each token of a window arrived, in seconds from its workload's start."""
    frame = results.window_samples(window)
    return [] if frame is None else [float(t) for t in frame["rel_s"]]


def nothing_ran(summary: Mapping[str, Any]) -> str | None:
    """Why a run measured nothing (no window of any policy ran), or None: such a run failed, where one
    policy's failed windows beside another's are a finding."""
    entries = list(summary["policies"].values())
    if not entries or any("error" not in entry for entry in entries):
        return None
    return f"no window of any policy ran (first: {entries[0]['error']}); see {summary['results_dir']}"


def _by_repeat(entry: Mapping[str, Any], figure: str = "mean_tpot_ms") -> dict[int, float]:
    """One figure (default: the mean per-token latency, ms) of each repeat of a policy that produced it."""
    return {
        int(r.get("repeat", 1)): float(r[figure])
        for r in policy_runs(entry)
        if "error" not in r and r.get(figure)
    }


def verdict(speedup: MeanInterval) -> str:
    """Whether adaptive's speedup (best other / adaptive) is beyond the noise: its 95 % interval wholly
    above 1 (faster), wholly below (slower), or straddling 1 (unresolved)."""
    if speedup.low is None or speedup.high is None:
        return ONE_RUN
    if speedup.low > 1.0:
        return FASTER
    if speedup.high < 1.0:
        return SLOWER
    return UNRESOLVED


def compare(per_policy: Mapping[str, Mapping[str, Any]], goal: float = GOAL_SPEEDUP) -> dict[str, Any] | None:
    """Adaptive's mean per-token latency against the best static-like policy's (every other policy; best:
    lowest mean over repeats) in the same run, paired by repeat: the interleaving runs repeat k of every
    policy close in time, so the ratio best / adaptive of one repeat cancels what that stretch of the
    machine's load shared. ``speedup_mean_tpot`` is the mean of those ratios (> 1: adaptive faster),
    ``speedup_ci95`` its 95 % t-interval and ``verdict`` says whether that interval excludes 1. The goal is
    met only when the mean reaches it and adaptive is faster beyond the noise. None without adaptive,
    without another policy, or without a repeat in which both ran."""
    paired = _paired(per_policy, "mean_tpot_ms")
    if paired is None:
        return None
    best, best_values, adaptive, speedup = paired
    said = verdict(speedup)
    by_request = _paired(per_policy, "mean_latency_per_token_ms")
    return {
        "best_static": best,
        "best_static_mean_tpot_ms": round(statistics.fmean(best_values.values()), 3),
        "adaptive_mean_tpot_ms": round(statistics.fmean(adaptive.values()), 3),
        "repeats": speedup.n,
        "speedup_per_repeat": [round(x, 4) for x in speedup.values],
        "speedup_mean_tpot": round(speedup.mean, 3),
        "speedup_ci95": _ci95(speedup),
        "verdict": said,
        "worse_beyond_noise": said == SLOWER,
        "goal": goal,
        "goal_met": speedup.mean >= goal and said == FASTER,
        # The same comparison on a request's latency over its tokens (TTFT included), which is what the
        # controller's objective, the request latency, weighs. Reported beside the verdict, which stays on
        # the gaps between tokens.
        "latency_per_token": None if by_request is None else _request_side(*by_request),
    }


def _ci95(speedup: MeanInterval) -> list[float] | None:
    return (
        None
        if speedup.low is None or speedup.high is None
        else [round(speedup.low, 4), round(speedup.high, 4)]
    )


def _request_side(
    best: str, best_values: dict[int, float], adaptive: dict[int, float], speedup: MeanInterval
) -> dict[str, Any]:
    return {
        "best_static": best,
        "best_static_ms": round(statistics.fmean(best_values.values()), 3),
        "adaptive_ms": round(statistics.fmean(adaptive.values()), 3),
        "speedup_per_repeat": [round(x, 4) for x in speedup.values],
        "speedup_mean": round(speedup.mean, 3),
        "speedup_ci95": _ci95(speedup),
        "verdict": verdict(speedup),
    }


def _paired(
    per_policy: Mapping[str, Mapping[str, Any]], figure: str
) -> tuple[str, dict[int, float], dict[int, float], MeanInterval] | None:
    """The best other policy by ``figure`` (lowest mean over repeats), its and adaptive's values per
    repeat, and the per-repeat ratios best / adaptive; None without a repeat in which both ran."""
    values = {p: _by_repeat(entry, figure) for p, entry in per_policy.items()}
    adaptive = values.get(ADAPTIVE, {})
    others = {p: v for p, v in values.items() if p != ADAPTIVE and v}
    if not adaptive or not others:
        return None
    best = min(sorted(others), key=lambda p: statistics.fmean(others[p].values()))
    paired = sorted(set(adaptive) & set(others[best]))
    if not paired:
        return None
    return best, others[best], adaptive, mean_interval([others[best][k] / adaptive[k] for k in paired])


class PlanWatcher:
    """Polls the deployment state and records every change of revision (an adopted reconfiguration):
    when, relative to the workload's start, and which plan it brought."""

    def __init__(self, t0_wall_s: float, interval_s: float = 0.5) -> None:
        self.t0 = t0_wall_s
        self.interval_s = interval_s
        self.changes: list[dict[str, Any]] = []
        self._stop = threading.Event()
        state = load_state()
        self._revision = None if state is None else state.revision
        self._thread = threading.Thread(target=self._run, name="mecsplit-plan-watch", daemon=True)

    def start(self) -> PlanWatcher:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def poll(self) -> None:
        try:
            state = load_state()
        except Exception:  # mid-write by another process: the next poll reads it
            return
        if state is not None and state.revision != self._revision:
            self._revision = state.revision
            self.changes.append({
                "t_s": round(time.time() - self.t0, 2),
                "revision": state.revision,
                "plan": [[s["node"], s["first"], s["end"]] for s in state.plan["stages"]],
            })  # fmt: skip

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.poll()


def _deployment_name() -> str:
    from flows.serve import DEPLOYMENT_NAME

    return f"reconfigure/{DEPLOYMENT_NAME}"


def _wait_for_served(policy: str, failover_only: bool, since: datetime, timeout_s: float = 180.0) -> None:
    """Until the served deployment carries this policy's parameters (a deployment left by the previous
    policy's serve has the same name, and events would otherwise run with its parameters)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            try:
                d = client.read_deployment_by_name(_deployment_name())
            except ObjectNotFound:
                d = None
            if (
                d is not None
                and d.parameters.get("policy") == policy
                and d.parameters.get("failover_only") == failover_only
                and d.updated is not None
                and d.updated >= since
            ):
                time.sleep(3.0)  # the runner's first poll
                return
            time.sleep(1.0)
    raise TimeoutError(f"the served reconfigure deployment did not come up within {timeout_s:.0f} s")


def prediction_figures(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The cost model's record for one window: every plan served (the first as calibrated after live
    traffic, each later one as predicted before it was deployed) with measured / predicted per-token
    latency, and the worst of them."""
    measured = [r for r in rows if r.get("measured_over_predicted") is not None]
    worst = max(measured, key=lambda r: abs(r["measured_over_predicted"] - 1.0), default=None)
    return {
        "prediction_check": [{k: r.get(k) for k in results.PREDICTION_FIELDS} for r in rows],
        "prediction_ratio_first": measured[0]["measured_over_predicted"] if measured else None,
        "prediction_ratio_worst": None if worst is None else worst["measured_over_predicted"],
    }


def _reconfigure_runs(states: list[Any]) -> list[Any]:
    """Reconfigure runs in ``states``: the served deployment's and the controller's (which run in the
    serve process, outside the deployment)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )

    with get_client(sync_client=True) as client:
        return list(
            client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=["reconfigure"])),
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=states))
                ),
            )
        )


def _drain_reconfigure_runs(timeout_s: float) -> list[str]:
    """Wait for a reconfiguration still running to finish (a run killed mid-deploy would hold the
    deployment's concurrency slot for the next policy). Returns the runs still running at the timeout."""
    from prefect.client.schemas.objects import StateType

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        running = _reconfigure_runs([StateType.RUNNING, StateType.PENDING])
        if not running:
            return []
        time.sleep(1.0)
    return [str(r.id) for r in _reconfigure_runs([StateType.RUNNING, StateType.PENDING])]


def _close_reconfigure_runs() -> int:
    """After the serve process is stopped: end every reconfigure run it left, so none holds the
    deployment's concurrency slot or runs later against the next policy's network."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelled

    left = _reconfigure_runs([StateType.RUNNING, StateType.PENDING, StateType.SCHEDULED])
    with get_client(sync_client=True) as client:
        for run in left:
            client.set_flow_run_state(
                run.id, Cancelled(message="the experiment's policy window ended"), force=True
            )
    return len(left)


def _timeline(scenario_path: Path) -> list[dict[str, Any]]:
    """The scenario's timeline events, for the plot: time and a short label."""
    items = []
    for e in load_scenario(scenario_path).events():
        what = getattr(e, "node", None) or getattr(e, "link", None) or ""
        items.append({"at_s": e.at_s, "kind": e.kind, "what": what})
    return items


def run_policy(
    scenario_path: Path,
    policy: str,
    backend: str,
    duration_s: float,
    out_dir: Path,
    *,
    repeat: int = 1,
    refresh_profiles: bool = True,
) -> dict[str, Any]:
    """One (policy, repeat) window from a fresh testbed; its files go to ``out_dir`` (``window_dir``).
    Returns its figures: ``policy_stats`` plus what the run was (plans, reconfigurations, repeat) and the
    cost model's predictions against what was measured, per plan served (``prediction_check``). The
    cost model learns afresh in every window; ``refresh_profiles`` off reuses the nodes' profiles."""
    log = get_run_logger()
    settings = get_settings()
    scenario = load_scenario(scenario_path)
    server = ensure_server(settings)
    serve = None
    sessions: list[Client] = []
    watcher: PlanWatcher | None = None
    failover_only = policy != ADAPTIVE
    try:
        if backend == "testbed":
            from testbed.api import TestbedClient, start_daemon

            start_daemon(scenario_path, env=server.env(), progress=lambda m: log.info(f"testbed: {m}"))
        from flows.reconfigure import deploy_flow

        clear_run_learning(settings)
        bar = move_bar(settings, scenario.name)  # what the adaptive controller starts the window with
        first = deploy_flow(
            scenario=str(scenario_path), backend=backend, policy=_deploy_policy(policy),
            refresh_profiles=refresh_profiles,
        )  # fmt: skip
        log.info(f"{policy}: initial plan {first['plan']}")
        if backend == "testbed":
            # Without the testbed nothing replays the timeline, so no event would ever reach a served run.
            since = datetime.now(UTC)
            serve = serve_process(
                settings, server, scenario_path, log_name=f"serve-{policy}-r{repeat}.log",
                policy=_deploy_policy(policy), failover_only=failover_only,
            )  # fmt: skip
            _wait_for_served(_deploy_policy(policy), failover_only, since)
            with TestbedClient() as client:
                client.replay_start()
        t0 = time.time()
        watcher = PlanWatcher(t0).start()
        # One seed per repeat: every policy of a repeat meets the same users (arrivals, lengths).
        sessions = users(first["gateway_url"], scenario.workload, seed=repeat)
        for s in sessions:
            s.start()
        time.sleep(duration_s)
        for s in sessions:
            s.stop()  # the request in flight finishes
        window_s = time.time() - t0
        still_running = _drain_reconfigure_runs(DRAIN_TIMEOUT_S) if serve is not None else []
        if still_running:
            log.warning(f"{policy}: reconfigure runs still running after the drain: {still_running}")
        watcher.stop()
        records = [r for s in sessions for r in s.records]
        stats = policy_stats(records, window_s, slo=scenario.constraints)
        state = load_state()
        stats.update(
            policy=policy,
            repeat=repeat,
            deployed_policy=_deploy_policy(policy),
            failover_only=failover_only,
            window_s=round(window_s, 2),
            not_sent=sum(s.not_sent for s in sessions if isinstance(s, OpenLoopClients)),
            initial_plan=first["plan"],
            final_plan=None
            if state is None
            else [[st["node"], st["first"], st["end"]] for st in state.plan["stages"]],
            # Every adopted reconfiguration of the run, including one triggered in the window whose deploy
            # step finished during the drain (stopping a failed node's old segments can take 20 s).
            reconfigurations=len(watcher.changes),
            predicted_tpot_ms=_ms(first["predicted_tpot_s"]),
            move_bar_at_start=bar,
            moves=[_promised(m, t0) for m in load_moves(settings)],
            **prediction_figures(load_predictions(settings)),
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        results.write_samples(out_dir / "samples.parquet", [x for s in sessions for x in s.samples])
        write_json(out_dir / "requests.json", [{**vars(r), "lost": r.lost} for r in records], indent=1)
        changes = {"t0_wall_s": t0, "stats": stats, "plan_changes": watcher.changes}
        write_json(out_dir / "policy.json", changes, indent=2)
        log.info(f"{policy} r{repeat}: {json.dumps(stats)}")
        return stats
    finally:
        for s in sessions:
            s.stop()
        if watcher is not None:
            watcher.stop()
        stop_process(serve)
        if serve is not None:
            _close_reconfigure_runs()
        _keep_run_files(settings, out_dir, f"serve-{policy}-r{repeat}.log")
        teardown(backend, scenario)  # type: ignore[arg-type]


def _keep_run_files(settings: Settings, out_dir: Path, serve_log: str) -> None:
    """Copy what explains a window's decisions into its folder: the serve process's log (every decision
    with what it priced) and the cost model's calibration as the window left it. The run folder keeps
    them only until the next window."""
    if not out_dir.is_dir():  # the window failed before writing anything
        return
    for source, name in (
        (settings.run_dir / serve_log, "serve.log"),
        (calibration_path(settings), "calibration.json"),
    ):
        if source.is_file():
            shutil.copyfile(source, out_dir / name)


@flow(name="experiment", log_prints=True)
def experiment(
    scenario: str,
    policies: list[str],
    backend: str = "auto",
    duration_s: float | None = None,
    results_root: str = "results",
    repeats: int = 1,
) -> dict[str, Any]:
    """Run the scenario under each policy, ``repeats`` times interleaved (``run_order``), and compare
    them in ``results/<run>/``."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1 (each repeat runs every policy once), got {repeats}")
    if not policies or len(set(policies)) != len(policies):
        raise ValueError(f"give each policy once (their windows are kept by name), got {policies}")
    if load_state() is not None:
        # Each window deploys afresh; a running deployment (or one a killed run left) would be taken for
        # the window's own, and its standbys, gone with its testbed, waited for.
        raise RuntimeFailure("a deployment is already running: `mecsplit down` first")
    scenario_path = Path(scenario)
    sc = load_scenario(scenario_path)
    prepare_model(sc.model, get_settings())
    chosen = choose_backend(backend)
    log = get_run_logger()
    if chosen != "testbed":
        log.warning(
            "local backend: no emulated network, so the scenario's timeline (traces, load, failures) is not "
            "replayed and no reconfiguration is served; the comparison shows placement effects only"
        )
    duration = duration_s if duration_s is not None else sc.duration_s
    out_dir = Path(results_root) / f"{time.strftime('%Y%m%d-%H%M%S')}-experiment-{sc.name}"
    out_dir.mkdir(parents=True)
    shutil.copy(scenario_path, out_dir / "scenario.yaml")
    write_json(out_dir / "meta.json", results.meta(), indent=2)
    order = run_order(policies, repeats)
    clear_decision_record(get_settings())  # later windows learn from this run's own moves only
    runs: dict[str, list[dict[str, Any]]] = {p: [] for p in policies}
    for k, ordered in enumerate(order, start=1):
        for p in ordered:
            log.info(f"repeat {k} of {repeats}: {p}")
            where = window_dir(out_dir, p, k, repeats)
            try:
                first = not any(runs.values())  # later windows reuse the nodes' profiles
                runs[p].append(
                    run_policy(scenario_path, p, chosen, duration, where, repeat=k, refresh_profiles=first)
                )
            except Exception as exc:  # a window that cannot run (no feasible plan) is a finding, not the end
                log.error(f"{p} r{k}: could not run: {type(exc).__name__}: {exc}")
                runs[p].append({"policy": p, "repeat": k, "error": f"{type(exc).__name__}: {exc}"})
    per_policy = {p: aggregate_policy(p, runs[p]) for p in policies}
    info = RunInfo(
        scenario=sc.name, scenario_duration_s=sc.duration_s, backend=chosen, duration_s=duration,
        run_order=order, timeline=tuple(_timeline(scenario_path)) if chosen == "testbed" else (),
    )  # fmt: skip
    return write_summary(out_dir, info, per_policy)


@dataclass(frozen=True)
class RunInfo:
    """What a run's summary says about the run itself, beside the per-policy figures."""

    scenario: str
    scenario_duration_s: float | None
    backend: str
    duration_s: float
    run_order: tuple[tuple[str, ...], ...]  # the policies of each repeat, in the order they ran
    timeline: tuple[dict[str, Any], ...] = ()  # the scenario's events, for the plot (testbed only)

    @property
    def repeats(self) -> int:
        return len(self.run_order)


def write_summary(out_dir: Path, run: RunInfo, per_policy: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """summary.json, latency.png and bars.png of a run from its per-policy entries (``aggregate_policy``)."""
    summary: dict[str, Any] = {
        "scenario": run.scenario,
        "backend": run.backend,
        "duration_s": run.duration_s,
        "scenario_duration_s": run.scenario_duration_s,
        "timeline_replayed": run.backend == "testbed",
        "repeats": run.repeats,
        "run_order": [list(ordered) for ordered in run.run_order],
        "stall_definition": (
            f"a token gap (or TTFT) > {STALL_FACTOR:g} x the policy's median gap (median TTFT); "
            "total_stall_s sums the wait minus the median over stalls"
        ),
        "interval_definition": (
            "mean over repeats, 95 % Student-t interval of that mean (t(0.975, n-1) s / sqrt(n)); "
            f"{ONE_RUN} with n = 1"
        ),
        "results_dir": str(out_dir),
        "policies": per_policy,
        "adaptive_vs_best_static": compare(per_policy),
    }
    best = (summary["adaptive_vs_best_static"] or {}).get("best_static")
    summary["move_audit"] = audit_moves(out_dir, per_policy, run.repeats, best)
    summary["switching_headroom"] = _headroom(out_dir, per_policy, run.repeats)
    write_json(out_dir / "summary.json", summary, indent=2)
    results.plot_policies(out_dir, run.timeline)
    results.plot_policy_bars(out_dir, per_policy)
    return summary


def _headroom(
    out_dir: Path, per_policy: Mapping[str, Mapping[str, Any]], repeats: int
) -> dict[str, Any] | None:
    """``flows.headroom`` over the run's windows on the verdict's figure (the token gaps) and on the one
    the controller's objective, the request's latency, weighs (latency per token), each against the
    fixed plan best by it; None with fewer than two fixed plans."""
    windows: dict[int, dict[str, Path]] = {}
    for policy, entry in per_policy.items():
        for run in policy_runs(entry):
            if "error" not in run:
                k = int(run.get("repeat", 1))
                windows.setdefault(k, {})[policy] = window_dir(out_dir, policy, k, repeats)
    out = {}
    for name, figure, first in (("gaps", "mean_tpot_ms", False),
                                ("latency_per_token", "mean_latency_per_token_ms", True)):  # fmt: skip
        fixed = {p: v for p, e in per_policy.items() if p != ADAPTIVE and (v := _by_repeat(e, figure))}
        if len(fixed) < 2:
            return None
        best = min(sorted(fixed), key=lambda p: statistics.fmean(fixed[p].values()))
        out[name] = headroom(windows, best, ADAPTIVE, first=first)
    return out


def _load_records(path: Path) -> list[RequestRecord]:
    return [
        RequestRecord(
            **{**{k: v for k, v in r.items() if k != "lost"}, "token_gaps_s": tuple(r["token_gaps_s"])}
        )
        for r in json.loads(path.read_text())
    ]


def _window_figures(window: Path, repeat: int) -> dict[str, Any]:
    """One window's figures from its folder: recomputed from requests.json where the run kept it (the
    reference copies in results/reference/ kept only policy.json: their recorded figures stand)."""
    info = json.loads((window / "policy.json").read_text())
    figures = {**info["stats"], "reconfigurations": len(info["plan_changes"]), "repeat": repeat}
    requests = window / "requests.json"
    if requests.exists():
        figures.update(policy_stats(_load_records(requests), figures["window_s"]))
    return figures


def _order_by_mtime(found: Mapping[str, Mapping[int, Path]]) -> tuple[tuple[str, ...], ...]:
    """A run cut short (no summary.json): the policies of each repeat in the order their windows ended."""
    repeats = sorted({k for windows in found.values() for k in windows})
    return tuple(
        tuple(sorted((p for p in found if k in found[p]), key=lambda p: found[p][k].stat().st_mtime))
        for k in repeats
    )


def _run_info(run_dir: Path, old: Mapping[str, Any], found: Mapping[str, Mapping[int, Path]]) -> RunInfo:
    backend = old.get("backend", "testbed")
    if "run_order" in old:
        order = tuple(tuple(ordered) for ordered in old["run_order"])
    elif "policies" in old:  # a summary from before repeats: one pass, in the order of its policies
        order = (tuple(old["policies"]),)
    else:
        order = _order_by_mtime(found)
    if "duration_s" in old:
        duration_s = old["duration_s"]
    else:
        windows_s = [json.loads((w / "policy.json").read_text())["stats"]["window_s"]
                     for ws in found.values() for w in ws.values()]  # fmt: skip
        duration_s = round(min(windows_s, default=0.0))
    scenario_path = run_dir / "scenario.yaml"
    if not scenario_path.exists():  # the reference copies keep no scenario: what the summary said stands
        return RunInfo(old.get("scenario", "?"), old.get("scenario_duration_s"), backend, duration_s, order)
    sc = load_scenario(scenario_path)
    timeline = tuple(_timeline(scenario_path)) if backend == "testbed" else ()
    return RunInfo(sc.name, sc.duration_s, backend, duration_s, order, timeline)


def summarise_run(run_dir: Path) -> dict[str, Any]:
    """Recompute a finished run's figures from what it kept and rewrite its summary and plots: the same
    definitions as a fresh run. Reads both layouts (``<policy>/`` and ``<policy>/r<k>/``), summaries from
    before repeats, and a run cut short (no summary.json yet: the windows that finished)."""
    summary_path = run_dir / "summary.json"
    old: dict[str, Any] = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    previous: dict[str, Any] = old.get("policies", {})
    found = results.find_windows(run_dir)
    names = list(previous)
    for ordered in _order_by_mtime(found):
        names += [p for p in ordered if p not in names]
    per_policy: dict[str, dict[str, Any]] = {}
    for name in names:
        # A window that could not run left no folder: the summary's record of it (its error) stands.
        kept = policy_runs(previous[name]) if name in previous else []
        by_repeat = {int(r.get("repeat", 1)): r for r in kept}
        for k, window in found.get(name, {}).items():
            by_repeat[k] = _window_figures(window, k)
        per_policy[name] = aggregate_policy(name, [by_repeat[k] for k in sorted(by_repeat)])
    return write_summary(run_dir, _run_info(run_dir, old, found), per_policy)
