"""Closed-loop simulation: a provisioned pipeline over a trace, with a tuner policy scaling replicas.

The same compiled kernel as the estimator (`kernel.advance_stage`) runs each stage up to the
end of each control tick, in topological order. That is exact, not an approximation: every
arrival before the tick's end is known once the parents have run to it, and a dispatch before
the tick's end takes only such arrivals. So with no policy the result equals the estimator's
query for query (tested). Between ticks the policy sees each stage's status and may change
replica counts: an added replica serves after `startup_s`; a removed one leaves at once, and
the batch it was running still completes (removed replicas are the idle ones first). A new batch
size (a scale-ladder step) takes effect at once: deployments configure their servers for every
batch size of the plan's ladder up front, so a step only changes the router's cap.

Cost is integrated over time over provisioned replicas (starting ones included).

With `cores`, every replica shares that many cores instead (a local deployment): the shared-core
kernel (`shared_cores.py`) runs all stages in one event loop up to each tick's end, and the same
changes apply between ticks. With more cores than batches can be under way it is the run above,
query for query (tested).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from inferline.planner.costtable import CostTable, HardwareOption
from inferline.planner.estimator import p99
from inferline.planner.kernel import advance_stage
from inferline.planner.pipeline import Config, PipelineModel, query_visits, time_outside_stages_s
from inferline.planner.shared_cores import advance_shared, start_shared
from inferline.planner.tuning.context import Decision, StageStatus, TunerContext

LOOKBACK_S = 60.0


class Policy(Protocol):
    name: str

    def initial_state(self) -> Any: ...

    def decide(self, ctx: TunerContext, state: Any) -> tuple[list[Decision], Any]: ...


@dataclass(frozen=True)
class TimedDecision:
    time_s: float
    decision: Decision


@dataclass(frozen=True)
class RunResult:
    arrivals_s: NDArray[np.float64]
    latencies_s: NDArray[np.float64]
    slo_s: float
    cost: float
    duration_s: float
    decisions: tuple[TimedDecision, ...]
    tick_times_s: NDArray[np.float64]
    replicas: dict[str, NDArray[np.int64]]
    """Provisioned replicas per stage at each tick time."""
    mean_batch: dict[str, float]
    outside_s: NDArray[np.float64]
    """Each query's latency outside every stage's queue and calls (`time_outside_stages_s`: its way
    through the processes beside replicas that share cores; nothing else where a query's branches
    do not run side by side)."""

    @property
    def p99_s(self) -> float:
        return p99(self.latencies_s)

    @property
    def slo_miss_rate(self) -> float:
        return float(np.count_nonzero(self.latencies_s > self.slo_s)) / self.latencies_s.size

    @property
    def cost_per_hour(self) -> float:
        return self.cost / self.duration_s * 3600.0 if self.duration_s > 0 else 0.0


@dataclass(frozen=True)
class _Tally:
    """What one stage did in one tick, for the policy's view of it."""

    queue_length: int
    in_flight: int
    busy_s: float
    """Service time (alone) of the batches dispatched in the tick."""
    arrivals: int


class _Engine(Protocol):
    """Runs the queues tick by tick: one replica per hardware unit, or every replica sharing cores."""

    def advance(self, now: float, horizon: float) -> list[_Tally]: ...

    def resize(self, stage: int, old: int, new: int, now: float, startup_s: float) -> None: ...

    def set_batch(self, stage: int, max_batch: int) -> None: ...

    def drained(self) -> bool: ...

    def latencies_s(self) -> NDArray[np.float64]: ...

    def outside_s(self) -> NDArray[np.float64]: ...

    def mean_batch(self, stage: int) -> float: ...


