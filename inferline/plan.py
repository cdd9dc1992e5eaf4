"""Plan: per-stage hardware, max batch size and replicas, with cost and estimated P99 (README, "Plan")."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from inferline.errors import PlanError, did_you_mean
from inferline.profiles import MAX_BATCH_SIZE
from inferline.validation import parse

if TYPE_CHECKING:
    from inferline.spec import StageSpec


MAX_REPLICAS = 100_000
"""Replicas a plan may give one stage: the simulators hold a slot for each."""


class StagePlan(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    hardware: str
    max_batch_size: int = Field(ge=1, le=MAX_BATCH_SIZE)
    replicas: int = Field(ge=1, le=MAX_REPLICAS)


class EnvelopePoint(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    window_s: float = Field(gt=0)
    rate_qps: float = Field(ge=0)


class TunerStage(BaseModel):
    """What the envelope tuner needs of a stage, recorded at plan time."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    throughput_qps: float = Field(gt=0, description="μ: one replica's throughput at the planned batch.")
    visit_rate: float = Field(gt=0, le=1, description="s: fraction of pipeline queries visiting the stage.")
    price_per_hour: float = Field(default=0.0, ge=0, description="One replica's price on the planned hardware.")
    max_batch_size: int | None = Field(default=None, ge=1, description="The planned batch size.")


class LadderStep(BaseModel):
    """A configuration planned ahead for the sample trace sped up `rate_multiplier` times.

    Planned on each stage's planned hardware: the tuner may switch batch sizes and replicas to it,
    never hardware."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rate_multiplier: float = Field(gt=1)
    cost_per_hour: float = Field(ge=0)
    stages: dict[str, StagePlan]


class TunerInfo(BaseModel):
    """The sample trace's traffic envelope and the scale-down reference rate."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    service_time_s: float = Field(gt=0, description="T_s: the pipeline's longest-path service time.")
    envelope: tuple[EnvelopePoint, ...]
    rate_5s_qps: float = Field(ge=0, description="Max 5 s rate of the sample trace.")
    stages: dict[str, TunerStage]
    ladder: tuple[LadderStep, ...] = Field(
        default=(), description="Configurations planned for faster traffic (`inferline plan --scale-ladder`)."
    )


class Plan(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    pipeline: str
    slo_ms: float = Field(gt=0, allow_inf_nan=False)
    strategy: str
    feasible: bool = True
    reason: str | None = None
    cost_per_hour: float | None = None
    estimated_p99_ms: float | None = None
    stages: dict[str, StagePlan] = Field(default_factory=dict)
    planner_wall_s: float | None = None
    simulations: int | None = None
    profiles: str | None = Field(default=None, description="Profile directory the plan was made from.")
    hardware_catalog: str | None = Field(default=None, description="Catalog file used; none = built-in AWS prices.")
    spec: str | None = Field(default=None, description="Pipeline spec file the plan was made for.")
    tuner: TunerInfo | None = None

    def stage(self, name: str) -> StagePlan:
        try:
            return self.stages[name]
        except KeyError:
            raise PlanError(
                f"plan has no stage {name!r}{did_you_mean(name, self.stages)}",
                "make a plan for this pipeline with `inferline plan`",
            ) from None

    def profile_key(self, stage: StageSpec) -> tuple[str, str]:
        """The (model, hardware) whose profile times `stage`'s calls under this plan."""
        return stage.model, self.stage(stage.name).hardware

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", exclude_none=True), indent=2)


def load_plan(path: str | Path) -> Plan:
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except OSError as exc:
        raise PlanError(
            f"cannot read plan {str(p)!r}: {exc.strerror}", "pass the file `inferline plan --json` wrote"
        ) from None
    except json.JSONDecodeError as exc:
        raise PlanError(
            f"plan {str(p)!r} is not valid JSON (line {exc.lineno})", "re-create it with `inferline plan --json`"
        ) from None
    except (UnicodeDecodeError, RecursionError, ValueError) as exc:
        raise PlanError(
            f"plan {str(p)!r} is not readable JSON ({type(exc).__name__})", "re-create it with `inferline plan --json`"
        ) from None
    plan = parse(Plan, data, f"plan {str(p)!r}", PlanError, "re-create it with `inferline plan --json`")
    if not plan.feasible:
        raise PlanError(
            f"plan {str(p)!r} is infeasible ({plan.reason})", "plan again with a looser SLO or more hardware"
        )
    return plan
