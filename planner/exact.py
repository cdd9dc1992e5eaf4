"""Exact search over (hardware, batch size, replicas) per stage, for small pipelines.

Depth-first over the stages in topological order. A node fixes the configurations of stages
0..s; it is simulated up to stage s (the estimator caches each stage under its lineage). Two
valid prunes keep it tractable:

- Cost: partial cost + the cheapest stable option of every remaining stage >= the best cost
  found so far (initially the greedy plan's, when given) cannot improve.
- Latency: stages after s only add latency, so when the stages so far already make more than
  the P99 budget of queries miss the SLO, no completion of that prefix is feasible.

Options at a stage are tried cheapest first, so once the bound prunes one, it prunes the rest.
Replica counts start at the stability minimum (utilization < 1 at the trace's mean rate).
The search is exact over that space; `max_stage_runs` caps its work so a too-large space ends
with a clear "gave up" result instead of running for hours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from inferline.planner.costtable import CostTable
from inferline.planner.estimator import Estimator
from inferline.planner.pipeline import Config, PipelineModel, StageConfig
from inferline.planner.search import Load, PlanResult, best_service_s, trace_load

MAX_EXACT_STAGES = 4


@dataclass(frozen=True)
class _Option:
    cost: float
    config: StageConfig


class _GaveUp(Exception):
    pass


def plan_exact(
    model: PipelineModel,
    table: CostTable,
    estimator: Estimator,
    upper_bound: PlanResult | None = None,
    max_stage_runs: int = 200_000,
) -> PlanResult:
    if model.size > MAX_EXACT_STAGES:
        return PlanResult(
            "exact", False, None, math.inf, math.inf,
            f"exact search handles up to {MAX_EXACT_STAGES} stages; this pipeline has {model.size}",
            estimator.simulations,
        )  # fmt: skip
    floor_s = best_service_s(model, table)
    if floor_s > estimator.slo_s:
        return PlanResult(
            "exact", False, None, math.inf, math.inf,
            f"the SLO of {estimator.slo_s * 1000:g} ms is below the pipeline's best possible service time "
            f"of {floor_s * 1000:.1f} ms (batch 1 on the fastest hardware)",
            estimator.simulations,
        )  # fmt: skip
    load = trace_load(model, estimator)
    search = _Search(model, table, estimator, load, max_stage_runs)
    if upper_bound is not None and upper_bound.feasible and upper_bound.config is not None:
        search.best_cost = upper_bound.cost_per_hour * (1 + 1e-9)
    try:
        search.descend(0, (), 0.0, estimator.arrivals_s.copy(), [])
    except _GaveUp:
        return PlanResult(
            "exact", False, None, math.inf, math.inf,
            f"exact search gave up after {max_stage_runs} stage simulations (space too large)",
            estimator.simulations,
        )  # fmt: skip
    if search.best is None:
        if upper_bound is not None and upper_bound.feasible:
            return PlanResult("exact", True, upper_bound.config, upper_bound.cost_per_hour, upper_bound.p99_s, None,
                              estimator.simulations)  # fmt: skip
        return PlanResult("exact", False, None, math.inf, math.inf, "no configuration meets the SLO",
                          estimator.simulations)  # fmt: skip
    final = estimator.estimate(search.best)
    return PlanResult("exact", True, search.best, final.cost_per_hour, final.p99_s, None, estimator.simulations)


class _Search:
    def __init__(self, model: PipelineModel, table: CostTable, estimator: Estimator, load: Load, limit: int) -> None:
        self.model = model
        self.estimator = estimator
        self.limit = limit
        self.best_cost = math.inf
        self.best: Config | None = None
        self.options = [self._stage_options(table, load, s) for s in range(model.size)]
        cheapest = [opts[0].cost for opts in self.options]
        self.rest_lower_bound = [sum(cheapest[s + 1 :]) for s in range(model.size)]

    def _stage_options(self, table: CostTable, load: Load, s: int) -> list[_Option]:
        found = []
        for option in table[s].options.values():
            for b in option.batch_sizes:
                k0 = load.stable_replicas(table, s, option.hardware, b)
                # Enough replicas to be generous: costlier ones are cut by the cost bound.
                for k in range(k0, k0 + 64):
                    found.append(_Option(option.price_per_hour * k, StageConfig(option.hardware, b, k)))
        found.sort(key=lambda o: (o.cost, o.config.replicas, o.config.max_batch_size, o.config.hardware))
        return found

    def descend(
        self, s: int, prefix: Config, cost: float, done: NDArray[np.float64], comps: list[NDArray[np.float64]]
    ) -> None:
        est = self.estimator
        for opt in self.options[s]:
            if cost + opt.cost + self.rest_lower_bound[s] >= self.best_cost:
                return  # options are sorted by cost: every later one is pruned too
            if est.stage_runs >= self.limit:
                raise _GaveUp
            config = (*prefix, opt.config)
            comp = est.stage_completions(s, config, comps)
            if comp is None:
                continue
            stage_done = np.maximum(done, comp)
            latencies = stage_done - est.arrivals_s
            if np.count_nonzero(latencies > est.slo_s) > est.budget:
                continue
            if s == self.model.size - 1:
                self.best_cost = cost + opt.cost
                self.best = config
                return  # cheapest feasible completion of this prefix
            self.descend(s + 1, config, cost + opt.cost, stage_done, [*comps, comp])
