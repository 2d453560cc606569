"""What is deployed now: the plan, the segment endpoints and the gateway, kept in one JSON file.

Prefect runs every flow run in a fresh process, so the current deployment cannot live in memory: each
deploy writes it atomically (write a temporary file, then rename) and the next reconfiguration reads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mecsplit.files import write_json
from mecsplit.settings import Settings, get_settings

BackendName = Literal["local", "testbed"]


class Endpoint(BaseModel):
    """One running segment server."""

    model_config = ConfigDict(frozen=True)

    node: str
    first: int = Field(ge=0)
    end: int = Field(gt=0)
    host: str
    port: int = Field(gt=0, lt=65536)
    handle: str = Field(description="container id (testbed) or process id (local)")
    control_host: str | None = Field(
        default=None, description="where the flows reach it from the host, where not at host (testbed: mgmt)"
    )

    @property
    def control_address(self) -> str:
        return self.control_host or self.host


class NodeStart(BaseModel):
    """A node's last cold server start: how long it took until the server served, and when it ended."""

    model_config = ConfigDict(frozen=True)

    took_s: float = Field(ge=0)
    ended_at_s: float = Field(description="wall clock (time.time) when the server was ready")
    load: float | None = Field(
        default=None, ge=0, le=1, description="the node's background load as the start began (None: unknown)"
    )


class DeploymentState(BaseModel):
    model_config = ConfigDict(frozen=True)

    scenario: str = Field(description="path of the scenario file")
    model: str
    backend: BackendName
    revision: int = Field(ge=0)
    plan: dict[str, Any] = Field(description="policies.plan.Plan as JSON")
    segments: tuple[Endpoint, ...]
    gateway_url: str
    gateway_handle: str = Field(description="how the backend stops the gateway (pid or container)")
    secret: str = Field(description="per-deployment secret of the segment servers (file is mode 0600)")
    updated_at_s: float
    standbys: tuple[Endpoint, ...] = Field(
        default=(), description="started servers holding no useful range yet, at most one per node"
    )
    starts: dict[str, NodeStart] = Field(default_factory=dict, description="each node's last cold start")


def state_path(settings: Settings | None = None) -> Path:
    return (settings or get_settings()).run_dir / "deployment.json"


def load_state(settings: Settings | None = None) -> DeploymentState | None:
    path = state_path(settings)
    if not path.exists():
        return None
    return DeploymentState.model_validate_json(path.read_text())


def save_state(state: DeploymentState, settings: Settings | None = None) -> None:
    # It holds the deployment's secret: readable by its owner only.
    write_json(state_path(settings), state.model_dump(mode="json"), mode=0o600, indent=2, sort_keys=True)


def clear_state(settings: Settings | None = None) -> None:
    state_path(settings).unlink(missing_ok=True)
