"""InferLine's planner: a greedy, cost-minimizing search over hardware, batch size and replicas.

Phase 1 (feasible start): every stage at batch 1 on its fastest hardware with the fewest replicas
that keep it stable (utilization < 1 at the trace's mean rate). If the longest path's service
time already exceeds the SLO, no replica count can help: infeasible. Otherwise add a replica to
the bottleneck stage (lowest capacity k·μ/s, μ = replica throughput, s = visit rate) until the
estimator says P99 <= SLO.

Phase 2 (greedy cost reduction): each round builds, for every stage, the candidates of the
actions RemoveReplica, IncreaseBatch (next profiled batch size with each replica count from the
stability minimum up to the one that keeps the stage's capacity) and DowngradeHW (next cheaper
hardware, replicas re-derived the same way); candidates are simulated cheapest first and the
first feasible one is applied, i.e. the cheapest feasible candidate. IncreaseBatch may jump to
any larger profiled batch size, not only the next: a bigger batch often pays off only two steps
on. When no candidate is feasible as it stands, the round tries to repair candidates: add
replicas to the stage where the simulation found the SLO broken (else the stage with the lowest
capacity) while the cost stays below the current one, and takes the cheapest repaired one. This
lets a move on one stage be paid for by a replica on another, which the plain actions cannot
express. Last, it pairs each saving candidate with a helper move on another stage (any hardware
and batch size with the fewest replicas that keep that stage's capacity, pricier hardware
included), pairs whose saver keeps its stage's capacity first, then cheapest first (at most
`MAX_PAIR_TRIALS`, the first `MAX_PAIR_REPAIRS` failures repaired as above): a batch increase on
one stage can be feasible once another stage is made faster. Stops when no candidate, plain,
repaired or paired, is cheaper.

Escape (beyond the paper): phase 2 only moves to cheaper hardware, so it cannot reach a plan
where one stage buys speed that another spends. From the local optimum, each stage in turn is
moved to pricier, no slower hardware with its capacity kept (a feasible "kick"); phase 2 runs
from there with that stage pinned to its new hardware (else the cheapest way down is usually
straight back), then once more unpinned, and a cheaper result replaces the plan. At most
`MAX_KICK_ROUNDS` rounds, and none once the simulations spent exceed `ESCAPE_BUDGET_FACTOR`
times those of phases 1 and 2.

Invariant: the configuration held is always feasible, and its cost strictly falls each round,
so the search ends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from inferline.planner.costtable import CostTable, cost_per_hour
from inferline.planner.estimator import Estimate, Estimator
from inferline.planner.pipeline import Config, PipelineModel, StageConfig

MAX_TOTAL_REPLICAS = 2000
MAX_PAIR_TRIALS = 400
MAX_KICK_ROUNDS = 8
ESCAPE_BUDGET_FACTOR = 3
MAX_PAIR_REPAIRS = 40


@dataclass(frozen=True)
class PlanResult:
    strategy: str
    feasible: bool
    config: Config | None
    cost_per_hour: float
    p99_s: float
    reason: str | None
    simulations: int


@dataclass(frozen=True)
class Load:
    """What the trace asks of each stage: mean pipeline rate and per-stage visit rates."""

    mean_rate_qps: float
    visit_rates: tuple[float, ...]

    def stable_replicas(self, table: CostTable, stage: int, hardware: str, batch: int) -> int:
        """Fewest replicas whose utilization at the mean rate stays below 1."""
        mu = table[stage].option(hardware).throughput_qps(batch)
        demand = self.mean_rate_qps * self.visit_rates[stage]
        return max(1, math.floor(demand / mu) + 1)


def trace_load(model: PipelineModel, estimator: Estimator) -> Load:
    arrivals = estimator.arrivals_s
    span = float(arrivals[-1] - arrivals[0]) if arrivals.size > 1 else 1.0
    rate = arrivals.size / max(span, 1e-9)
    visits = estimator.visits.mean(axis=1)
    return Load(mean_rate_qps=rate, visit_rates=tuple(float(max(v, 1e-9)) for v in visits))


def longest_path_s(model: PipelineModel, service_s: list[float]) -> float:
    """Longest chain of service times through the DAG (no queueing)."""
    finish = [0.0] * model.size
    for s in range(model.size):
        start = max((finish[p] for p in model.parents[s]), default=0.0)
        finish[s] = start + service_s[s]
    return max(finish)


def best_service_s(model: PipelineModel, table: CostTable) -> float:
    """The pipeline's best possible service time: batch 1 on each stage's fastest hardware."""
    return longest_path_s(model, [table[s].by_speed()[0].service_time_s(1) for s in range(model.size)])


def plan_greedy(model: PipelineModel, table: CostTable, estimator: Estimator) -> PlanResult:
    load = trace_load(model, estimator)
    start = _initialize(model, table, estimator, load)
    if isinstance(start, str):
        return PlanResult("inferline", False, None, math.inf, math.inf, start, estimator.simulations)
    config, estimate = _descend(model, table, estimator, load, *start)
    # Escaping costs many simulations and rarely pays: bound it relative to the search so far.
    budget = estimator.simulations + ESCAPE_BUDGET_FACTOR * max(estimator.simulations, 500)
    for _ in range(MAX_KICK_ROUNDS):
        if estimator.simulations >= budget:
            break
        escaped = _escape(model, table, estimator, load, config, estimate)
        if escaped is None:
            break
        config, estimate = escaped
    return PlanResult("inferline", True, config, estimate.cost_per_hour, estimate.p99_s, None, estimator.simulations)


def _descend(
    model: PipelineModel,
    table: CostTable,
    estimator: Estimator,
    load: Load,
    config: Config,
    estimate: Estimate,
    pinned: tuple[int, str] | None = None,
) -> tuple[Config, Estimate]:
    """Phase 2 from `config`; `pinned` = (stage, hardware) keeps that stage on that hardware."""
    while True:
        better = _cheapest_feasible_neighbor(model, table, estimator, load, config, estimate.cost_per_hour, pinned)
        if better is None:
            return config, estimate
        config, estimate = better


def _escape(
    model: PipelineModel, table: CostTable, estimator: Estimator, load: Load, config: Config, estimate: Estimate
) -> tuple[Config, Estimate] | None:
    """Leave a local optimum: move one stage to pricier, faster hardware, descend again, keep if cheaper.

    Phase 2 only ever moves to cheaper hardware, so a plan where one stage should buy speed that
    another stage spends (a larger batch, fewer replicas) is out of its reach. Each kick keeps the
    stage's capacity and does not lengthen its batch service time, so it stays feasible.
    """
    for stage, kick in _upgrade_kicks(table, load, config):
        kicked = estimator.estimate(kick)
        if not kicked.feasible:
            continue
        # Pinned first: the cheapest way down would often be straight back to the old hardware.
        found = _descend(model, table, estimator, load, kick, kicked, pinned=(stage, kick[stage].hardware))
        found = _descend(model, table, estimator, load, *found)
        if found[1].cost_per_hour < estimate.cost_per_hour - 1e-12:
            return found
    return None


def _upgrade_kicks(table: CostTable, load: Load, config: Config) -> list[tuple[int, Config]]:
    kicks = []
    for s, c in enumerate(config):
        current = table[s].option(c.hardware)
        capacity = c.replicas * current.throughput_qps(c.max_batch_size)
        best: tuple[int, int, str] | None = None
        for option in table[s].options.values():
            if option.price_per_hour <= current.price_per_hour:
                continue
            for batch in option.batch_sizes:
                if option.service_time_s(batch) > current.service_time_s(c.max_batch_size):
                    continue
                k = _replica_range(load, table, s, option.hardware, batch, capacity)[-1]
                best = min(best, (k, batch, option.hardware)) if best is not None else (k, batch, option.hardware)
            if best is not None:
                kicks.append((s, _with(config, s, StageConfig(best[2], best[1], best[0]))))
                best = None
    return kicks


def _initialize(
    model: PipelineModel, table: CostTable, estimator: Estimator, load: Load
) -> tuple[Config, Estimate] | str:
    fastest = [table[s].by_speed()[0] for s in range(model.size)]
    floor_s = longest_path_s(model, [o.service_time_s(1) for o in fastest])
    if floor_s > estimator.slo_s:
        return (
            f"the SLO of {estimator.slo_s * 1000:g} ms is below the pipeline's best possible service time "
            f"of {floor_s * 1000:.1f} ms (batch 1 on the fastest hardware)"
        )
    config = tuple(
        StageConfig(o.hardware, 1, load.stable_replicas(table, s, o.hardware, 1)) for s, o in enumerate(fastest)
    )
    while True:
        estimate = estimator.estimate(config)
        if estimate.feasible:
            return config, estimate
        if sum(c.replicas for c in config) >= MAX_TOTAL_REPLICAS:
            return f"no configuration with up to {MAX_TOTAL_REPLICAS} replicas meets the SLO"
        capacity = [c.replicas * fastest[s].throughput_qps(1) / load.visit_rates[s] for s, c in enumerate(config)]
        b = int(np.argmin(capacity))
        config = _with(config, b, replace(config[b], replicas=config[b].replicas + 1))


def _with(config: Config, stage: int, new: StageConfig) -> Config:
    return (*config[:stage], new, *config[stage + 1 :])


def _replica_range(load: Load, table: CostTable, stage: int, hardware: str, batch: int, keep_qps: float) -> range:
    """From the stability minimum up to the fewest replicas that keep `keep_qps` of capacity."""
    low = load.stable_replicas(table, stage, hardware, batch)
    high = max(low, math.ceil(keep_qps / table[stage].option(hardware).throughput_qps(batch) - 1e-9))
    return range(low, high + 1)


def neighbors(model: PipelineModel, table: CostTable, load: Load, config: Config) -> list[tuple[float, Config]]:
    """All candidates of one greedy round, with their cost."""
    found: list[Config] = []
    for s, c in enumerate(config):
        option = table[s].option(c.hardware)
        capacity = c.replicas * option.throughput_qps(c.max_batch_size)
        if c.replicas > 1:
            found.append(_with(config, s, replace(c, replicas=c.replicas - 1)))
        for bigger in (b for b in option.batch_sizes if b > c.max_batch_size):
            for k in _replica_range(load, table, s, c.hardware, bigger, capacity):
                found.append(_with(config, s, StageConfig(c.hardware, bigger, k)))
        cheaper = table[s].next_cheaper(c.hardware)
        if cheaper is not None:
            # Slower hardware often pays off only with a larger batch: offer every batch size.
            for batch in cheaper.batch_sizes:
                for k in _replica_range(load, table, s, cheaper.hardware, batch, capacity):
                    found.append(_with(config, s, StageConfig(cheaper.hardware, batch, k)))
    return [(cost_per_hour(table, cand), cand) for cand in found]


def _cheapest_feasible_neighbor(
    model: PipelineModel,
    table: CostTable,
    estimator: Estimator,
    load: Load,
    config: Config,
    cost: float,
    pinned: tuple[int, str] | None = None,
) -> tuple[Config, Estimate] | None:
    around = neighbors(model, table, load, config)
    helpers = _helper_moves(table, load, config)
    if pinned is not None:
        stage, hardware = pinned
        around = [(c, cand) for c, cand in around if cand[stage].hardware == hardware]
        helpers = [(s, m) for s, m in helpers if s != stage or m.hardware == hardware]
    candidates = sorted(
        {cand: c for c, cand in around if c < cost - 1e-12}.items(),
        key=lambda item: (item[1], _tie_key(item[0])),
    )
    failed: list[tuple[Config, Estimate]] = []
    for cand, _ in candidates:
        estimate = estimator.estimate(cand)
        if estimate.feasible:
            return cand, estimate
        failed.append((cand, estimate))
    best: tuple[Config, Estimate] | None = None
    limit = cost - 1e-12
    for cand, estimate in failed:
        if cost_per_hour(table, cand) >= limit:
            break  # sorted by cost: no later candidate can be repaired below the limit
        repaired = _repair(model, table, estimator, load, cand, estimate, limit)
        if repaired is not None:
            best, limit = repaired, repaired[1].cost_per_hour - 1e-12
    if best is not None:
        return best
    # A saving move on one stage may need a helper move on another: a batch increase or hardware
    # switch that costs nothing extra (or a little) and keeps that stage's capacity but cuts its latency.
    savers = list(dict.fromkeys(cand for c, cand in around if c < cost - 1e-12))
    return _cheapest_feasible_pair(model, table, estimator, config, savers, helpers, load, cost)


def _keeps_capacity(table: CostTable, config: Config, cand: Config) -> bool:
    def capacity(s: int, c: StageConfig) -> float:
        return c.replicas * table[s].option(c.hardware).throughput_qps(c.max_batch_size)

    return all(capacity(s, c) >= 0.999 * capacity(s, config[s]) for s, c in enumerate(cand) if c != config[s])


def _helper_moves(table: CostTable, load: Load, config: Config) -> list[tuple[int, StageConfig]]:
    """Per stage, every (hardware, batch) with the fewest replicas that keep the stage's capacity."""
    moves = []
    for s, c in enumerate(config):
        capacity = c.replicas * table[s].option(c.hardware).throughput_qps(c.max_batch_size)
        for option in table[s].options.values():
            for batch in option.batch_sizes:
                k = _replica_range(load, table, s, option.hardware, batch, capacity)[-1]
                new = StageConfig(option.hardware, batch, k)
                if new != c:
                    moves.append((s, new))
    return moves


