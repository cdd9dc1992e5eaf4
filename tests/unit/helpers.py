"""Shared builders for planner tests: pipelines and profiles with known latency curves."""

from __future__ import annotations

from typing import Any

from inferline.catalog import DEFAULT_CATALOG
from inferline.planner.costtable import CostTable, build_cost_table
from inferline.planner.pipeline import PipelineModel, pipeline_model
from inferline.profiles import ModelProfile, parse_profile
from inferline.spec import parse_spec

BATCHES = (1, 2, 4, 8, 16, 32)


def linear_profile(model: str, curves: dict[str, tuple[float, float]]) -> ModelProfile:
    """latency_ms(b) = a + c·b per hardware: {hw: (a, c)}."""
    return parse_profile(
        {
            "model": model,
            "profiles": {
                hw: [{"batch_size": b, "latency_ms": {"mean": a + c * b}} for b in BATCHES]
                for hw, (a, c) in curves.items()
            },
        },
        "test",
    )


def build(stages: list[dict[str, Any]], profiles: dict[str, ModelProfile]) -> tuple[PipelineModel, CostTable]:
    model = pipeline_model(parse_spec({"name": "t", "stages": stages}))
    return model, build_cost_table(model, profiles, DEFAULT_CATALOG)


GPU_AND_CPU = {"cpu": (20.0, 15.0), "k80": (8.0, 0.8), "v100": (3.0, 0.2)}
