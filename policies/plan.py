"""A plan: which node runs which contiguous layer range, in pipeline order, and what it should achieve."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from policies.errors import ProblemError


class Stage(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    node: str
    first: int = Field(ge=0)
    end: int = Field(ge=1)

    @model_validator(mode="after")
    def _range(self) -> Stage:
        if self.end <= self.first:
            raise ProblemError(f"stage on {self.node!r}: empty range [{self.first}, {self.end})")
        return self


class Metrics(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    ttft_s: float
    tpot_s: float
    throughput_tok_s: float
    privacy_exposure: float
    bottleneck_s: float
    request_latency_s: float


class Plan(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    stages: tuple[Stage, ...] = Field(min_length=1)
    policy: str
    predicted: Metrics
    objective_value: float

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(s.node for s in self.stages)

    def layout(self) -> tuple[tuple[str, int, int], ...]:
        return tuple((s.node, s.first, s.end) for s in self.stages)

    def to_json(self) -> str:
        # Same plan -> same bytes: fixed field order, no indentation choices left to callers.
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.model_validate_json(text)
