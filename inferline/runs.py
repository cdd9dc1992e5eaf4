"""Closed-loop runs of a plan: the simulation behind `inferline simulate` and the design's run-results JSON."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray

from inferline.catalog import DEFAULT_CATALOG, load_catalog
from inferline.errors import InferlineError
from inferline.plan import Plan
from inferline.planner.closedloop import RunResult, simulate_run
from inferline.planner.costtable import build_cost_table
from inferline.planner.pipeline import pipeline_model
from inferline.planner.planning import plan_config
from inferline.planner.tuning.registry import make_policy
from inferline.profiles import ModelProfile, load_profiles
from inferline.spec import PipelineSpec


def simulate_plan(
    spec: PipelineSpec,
    plan: Plan,
    arrivals_s: NDArray[np.float64],
    tuner: str,
    *,
    profiles_dir: str | None = None,
    profiles: Mapping[str, ModelProfile] | None = None,
    catalog_path: str | None = None,
    tick_s: float = 0.25,
    startup_s: float = 5.0,
    seed: int = 0,
    cores: float | None = None,
    background_s: tuple[float, ...] = (),
    visits: NDArray[np.bool_] | None = None,
) -> RunResult:
    """The plan over the trace in the closed-loop simulator, with `tuner` (a policy name, `none` = static).

    Profiles (`profiles`, else read from `profiles_dir`) and hardware catalog default to the ones
    the plan was made with. With `cores`, every replica shares that many cores, beside processes
    costing `background_s` CPU seconds per query. `visits`: the conditional edges each query takes
    (else sampled with `seed`).
    """
    if profiles is None:
        where = profiles_dir or plan.profiles
        if where is None:
            raise InferlineError("the plan does not say where its profiles are", "pass --profiles DIR")
        profiles = load_profiles(where)
    catalog_file = catalog_path or plan.hardware_catalog
    catalog = load_catalog(catalog_file) if catalog_file else DEFAULT_CATALOG
    model = pipeline_model(spec)
    table = build_cost_table(model, profiles, catalog)
    config = plan_config(model, table, plan)
    policy = make_policy(tuner, plan.tuner)
    if tick_s <= 0 or startup_s < 0:
        raise InferlineError("--tick-s must be positive and --startup-s not negative", "pass sensible durations")
    return simulate_run(
        model, table, config, arrivals_s, plan.slo_ms / 1000.0, policy, tick_s=tick_s, startup_s=startup_s, seed=seed,
        cores=cores, background_s=background_s, visits=visits,
    )  # fmt: skip


def run_results(result: RunResult, tuner: str) -> dict[str, Any]:
    return {
        "queries": int(result.latencies_s.size),
        "p99_ms": round(result.p99_s * 1000.0, 3),
        "slo_ms": result.slo_s * 1000.0,
        "slo_miss_rate": round(result.slo_miss_rate, 6),
        "cost": round(result.cost, 6),
        "cost_per_hour": round(result.cost_per_hour, 6),
        "duration_s": round(result.duration_s, 3),
        "tuner": tuner,
        "mean_batch_size": {k: round(v, 3) for k, v in result.mean_batch.items() if not math.isnan(v)},
        "decisions": [
            {
                "time_s": round(d.time_s, 3),
                "stage": d.decision.stage,
                "replicas": d.decision.replicas,
                "reason": d.decision.reason,
                "message": d.decision.message,
            }
            for d in result.decisions
        ],
    }