def simulate_run(
    model: PipelineModel,
    table: CostTable,
    config: Config,
    arrivals_s: NDArray[np.float64],
    slo_s: float,
    policy: Policy | None = None,
    tick_s: float = 0.25,
    startup_s: float = 5.0,
    seed: int = 0,
    cores: float | None = None,
    background_s: tuple[float, ...] = (),
    visits: NDArray[np.bool_] | None = None,
) -> RunResult:
    """The run of `config` over the (sorted) arrivals with `policy` deciding every `tick_s`.

    With `cores`, every replica shares that many cores (`planner/shared_cores.py`), beside
    processes costing `background_s` CPU seconds per query; else each has its own hardware unit.
    Conditional edges are sampled with `seed`, or given by `visits` (as `Estimator` takes them).
    """
    arrivals = np.ascontiguousarray(arrivals_s, dtype=np.float64)
    n = arrivals.size
    visits = query_visits(model, n, seed, visits)
    options = [table[s].option(c.hardware) for s, c in enumerate(config)]
    engine: _Engine = (
        _SharedEngine(model, options, config, arrivals, visits, cores, background_s)
        if cores is not None
        else _StageEngine(model, options, config, arrivals, visits)
    )
    provisioned = [c.replicas for c in config]
    ready_at = [[0.0] * c.replicas for c in config]
    """When each provisioned replica is (or was) ready to serve."""
    state = policy.initial_state() if policy is not None else None
    planned = [c.replicas for c in config]
    mu = [o.throughput_qps(c.max_batch_size) for o, c in zip(options, config, strict=True)]
    visit_rates = model.visit_rates()

    decisions: list[TimedDecision] = []
    tick_times: list[float] = []
    replica_rows: list[list[int]] = []
    cost = 0.0
    now = 0.0
    end_of_trace = float(arrivals[-1]) if n else 0.0
    while True:
        horizon = now + tick_s
        upto = int(np.searchsorted(arrivals, horizon, side="left"))
        tallies = engine.advance(now, horizon)
        statuses = []
        for s, tally in enumerate(tallies):
            ready_replicas = max(1, sum(1 for t in ready_at[s] if t <= horizon))
            statuses.append(
                StageStatus(
                    name=model.names[s],
                    replicas=provisioned[s],
                    ready_replicas=ready_replicas,
                    queue_length=tally.queue_length,
                    in_flight=tally.in_flight,
                    busy_fraction=min(1.0, tally.busy_s / (ready_replicas * tick_s)),
                    arrivals=tally.arrivals,
                    planned_replicas=planned[s],
                    throughput_qps=mu[s],
                    visit_rate=float(visit_rates[s]),
                )
            )
        cost += sum(o.price_per_hour * r for o, r in zip(options, provisioned, strict=True)) * tick_s / 3600.0
        tick_times.append(horizon)
        replica_rows.append(list(provisioned))
        if upto >= n and engine.drained():
            break
        if policy is not None and horizon <= end_of_trace + tick_s:
            lo = int(np.searchsorted(arrivals, horizon - LOOKBACK_S, side="left"))
            prev = int(np.searchsorted(arrivals, now, side="left"))
            ctx = TunerContext(horizon, tick_s, tuple(statuses), arrivals[lo:upto], upto - max(prev, lo))
            changes, state = policy.decide(ctx, state)
            for d in changes:
                s = model.names.index(d.stage)
                if d.max_batch_size is not None:
                    engine.set_batch(s, d.max_batch_size)
                replicas = max(1, d.replicas)
                if replicas != provisioned[s]:
                    engine.resize(s, provisioned[s], replicas, horizon, startup_s)
                    if replicas > provisioned[s]:
                        ready_at[s] = ready_at[s] + [horizon + startup_s] * (replicas - provisioned[s])
                    else:
                        ready_at[s] = sorted(ready_at[s])[:replicas]  # replicas still starting are cancelled first
                    provisioned[s] = replicas
                decisions.append(TimedDecision(horizon, d))
        now = horizon
    duration = max(now + tick_s, end_of_trace)
    return RunResult(
        arrivals_s=arrivals,
        latencies_s=engine.latencies_s(),
        slo_s=slo_s,
        cost=cost,
        duration_s=duration,
        decisions=tuple(decisions),
        tick_times_s=np.array(tick_times),
        replicas={name: np.array([row[s] for row in replica_rows]) for s, name in enumerate(model.names)},
        mean_batch={name: engine.mean_batch(s) for s, name in enumerate(model.names)},
        outside_s=engine.outside_s(),
    )


@dataclass
class _Stage:
    """Mutable per-stage state of a one-unit-per-replica run (private to `_StageEngine`)."""

    service_s: NDArray[np.float64]
    max_batch: int
    heap: NDArray[np.float64]
    idle_extra_s: float
    idle_tau_s: float
    pend_t: NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    pend_q: NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    in_flight: NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    batch_sum: float = 0.0
    batch_count: int = 0


