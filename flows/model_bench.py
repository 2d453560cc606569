"""``mecsplit bench model``: how well the calibrated cost model predicts plans it has not seen serving.

testbed up (or the local backend) -> deploy -> for each plan in turn (make-before-break onto it), for each
number of concurrent sessions: the sessions generate for ``seconds`` and the gateway's step telemetry is
kept -> the cost model is calibrated on the first (plan, sessions) window only, as the controller would
have learned it while that plan served, and predicts every window's per-token latency (the sessions as
measured) -> measured over predicted per window, against a model calibrated on each window itself (what
the model can do at best) -> teardown.

What a decision rests on is the second column: a prediction for a plan made before it serves.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from flows import pipeline
from flows.calibrate import Snapshot, learn
from flows.measure import admin_headers
from flows.predictions import clear_run_learning
from flows.runtime import LinkProbe, backend_for
from flows.state import load_state, save_state
from flows.workload import ChatSession, start_bench, teardown, testbed_up
from policies.analytic import predict
from policies.calibration import Calibration
from policies.plan import Metrics, Plan, Stage
from policies.problem import Problem
from testbed.scenario import Scenario

Layout = list[tuple[str, int, int]]
# Before a window is measured: the switch and the standbys' boot settle.
SETTLE_S = 10.0


def _say(message: str) -> None:
    print(f"[bench model {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _as_plan(layout: Layout) -> Plan:
    zero = Metrics(
        ttft_s=0, tpot_s=0, throughput_tok_s=0, privacy_exposure=0, bottleneck_s=0, request_latency_s=0
    )
    stages = tuple(Stage(node=n, first=f, end=e) for n, f, e in layout)
    return Plan(stages=stages, policy="bench-model", predicted=zero, objective_value=0.0)


def _move_to(backend: Any, scenario_path: Path, layout: Layout) -> None:
    state = load_state()
    assert state is not None
    if [list(x) for x in _as_plan(layout).layout()] != [
        [s["node"], s["first"], s["end"]] for s in state.plan["stages"]
    ]:
        result = pipeline.deploy(
            backend, str(scenario_path), state.model, _as_plan(layout), state, switch_mode="replay",
            progress=lambda m: None,
        )  # fmt: skip
        save_state(result.state)
    state = load_state()
    assert state is not None
    for standby in state.standbys:
        pipeline.wait_ready(standby, state.secret, 180.0)


def _window(url: str, max_tokens: int, sessions: int, seconds: float) -> dict[str, Any]:
    """``sessions`` chat sessions for ``seconds`` (after settling): their token gaps and the telemetry."""
    chats = [ChatSession(url, max_tokens, first_prompt=i) for i in range(sessions)]
    for chat in chats:
        chat.start()
    try:
        time.sleep(SETTLE_S)
        seq = httpx.get(
            f"{url}/admin/telemetry", params={"since": 0}, timeout=30, headers=admin_headers()
        ).json()["seq"]
        t0 = time.time()
        snapshots = []
        while time.time() - t0 < seconds:
            time.sleep(2.0)
            data = httpx.get(
                f"{url}/admin/telemetry", params={"since": seq}, timeout=30, headers=admin_headers()
            ).json()
            seq = data["seq"]
            snapshots.append(Snapshot.from_json(data))
    finally:
        for chat in chats:
            chat.stop()
    gaps = [g for chat in chats for r in chat.records if r.started_at_s >= t0 for g in r.token_gaps_s]
    return {"gaps": gaps, "snapshots": snapshots, "errors": [e for c in chats for e in c.errors]}


def _problem(scenario: Scenario, settings: Any, backend: str, calibration: Calibration) -> Problem:
    state = load_state()
    assert state is not None
    profiles = pipeline.profile_nodes(
        backend_for(backend, scenario), [n.name for n in scenario.nodes if n.joins_at_s is None], state.model,
        scenario.workload.prompt_tokens, max_age_s=float("inf"), progress=lambda m: None,
    )  # fmt: skip
    probes = [LinkProbe(lk.a, lk.b, lk.bw_mbit, 2 * lk.delay_ms, True) for lk in scenario.links]
    facts = pipeline.model_facts(settings, state.model, profiles)
    return pipeline.build_problem(
        scenario, facts, profiles, probes, testbed=backend == "testbed", calibration=calibration
    )


def _calibrate(problem: Problem, window: dict[str, Any], hop_nodes: dict[str, str]) -> Calibration:
    cal = problem.calibration or Calibration()
    snaps: list[Snapshot] = window["snapshots"]
    for i, snap in enumerate(snaps):
        batch = [snaps[i - 1], snap] if i else [snap]
        cal = learn(cal, problem.model_copy(update={"calibration": cal}), hop_nodes, batch)
    return cal


def _predict_ms(problem: Problem, cal: Calibration, layout: Layout, sessions: float) -> float:
    priced = problem.model_copy(update={"calibration": cal.model_copy(update={"concurrency": sessions})})
    return predict(priced, [Stage(node=n, first=f, end=e) for n, f, e in layout]).tpot_s * 1e3


def run_model_bench(
    scenario_path: Path,
    plans: list[Layout] | None,
    *,
    sessions: list[int],
    seconds: float = 30.0,
    backend: str = "auto",
) -> dict[str, Any]:
    """See the module docstring. ``plans`` None: the policy's first plan, then the plans other policies
    choose for the scenario (its alternatives)."""
    start = start_bench(scenario_path, backend)
    settings, scenario, chosen = start.settings, start.scenario, start.backend
    clear_run_learning(settings)
    try:
        testbed_up(start, scenario_path, _say)
        from flows.reconfigure import deploy_flow

        first = deploy_flow(
            scenario=str(scenario_path), backend=chosen, model=scenario.model, measure_tokens=0
        )
        layouts = plans or [first["plan"], *_alternatives(scenario, settings, chosen, first["plan"])]
        be = backend_for(chosen, scenario)
        windows = []
        for layout in layouts:
            _say(f"plan {layout}")
            _move_to(be, scenario_path, layout)
            state = load_state()
            assert state is not None
            hop_nodes = {f"{e.host}:{e.port}": e.node for e in state.segments}
            for k in sessions:
                window = _window(first["gateway_url"], scenario.workload.max_new_tokens, k, seconds)
                window.update(layout=layout, sessions=k, hop_nodes=hop_nodes)
                windows.append(window)
                mean = statistics.fmean(window["gaps"]) * 1e3 if window["gaps"] else float("nan")
                _say(f"  {k} sessions: {mean:.1f} ms per token")
        return _report(scenario, settings, chosen, windows)
    finally:
        teardown(chosen, scenario)


def _alternatives(scenario: Scenario, settings: Any, backend: str, first: Layout) -> list[Layout]:
    """Plans other policies pick for the scenario, each once."""
    from policies import InfeasibleError, solve

    problem = _problem(scenario, settings, backend, Calibration())
    seen = [first]
    for policy in ("edgeshard", "neurosurgeon", "all_device", "even", "throughput_dp"):
        try:
            layout = [list(x) for x in solve(problem, policy).layout()]
        except InfeasibleError:  # a policy that cannot place the model here is skipped
            continue
        if layout not in seen:
            seen.append(layout)
    return seen[1:4]


def _report(scenario: Scenario, settings: Any, backend: str, windows: list[dict[str, Any]]) -> dict[str, Any]:
    problem = _problem(scenario, settings, backend, Calibration())
    base = windows[0]
    learned = _calibrate(problem, base, base["hop_nodes"])
    rows = []
    for w in windows:
        if not w["gaps"]:
            continue
        measured = statistics.fmean(w["gaps"]) * 1e3
        own = _calibrate(problem, w, w["hop_nodes"])
        sessions = own.concurrency or float(w["sessions"])
        ahead = _predict_ms(problem, learned, w["layout"], sessions)
        itself = _predict_ms(problem, own, w["layout"], sessions)
        rows.append({
            "plan": w["layout"], "sessions": w["sessions"], "measured_tpot_ms": round(measured, 2),
            "tokens": len(w["gaps"]), "predicted_from_first_ms": round(ahead, 2),
            "ratio_from_first": round(measured / ahead, 3), "predicted_self_ms": round(itself, 2),
            "ratio_self": round(measured / itself, 3), "errors": len(w["errors"]),
        })  # fmt: skip
    ahead_ratios = [r["ratio_from_first"] for r in rows[1:]]
    return {
        "scenario": scenario.name,
        "backend": backend,
        "calibrated_on": {"plan": base["layout"], "sessions": base["sessions"]},
        "windows": rows,
        "within_10pct_from_first": sum(1 for x in ahead_ratios if 0.9 <= x <= 1.1),
        "predicted_from_first": len(ahead_ratios),
        "median_abs_error_from_first": round(statistics.median(abs(x - 1) for x in ahead_ratios), 3)
        if ahead_ratios
        else None,
    }