def _cheapest_feasible_pair(
    model: PipelineModel,
    table: CostTable,
    estimator: Estimator,
    config: Config,
    savers: list[Config],
    helpers: list[tuple[int, StageConfig]],
    load: Load,
    cost: float,
) -> tuple[Config, Estimate] | None:
    """A saving move on one stage with a capacity-keeping helper move on another; cheapest feasible wins."""
    moves = [(s, cand[s]) for cand in savers for s in range(len(config)) if cand[s] != config[s]]
    pairs: dict[Config, float] = {}
    for s1, c1 in moves:
        for s2, c2 in helpers:
            if s1 == s2:
                continue
            pair = _with(_with(config, s1, c1), s2, c2)
            pair_cost = cost_per_hour(table, pair)
            if pair_cost < cost - 1e-12:
                pairs[pair] = pair_cost
    # Savers that cut a stage's capacity are what made the singles fail: their pairs go last.
    ranked = sorted(
        pairs.items(), key=lambda item: (not _keeps_capacity(table, config, item[0]), item[1], _tie_key(item[0]))
    )
    failed: list[tuple[Config, Estimate]] = []
    for pair, _ in ranked[:MAX_PAIR_TRIALS]:
        estimate = estimator.estimate(pair)
        if estimate.feasible:
            return pair, estimate
        failed.append((pair, estimate))
    best: tuple[Config, Estimate] | None = None
    limit = cost - 1e-12
    for pair, estimate in failed[:MAX_PAIR_REPAIRS]:
        if cost_per_hour(table, pair) >= limit:
            break
        repaired = _repair(model, table, estimator, load, pair, estimate, limit)
        if repaired is not None:
            best, limit = repaired, repaired[1].cost_per_hour - 1e-12
    return best