class _StageEngine:
    """The estimator's kernel (`kernel.advance_stage`) on each stage up to each tick's end, in
    topological order: exact, as the module doc says."""

    def __init__(
        self,
        model: PipelineModel,
        options: list[HardwareOption],
        config: Config,
        arrivals: NDArray[np.float64],
        visits: NDArray[np.bool_],
    ) -> None:
        n = arrivals.size
        self.arrivals, self.visits = arrivals, visits
        self.stages = [
            _Stage(o.service_s, c.max_batch_size, np.zeros(c.replicas), o.idle_extra_s, o.idle_tau_s)
            for o, c in zip(options, config, strict=True)
        ]
        self.children = [model.children(s) for s in range(model.size)]
        self.parents = model.parents
        # A query reaches a stage once all of its visited parents are done (a join).
        self.waiting = [
            np.sum([visits[p] for p in model.parents[s]], axis=0).astype(np.int64) for s in range(model.size)
        ]
        self.stage_arrival = np.full((model.size, n), -np.inf)
        self.completion = np.full((model.size, n), -np.inf)
        self.entry = [s for s in range(model.size) if not model.parents[s]]
        self.fed = 0  # pipeline arrivals handed to entry stages so far

    def advance(self, now: float, horizon: float) -> list[_Tally]:
        upto = int(np.searchsorted(self.arrivals, horizon, side="left"))
        for s in self.entry:
            q = np.flatnonzero(self.visits[s, self.fed : upto]) + self.fed
            _enqueue(self.stages[s], self.arrivals[q], q)
        self.fed = upto
        tallies = []
        for s, st in enumerate(self.stages):
            arrived = int(np.count_nonzero((st.pend_t >= now) & (st.pend_t < horizon)))
            comp = np.empty(st.pend_t.size)
            sizes = np.empty(st.pend_t.size, dtype=np.int64)
            done = advance_stage(
                st.pend_t, 0, st.heap, st.service_s, st.max_batch, horizon, comp, sizes, st.idle_extra_s, st.idle_tau_s
            )
            q = st.pend_q[:done]
            comp, sizes = comp[:done], sizes[:done]
            self.completion[s, q] = comp
            busy = float(np.sum(st.service_s[sizes] / sizes)) if done else 0.0
            st.batch_sum += float(np.sum(1.0 / sizes)) if done else 0.0
            st.batch_count += done
            st.pend_t, st.pend_q = st.pend_t[done:], st.pend_q[done:]
            st.in_flight = np.concatenate([st.in_flight[st.in_flight > horizon], comp[comp > horizon]])
            for c in self.children[s]:
                reach = q[self.visits[c, q]]
                if reach.size == 0:
                    continue
                self.stage_arrival[c, reach] = np.maximum(self.stage_arrival[c, reach], self.completion[s, reach])
                self.waiting[c][reach] -= 1
                ready = reach[self.waiting[c][reach] == 0]
                _enqueue(self.stages[c], self.stage_arrival[c, ready], ready)
            queued = int(np.count_nonzero(st.pend_t < horizon))
            tallies.append(_Tally(queued, int(st.in_flight.size), busy, arrived))
        return tallies

    def resize(self, stage: int, old: int, new: int, now: float, startup_s: float) -> None:
        st = self.stages[stage]
        heap = np.sort(st.heap)
        # Removing: the sorted heap's first entries free soonest (idle ones first), so those
        # replicas go; a removed replica's running batch keeps its recorded completion time.
        heap = np.concatenate([heap, np.full(new - old, now + startup_s)]) if new > old else heap[old - new :]
        st.heap = np.sort(heap)

    def set_batch(self, stage: int, max_batch: int) -> None:
        self.stages[stage].max_batch = max_batch

    def drained(self) -> bool:
        idle = all(st.pend_t.size == 0 and st.in_flight.size == 0 for st in self.stages)
        return self.fed >= self.arrivals.size and idle

    def latencies_s(self) -> NDArray[np.float64]:
        return np.maximum(self.completion.max(axis=0), self.arrivals) - self.arrivals  # no stage visited: 0

    def outside_s(self) -> NDArray[np.float64]:
        return time_outside_stages_s(self.parents, self.visits, self.arrivals, self.completion, self.latencies_s())

    def mean_batch(self, stage: int) -> float:
        st = self.stages[stage]
        return st.batch_count / st.batch_sum if st.batch_sum > 0 else math.nan


def _enqueue(st: _Stage, times: NDArray[np.float64], queries: NDArray[np.int64]) -> None:
    if times.size == 0:
        return
    t = np.concatenate([st.pend_t, times])
    q = np.concatenate([st.pend_q, queries])
    order = np.lexsort((q, t))  # FIFO by arrival time, ties by query index
    st.pend_t, st.pend_q = np.ascontiguousarray(t[order]), np.ascontiguousarray(q[order])


class _SharedEngine:
    """Every stage in the shared-core kernel's one event loop, run up to each tick's end."""

    def __init__(
        self,
        model: PipelineModel,
        options: list[HardwareOption],
        config: Config,
        arrivals: NDArray[np.float64],
        visits: NDArray[np.bool_],
        cores: float,
        background_s: tuple[float, ...],
    ) -> None:
        service = [o.service_s for o in options]
        shares = [o.cpu_share for o in options]
        idle = [(o.idle_extra_s, o.idle_tau_s) for o in options]
        interference = [o.interference for o in options]
        self.run = start_shared(
            model, service, shares, config, arrivals, visits, cores, background_s, idle, interference
        )
        self.size = model.size

    def advance(self, now: float, horizon: float) -> list[_Tally]:
        run = self.run
        busy, entered = run.busy_s.copy(), run.entered.copy()
        advance_shared(run, horizon)
        busy, entered = run.busy_s - busy, run.entered - entered
        return [
            _Tally(run.queued(s), run.in_flight(s, horizon), float(busy[s]), int(entered[s])) for s in range(self.size)
        ]

    def resize(self, stage: int, old: int, new: int, now: float, startup_s: float) -> None:
        if new > old:
            self.run.add_replicas(stage, new - old, now + startup_s)
        else:
            self.run.remove_replicas(stage, old - new)

    def set_batch(self, stage: int, max_batch: int) -> None:
        self.run.max_batch[stage] = max_batch

    def drained(self) -> bool:
        return self.run.drained()

    def latencies_s(self) -> NDArray[np.float64]:
        return self.run.latencies_s()

    def outside_s(self) -> NDArray[np.float64]:
        return self.run.outside_s()

    def mean_batch(self, stage: int) -> float:
        batches = int(self.run.batches[stage])
        return int(self.run.dispatched[stage]) / batches if batches else math.nan
