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
    max_kv_bytes: int = Field(default=4 * 1024**3, gt=0)
    threads: int = Field(default=1, gt=0, description="torch threads per segment process")


class TestbedSettings(BaseModel):
    """Emulated MEC network: Mininet, Docker node containers, tc shaping, the daemon."""

    model_config = ConfigDict(frozen=True)

    prefix: str = Field(default="mecsplit", description="name prefix of everything the testbed creates")


class FlowSettings(BaseModel):
    """Prefect flows and serving."""

    model_config = ConfigDict(frozen=True)

    prefect_port: int = 4200


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MECSPLIT_", env_nested_delimiter="__", frozen=True)

    home: Path = Field(default_factory=_default_home, description="store, runtime state and caches")
    segments: SegmentSettings = SegmentSettings()
    testbed: TestbedSettings = TestbedSettings()
    flows: FlowSettings = FlowSettings()

    @property
    def store_dir(self) -> Path:
        return self.home / "store"

    @property
    def run_dir(self) -> Path:
        return self.home / "run"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