def _repair(
    model: PipelineModel,
    table: CostTable,
    estimator: Estimator,
    load: Load,
    config: Config,
    estimate: Estimate,
    limit: float,
) -> tuple[Config, Estimate] | None:
    """Add replicas until feasible, or None once the cost reaches `limit`.

    The first step tries one more replica on each stage (the cheapest feasible wins), because
    the stage that breaks the SLO is not always the one whose queueing causes it; later steps
    add to the stage where the simulation found the SLO broken, else the lowest-capacity one.
    """
    first: list[tuple[float, Config]] = []
    for s in range(model.size):
        cand = _with(config, s, replace(config[s], replicas=config[s].replicas + 1))
        cost = cost_per_hour(table, cand)
        if cost < limit:
            first.append((cost, cand))
    first.sort(key=lambda item: item[0])
    for _, cand in first:
        trial = estimator.estimate(cand)
        if trial.feasible:
            return cand, trial
    while True:
        if estimate.stopped_at is not None:
            s = model.names.index(estimate.stopped_at)
        else:
            capacity = [
                c.replicas * table[i].option(c.hardware).throughput_qps(c.max_batch_size) / load.visit_rates[i]
                for i, c in enumerate(config)
            ]
            s = int(np.argmin(capacity))
        config = _with(config, s, replace(config[s], replicas=config[s].replicas + 1))
        if cost_per_hour(table, config) >= limit:
            return None
        estimate = estimator.estimate(config)
        if estimate.feasible:
            return config, estimate


def _tie_key(config: Config) -> tuple[tuple[str, int, int], ...]:
    # Among equal costs prefer fewer replicas and smaller batches: deterministic and lower latency.
    return tuple((c.hardware, c.replicas, c.max_batch_size) for c in config)
