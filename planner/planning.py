"""One entry point for all strategies: where exact versus greedy is chosen, and the plan's tuner data."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

import numpy as np
from numpy.typing import NDArray

from inferline.catalog import HardwareCatalog
from inferline.errors import PlanError
from inferline.plan import EnvelopePoint, LadderStep, Plan, StagePlan, TunerInfo, TunerStage
from inferline.planner.baselines import plan_coarse
from inferline.planner.costtable import CostTable, build_cost_table
from inferline.planner.envelope import envelope, envelope_windows, max_arrivals
from inferline.planner.estimator import Estimator
from inferline.planner.exact import plan_exact
from inferline.planner.ladder import scale_ladder
from inferline.planner.pipeline import Config, PipelineModel, StageConfig, pipeline_model
from inferline.planner.search import PlanResult, longest_path_s, plan_greedy
from inferline.profiles import ModelProfile
from inferline.spec import PipelineSpec

STRATEGIES = ("inferline", "exact", "cg-mean", "cg-peak")


def run_strategy(
    strategy: str, model: PipelineModel, table: CostTable, estimator: Estimator, exact_max_stage_runs: int = 200_000
) -> PlanResult:
    if strategy == "inferline":
        return plan_greedy(model, table, estimator)
    if strategy == "exact":
        # The greedy plan's cost bounds the exact search from above: it then only explores
        # configurations that could be cheaper, which is what makes exact search tractable.
        greedy = plan_greedy(model, table, estimator)
        return plan_exact(model, table, estimator, upper_bound=greedy, max_stage_runs=exact_max_stage_runs)
    if strategy in ("cg-mean", "cg-peak"):
        return plan_coarse(model, table, estimator, strategy.removeprefix("cg-"))
    raise ValueError(f"unknown strategy {strategy!r}")


def make_plan(
    spec: PipelineSpec,
    profiles: Mapping[str, ModelProfile],
    catalog: HardwareCatalog,
    arrivals_s: NDArray[np.float64],
    slo_ms: float,
    strategy: str = "inferline",
    seed: int = 0,
    ladder: bool = False,
) -> Plan:
    """Plan a pipeline for a sample trace: the design's plan JSON, feasible or with a reason."""
    started = time.perf_counter()
    model = pipeline_model(spec)
    table = build_cost_table(model, profiles, catalog)
    estimator = Estimator(model, table, arrivals_s, slo_ms / 1000.0, seed=seed)
    result = run_strategy(strategy, model, table, estimator)
    wall_s = time.perf_counter() - started
    if result.config is None:
        return Plan(pipeline=spec.name, slo_ms=slo_ms, strategy=strategy, feasible=False, reason=result.reason,
                    planner_wall_s=round(wall_s, 4), simulations=result.simulations)  # fmt: skip
    return Plan(
        pipeline=spec.name,
        slo_ms=slo_ms,
        strategy=strategy,
        feasible=result.feasible,
        reason=result.reason,
        cost_per_hour=round(result.cost_per_hour, 6),
        estimated_p99_ms=round(result.p99_s * 1000.0, 3) if math.isfinite(result.p99_s) else None,
        stages={
            name: StagePlan(hardware=c.hardware, max_batch_size=c.max_batch_size, replicas=c.replicas)
            for name, c in zip(model.names, result.config, strict=True)
        },
        planner_wall_s=round(wall_s, 4),
        simulations=result.simulations,
        tuner=tuner_info(model, table, estimator, result.config, ladder and result.feasible, seed),
    )


def tuner_info(
    model: PipelineModel, table: CostTable, estimator: Estimator, config: Config, ladder: bool = False, seed: int = 0
) -> TunerInfo:
    """What the envelope tuner records at plan time: the sample trace's envelope, μ and s per stage,
    and with `ladder` the configurations planned for faster traffic (`planner/ladder.py`)."""
    service_s = longest_path_s(
        model, [table[s].option(c.hardware).service_time_s(c.max_batch_size) for s, c in enumerate(config)]
    )
    arrivals = estimator.arrivals_s
    visit_rates = model.visit_rates()
    return TunerInfo(
        service_time_s=service_s,
        envelope=tuple(
            EnvelopePoint(window_s=w, rate_qps=r) for w, r in envelope(arrivals, envelope_windows(service_s))
        ),
        rate_5s_qps=max_arrivals(arrivals, 5.0) / 5.0,
        stages={
            name: TunerStage(
                throughput_qps=table[s].option(c.hardware).throughput_qps(c.max_batch_size),
                visit_rate=float(max(visit_rates[s], 1e-9)),
                price_per_hour=table[s].option(c.hardware).price_per_hour,
                max_batch_size=c.max_batch_size,
            )
            for s, (name, c) in enumerate(zip(model.names, config, strict=True))
        },
        ladder=tuple(
            LadderStep(
                rate_multiplier=step.rate_multiplier,
                cost_per_hour=round(step.cost_per_hour, 6),
                stages={
                    name: StagePlan(hardware=c.hardware, max_batch_size=c.max_batch_size, replicas=c.replicas)
                    for name, c in zip(model.names, step.config, strict=True)
                },
            )
            for step in (scale_ladder(model, table, config, arrivals, estimator.slo_s, seed=seed) if ladder else ())
        ),
    )


def plan_config(model: PipelineModel, table: CostTable, plan: Plan) -> Config:
    """The plan's configuration in the model's stage order, checked against the pipeline and profiles."""
    if plan.pipeline != model.name:
        raise PlanError(
            f"the plan is for pipeline {plan.pipeline!r}, not {model.name!r}", "pass the plan made for this spec"
        )
    extra = sorted(set(plan.stages) - set(model.names))
    if extra:
        raise PlanError(f"the plan has stages {extra} that the pipeline does not", "re-plan for this spec")
    config = []
    for s, name in enumerate(model.names):
        st = plan.stage(name)
        if st.hardware not in table[s].options:
            raise PlanError(
                f"stage {name!r}: hardware {st.hardware!r} has no profile of model {table[s].model!r} in the catalog",
                f"use one of {sorted(table[s].options)} or re-plan",
            )
        option = table[s].option(st.hardware)
        if st.max_batch_size not in option.batch_sizes:
            raise PlanError(
                f"stage {name!r}: max_batch_size {st.max_batch_size} is not a profiled batch size on {st.hardware!r}",
                f"use one of {list(option.batch_sizes)}",
            )
        config.append(StageConfig(st.hardware, st.max_batch_size, st.replicas))
    return tuple(config)
