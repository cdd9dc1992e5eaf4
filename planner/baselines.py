"""Coarse-grained baselines: the whole pipeline replicated as one unit on one hardware type.

CG-Mean sizes the unit count for the trace's mean rate, CG-Peak for its peak rate (the most
arrivals in any 1 s window). The unit runs every stage on the same hardware with one batch size;
the batch size is tuned for the unit: of the (hardware, batch) choices, the cheapest whose P99
meets the SLO wins, else the one with the lowest P99 (reported infeasible).
"""

from __future__ import annotations

import math

from inferline.planner.costtable import CostTable, cost_per_hour
from inferline.planner.envelope import mean_rate_qps, peak_rate_qps
from inferline.planner.estimator import Estimator, p99
from inferline.planner.pipeline import Config, PipelineModel, StageConfig
from inferline.planner.search import PlanResult, trace_load

PEAK_WINDOW_S = 1.0


def plan_coarse(model: PipelineModel, table: CostTable, estimator: Estimator, sizing: str) -> PlanResult:
    strategy = f"cg-{sizing}"
    rate = (
        mean_rate_qps(estimator.arrivals_s) if sizing == "mean" else peak_rate_qps(estimator.arrivals_s, PEAK_WINDOW_S)
    )
    load = trace_load(model, estimator)
    shared_hw = set.intersection(*(set(t.options) for t in table))
    if not shared_hw:
        return PlanResult(strategy, False, None, math.inf, math.inf,
                          "no hardware type is profiled for every stage", 0)  # fmt: skip
    candidates: list[tuple[float, Config]] = []
    for hw in sorted(shared_hw):
        batches = set.intersection(*(set(t.option(hw).batch_sizes) for t in table))
        for b in sorted(batches):
            unit_qps = min(table[s].option(hw).throughput_qps(b) / load.visit_rates[s] for s in range(model.size))
            units = max(1, math.ceil(rate / unit_qps))
            config = tuple(StageConfig(hw, b, units) for _ in range(model.size))
            candidates.append((cost_per_hour(table, config), config))
    candidates.sort(key=lambda c: c[0])
    for cost, config in candidates:
        estimate = estimator.estimate(config)
        if estimate.feasible:
            return PlanResult(strategy, True, config, cost, estimate.p99_s, None, estimator.simulations)
    best = min(candidates, key=lambda c: (p99(estimator.latencies_s(c[1])[0]), c[0]))
    value = p99(estimator.latencies_s(best[1])[0])
    return PlanResult(
        strategy, False, best[1], best[0], value,
        f"no single-hardware unit sized for the {sizing} rate ({rate:.0f} qps) meets the SLO; best P99 "
        f"{value * 1000:.0f} ms",
        estimator.simulations,
    )  # fmt: skip
