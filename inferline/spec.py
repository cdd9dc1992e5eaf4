"""Pipeline spec: a DAG of model stages with conditional edges (see README, "Pipeline spec")."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from inferline.errors import SpecError, did_you_mean
from inferline.validation import parse, read_yaml


class StageSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, description="Unique stage name.")
    model: str = Field(min_length=1, description="Model served by this stage; names its profile.")
    after: tuple[str, ...] = Field(default=(), description="Parent stages; none = entry stage.")
    probability: float = Field(
        default=1.0, description="Chance that a query which finished the parents continues here, in (0, 1]."
    )

    route: str | None = Field(
        default=None,
        description="Python callable 'module:function' that decides the conditional edge from the parents' "
        "outputs for one query (True = continue); probability then is its expected rate, for planning.",
    )

    @field_validator("route")
    @classmethod
    def _route_is_a_reference(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", v):
            raise ValueError(f"route {v!r} must name a Python callable as 'module:function'")
        return v

    @field_validator("probability")
    @classmethod
    def _probability_in_range(cls, v: float) -> float:
        if not 0.0 < v <= 1.0:
            raise ValueError(f"probability {v} is outside (0, 1]")
        return v


class PipelineSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    slo_ms: float | None = Field(default=None, gt=0, allow_inf_nan=False, description="End-to-end P99 objective in ms.")
    stages: tuple[StageSpec, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _check_graph(self) -> PipelineSpec:
        names = [s.name for s in self.stages]
        seen: set[str] = set()
        for s in self.stages:
            if s.name in seen:
                raise ValueError(f"stage {s.name!r} is defined twice")
            seen.add(s.name)
        for s in self.stages:
            for parent in s.after:
                if parent not in seen:
                    raise ValueError(f"stage {s.name!r} lists unknown parent {parent!r}{did_you_mean(parent, names)}")
                if parent == s.name:
                    raise ValueError(f"stage {s.name!r} lists itself as a parent")
            if len(set(s.after)) != len(s.after):
                raise ValueError(f"stage {s.name!r} lists a parent twice")
            if s.route is not None and not s.after:
                raise ValueError(f"entry stage {s.name!r} has a route, but a route decides on its parents' outputs")
        _topological_order(self.stages)  # raises on a cycle
        return self

    def topological_order(self) -> tuple[StageSpec, ...]:
        return _topological_order(self.stages)

    def stage(self, name: str) -> StageSpec:
        for s in self.stages:
            if s.name == name:
                return s
        raise SpecError(f"pipeline {self.name!r} has no stage {name!r}{did_you_mean(name, self.names)}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stages)


def _topological_order(stages: tuple[StageSpec, ...]) -> tuple[StageSpec, ...]:
    """Kahn's algorithm, keeping the spec's order among ready stages so results are stable."""
    remaining = {s.name: set(s.after) for s in stages}
    order: list[StageSpec] = []
    while remaining:
        ready = [s for s in stages if s.name in remaining and not remaining[s.name]]
        if not ready:
            # Peel off stages that nothing left depends on: what remains is on a cycle.
            cycle_set = set(remaining)
            while True:
                needed = {p for n in cycle_set for p in remaining[n] if p in cycle_set}
                if needed == cycle_set:
                    break
                cycle_set = needed
            cycle = sorted(cycle_set)
            raise ValueError(f"stages {', '.join(repr(c) for c in cycle)} form a cycle through 'after'")
        for s in ready:
            order.append(s)
            del remaining[s.name]
        for deps in remaining.values():
            deps.difference_update(r.name for r in ready)
    return tuple(order)


def parse_spec(data: object, source: str = "pipeline spec") -> PipelineSpec:
    return parse(PipelineSpec, data, source, SpecError, "correct the pipeline spec (see README, 'Pipeline spec')")


def load_spec(path: str | Path) -> PipelineSpec:
    return parse_spec(read_yaml(path, "pipeline spec", SpecError), f"pipeline spec {str(path)!r}")


def with_probabilities(spec: PipelineSpec, probabilities: dict[str, float]) -> PipelineSpec:
    """The spec with these stages' probabilities replaced (e.g. by measured ones); 0 is kept just above 0."""
    stages = tuple(
        s.model_copy(update={"probability": min(1.0, max(round(probabilities[s.name], 4), 1e-4))})
        if s.name in probabilities and probabilities[s.name] == probabilities[s.name]  # skip NaN
        else s
        for s in spec.stages
    )
    return spec.model_copy(update={"stages": stages})


def write_spec(spec: PipelineSpec, path: str | Path) -> None:
    import yaml

    data = spec.model_dump(mode="json", exclude_defaults=True)
    data["stages"] = [s.model_dump(mode="json", exclude_defaults=True) for s in spec.stages]
    try:
        Path(path).write_text(yaml.safe_dump(data, sort_keys=False))
    except OSError as exc:
        raise SpecError(f"cannot write spec {str(path)!r}: {exc.strerror}", "check that its folder exists") from None
