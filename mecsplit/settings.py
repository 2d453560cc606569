"""The one settings object of mecsplit.

Every tunable lives here, read from the environment with the prefix ``MECSPLIT_`` (nested sections use a
double underscore: ``MECSPLIT_SEGMENTS__MAX_SESSIONS=64``). Packages take the values they need as plain
arguments, so ``policies`` stays pure and tests can pass their own values.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_home() -> Path:
    return Path.home() / ".cache" / "mecsplit"


class SegmentSettings(BaseModel):
    """Segment store, segment servers, wire protocol, client and gateway."""

    model_config = ConfigDict(frozen=True)

    default_model: str = "smollm2-135m"
    max_frame_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    max_sessions: int = Field(default=256, gt=0)
    api_key: str | None = Field(
        default=None,
        description="the key clients of the gateway's /v1 routes must send (Authorization: Bearer KEY); "
        "None: /v1 is open, as vLLM's and llama.cpp's servers are without --api-key",
    )
    session_idle_s: float = Field(
        default=600.0, gt=0, description="a segment server drops a session no step has used for this long"
    )
    max_kv_bytes: int = Field(default=4 * 1024**3, gt=0)
    threads: int = Field(default=1, gt=0, description="torch threads per segment process")
    max_batch: int = Field(
        default=1,
        gt=0,
        description="a segment server runs the decode steps of up to this many sessions that wait together "
        "as one forward pass (1: each alone). Off by default: the cost model does not price batching yet",
    )
    prefill_chunk_tokens: int = Field(
        default=128,
        ge=0,
        description="the gateway feeds a longer prompt in steps of this many tokens, so that other sessions' "
        "decode steps run between them instead of waiting for the whole prefill (0: one step)",
    )
    gateway_port: int = Field(
        default=8000, ge=0, lt=65536, description="OpenAI-compatible gateway port (0: any free port)"
    )
    recover_timeout_s: float = Field(
        default=60.0,
        ge=0,
        description="a step whose chain broke waits this long for a new chain, then fails (0: fail at once)",
    )
    abandon_after_s: float = Field(
        default=0.1,
        gt=0,
        description="a replay switch waits this long for the old chain's steps in flight, then retries "
        "them on the new chain (a decode step costs 60-120 ms on a healthy chain, on a collapsed link "
        "seconds; a replay rebuilds every session on the new chain anyway, so a step abandoned costs its "
        "own work once more at most)",
    )


class TestbedSettings(BaseModel):
    """Emulated MEC network: Mininet, Docker node containers, tc shaping, the daemon."""

    model_config = ConfigDict(frozen=True)

    prefix: str = Field(default="mecsplit", description="name prefix of everything the testbed creates")
    # --- network (testbed.net) ---
    data_net: str = Field(default="10.213.0.0/16", description="one /24 per scenario link is cut from it")
    mgmt_net: str = Field(default="10.214.0.0/24", description="unshaped host<->node management bridge")
    image: str = Field(
        default="", description="node image built from testbed/Dockerfile; empty: offline base + host mounts"
    )
    shell_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="deadline of each command sent into a Mininet node shell (a dead shell fails at once)",
    )
    # --- daemon (testbed.daemon) ---
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=0, ge=0, le=65535, description="0: pick a free port")
    start_timeout_s: float = Field(default=120.0, gt=0)
    monitor_interval_s: float = Field(default=1.0, gt=0, description="how often nodes are measured")
    link_sample_interval_s: float = Field(
        default=0.1,
        gt=0,
        description="how often each link's rate is sampled (the detection time of a change)",
    )
    # --- events (testbed.events): thresholds with hysteresis ---
    link_degraded_ratio: float = Field(
        default=0.7, gt=0, lt=1, description="mec.link.degraded when bw < ratio x the scenario's nominal bw"
    )
    link_recovered_ratio: float = Field(
        default=0.9, gt=0, le=1, description="mec.link.recovered when bw >= ratio x nominal again"
    )
    node_overloaded_pct: float = Field(
        default=75.0, gt=0, le=100, description="CPU use of the node's share (others' work included)"
    )
    node_recovered_pct: float = Field(default=60.0, ge=0, le=100, description="overload ends below this")
    event_samples: int = Field(
        default=2, ge=1, description="consecutive samples past a threshold before an event fires"
    )


class FlowSettings(BaseModel):
    """Prefect flows and serving."""

    model_config = ConfigDict(frozen=True)

    prefect_port: int = 4200
    profile_max_age_s: float = Field(
        default=300.0, ge=0, description="compute profiles younger than this are reused (0: always measure)"
    )
    link_probe_max_age_s: float = Field(
        default=300.0,
        ge=0,
        description="link probes younger than this are reused on a link event (0: always probe)",
    )
    runner_poll_s: float = Field(
        default=0.25, gt=0, description="how often the served deployment's runner looks for triggered runs"
    )
    warm_standby: bool = Field(
        default=True,
        description="keep one started, nearly empty segment server per node (where memory allows) that the "
        "next deploy loads a layer range into instead of starting a process cold",
    )
    prepare_switch: bool = Field(
        default=True,
        description="when the controller adopts a plan whose chain is known before the deploy, have the "
        "gateway prefill the sessions on it while the run starts (POST /admin/prepare)",
    )
    keep_telemetry: bool = Field(
        default=False,
        description="append every telemetry read of the controller to run/telemetry.jsonl (to study it)",
    )
    evaluate_every_s: float = Field(
        default=2.0, gt=0, description="how often `serve`'s controller learns from traffic and re-evaluates"
    )
    admission_control: bool = Field(
        default=False,
        description="`serve`'s controller keeps the gateway's admission limit at the most sessions the "
        "plan serving holds within the scenario's TTFT/TPOT SLO and memory (policies.capacity); past it "
        "a request gets 429 with Retry-After. Off by default until the overload bench measures it",
    )
    standby_load_s: float = Field(
        default=0.5, ge=0, description="time for a warm standby to load a new stage (priced by decisions)"
    )
    cold_start_s: float = Field(
        default=12.0,
        ge=0,
        description="time to start a segment server where no standby waits, priced until the node has "
        "started one (then its measured start)",
    )
    warm_start_runs: bool = Field(
        default=True,
        description="start served flow runs as forks of a process that has already imported the flow "
        "(flows.warm_start) instead of a fresh interpreter each",
    )


class PolicySettings(BaseModel):
    """The optimiser (``policies`` is pure: callers pass these values as arguments)."""

    model_config = ConfigDict(frozen=True)

    default_policy: str = "latency_dp"
    heuristic_width: int = Field(default=24, gt=0, description="beam width of the 'heuristic' policy")
    heuristic_budget: int | None = Field(
        default=None, ge=0, description="exact-search states after the beam (None: 4e6 / (nodes x (L+1)))"
    )
    replan_horizon_s: float = Field(default=60.0, gt=0, description="gain horizon of a re-plan decision")
    replan_min_gain_ratio: float = Field(
        default=0.1, ge=0, description="least relative gain to move: the cost model's accuracy bound"
    )
    replan_hysteresis: float = Field(
        default=0.5, ge=0, description="a move's expected gain must exceed (1 + this) x its cost"
    )
    replan_reaction_s: float | None = Field(
        default=2.5,
        ge=0,
        description="how soon the controller follows a change (bench reaction: 1.2-3.2 s measured from a "
        "link's drop to the new plan serving); a decision counts on it for states that outlast it "
        "(None: it does not)",
    )
    replan_switch_stall_s: float = Field(
        default=0.3,
        ge=0,
        description="pause of a session at a switch besides its KV (the controller learns it)",
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MECSPLIT_", env_nested_delimiter="__", frozen=True)

    home: Path = Field(default_factory=_default_home, description="store, runtime state and caches")
    segments: SegmentSettings = SegmentSettings()
    testbed: TestbedSettings = TestbedSettings()
    flows: FlowSettings = FlowSettings()
    policies: PolicySettings = PolicySettings()

    @property
    def store_dir(self) -> Path:
        return self.home / "store"

    @property
    def run_dir(self) -> Path:
        return self.home / "run"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
