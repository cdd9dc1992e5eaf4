"""The estimator: discrete-event simulation of a provisioned pipeline over an arrival trace.

P99 here is the nearest-rank 99th percentile: the smallest latency that at least 99% of the
queries do not exceed. So "P99 <= SLO" holds exactly when at most n - ceil(0.99 n) queries miss
the SLO, which is what lets the simulation stop as soon as that many have certainly missed.

Stages are simulated one at a time in topological order (`kernel.run_stage`). A stage's result
depends only on its own configuration and its ancestors', so results are cached under that key:
a planner candidate that changes one stage re-simulates only that stage and its descendants.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from inferline.planner.costtable import CostTable, cost_per_hour
from inferline.planner.kernel import run_stage
from inferline.planner.pipeline import Config, PipelineModel, StageConfig, query_visits

PERCENTILE = 0.99


def miss_budget(queries: int) -> int:
    """How many queries may exceed the SLO while the nearest-rank P99 still meets it."""
    return queries - math.ceil(PERCENTILE * queries)


def p99(latencies: NDArray[np.float64]) -> float:
    """Nearest-rank 99th percentile."""
    n = latencies.size
    k = max(math.ceil(PERCENTILE * n) - 1, 0)
    return float(np.partition(latencies, k)[k])


@dataclass(frozen=True)
class Estimate:
    feasible: bool
    p99_s: float
    """The P99 latency in seconds; inf when the simulation stopped early (certainly over the SLO)."""
    cost_per_hour: float
    stopped_at: str | None = None
    """The stage after which the simulation knew the candidate was infeasible."""


_StageKey = tuple[int, tuple[StageConfig, ...]]


class Estimator:
    """Estimates P99 of configurations of one pipeline for one trace and SLO.

    Conditional edges are sampled once per query with a seeded generator, so every
    configuration sees the same queries and comparisons between candidates are fair. `visits`
    gives them instead (`pipeline.check_visits`), e.g. the routes a replay's queries took.
    """

    def __init__(
        self,
        model: PipelineModel,
        table: CostTable,
        arrivals_s: NDArray[np.float64],
        slo_s: float,
        seed: int = 0,
        cache_entries: int = 96,
        visits: NDArray[np.bool_] | None = None,
    ) -> None:
        self.model = model
        self.table = table
        self.arrivals_s = np.ascontiguousarray(arrivals_s, dtype=np.float64)
        self.slo_s = slo_s
        n = self.arrivals_s.size
        self.visits = query_visits(model, n, seed, visits)
        self.budget = miss_budget(n)
        self.simulations = 0
        self.stage_runs = 0
        self._cache: OrderedDict[_StageKey, NDArray[np.float64] | None] = OrderedDict()
        self._cache_entries = cache_entries
        self._lineage = [(*model.ancestors(s), s) for s in range(model.size)]

    def estimate(self, config: Config) -> Estimate:
        """Feasibility and P99 of one configuration (stops early when certainly infeasible)."""
        self.simulations += 1
        cost = cost_per_hour(self.table, config)
        done = self.arrivals_s.copy()  # a query visiting no stage is done on arrival
        completions: list[NDArray[np.float64]] = []
        for s in range(self.model.size):
            comp = self.stage_completions(s, config, completions)
            if comp is None:
                return Estimate(False, math.inf, cost, self.model.names[s])
            completions.append(comp)
            np.maximum(done, comp, out=done)
            if s < self.model.size - 1 and self._misses(done) > self.budget:
                return Estimate(False, math.inf, cost, self.model.names[s])
        value = p99(done - self.arrivals_s)
        return Estimate(value <= self.slo_s, value, cost)

    def latencies_s(self, config: Config) -> tuple[NDArray[np.float64], list[NDArray[np.float64]]]:
        """Every query's end-to-end latency and each stage's completion times (no early stop)."""
        completions: list[NDArray[np.float64]] = []
        done = self.arrivals_s.copy()  # a query visiting no stage is done on arrival
        for s in range(self.model.size):
            comp = self._simulate_stage(s, config, completions, budget=self.arrivals_s.size)
            assert comp is not None
            completions.append(comp)
            np.maximum(done, comp, out=done)
        return done - self.arrivals_s, completions

    def _misses(self, done: NDArray[np.float64]) -> int:
        return int(np.count_nonzero(done - self.arrivals_s > self.slo_s))

    def stage_completions(
        self, s: int, config: Config, completions: list[NDArray[np.float64]]
    ) -> NDArray[np.float64] | None:
        """Completion times at stage s (cached by lineage), or None when it alone breaks the SLO.

        `config` needs entries for stages 0..s only; `completions` those of stages 0..s-1.
        """
        key: _StageKey = (s, tuple(config[a] for a in self._lineage[s]))
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        comp = self._simulate_stage(s, config, completions, self.budget)
        self._cache[key] = comp
        if len(self._cache) > self._cache_entries:
            self._cache.popitem(last=False)
        return comp

    def _simulate_stage(
        self, s: int, config: Config, completions: list[NDArray[np.float64]], budget: int
    ) -> NDArray[np.float64] | None:
        self.stage_runs += 1
        parents = self.model.parents[s]
        if parents:
            arrival = completions[parents[0]]
            for p in parents[1:]:
                arrival = np.maximum(arrival, completions[p])
        else:
            arrival = self.arrivals_s
        c = config[s]
        option = self.table[s].option(c.hardware)
        comp, finished = run_stage(
            arrival,
            self.visits[s],
            self.arrivals_s,
            option.service_s,
            c.max_batch_size,
            c.replicas,
            self.slo_s,
            budget,
            option.idle_extra_s,
            option.idle_tau_s,
        )
        return comp if finished else None
