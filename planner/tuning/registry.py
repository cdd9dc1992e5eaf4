"""Tuner policies by name: the one place the CLI and benchmarks pick a policy from."""

from __future__ import annotations

from typing import Any

from inferline.errors import InferlineError, did_you_mean
from inferline.plan import TunerInfo

TUNERS = ("inferline", "none", "autoscale", "ray", "kpa")


def make_policy(name: str, info: TunerInfo | None) -> Any:
    """A fresh policy object, or None for `none` (the static plan)."""
    if name == "none":
        return None
    if name == "inferline":
        from inferline.planner.tuning.envelope_tuner import EnvelopeTuner

        if info is None:
            raise InferlineError(
                "the plan has no tuner section (envelope and per-stage throughput)",
                "re-create the plan with `inferline plan --json`",
            )
        return EnvelopeTuner(info)
    if name == "autoscale":
        from inferline.planner.tuning.autoscale import UtilizationAutoscaler

        return UtilizationAutoscaler()
    if name == "ray":
        from inferline.planner.tuning.ray_serve import RayServeAutoscaler

        return RayServeAutoscaler()
    if name == "kpa":
        from inferline.planner.tuning.kpa import KpaAutoscaler

        return KpaAutoscaler()
    raise InferlineError(f"unknown tuner {name!r}{did_you_mean(name, TUNERS)}", f"use one of {', '.join(TUNERS)}")
