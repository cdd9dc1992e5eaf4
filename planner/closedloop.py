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
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from inferline.planner.costtable import CostTable
from inferline.planner.estimator import p99
from inferline.planner.kernel import advance_stage
from inferline.planner.pipeline import Config, PipelineModel, sample_visits
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

    @property
    def p99_s(self) -> float:
        return p99(self.latencies_s)

    @property
    def slo_miss_rate(self) -> float:
        return float(np.count_nonzero(self.latencies_s > self.slo_s)) / self.latencies_s.size

    @property
    def cost_per_hour(self) -> float:
        return self.cost / self.duration_s * 3600.0 if self.duration_s > 0 else 0.0


@dataclass
class _Stage:
    """Mutable per-stage state of one run (private to the loop)."""

    service_s: NDArray[np.float64]
    max_batch: int
    price_per_hour: float
    heap: NDArray[np.float64]
    provisioned: int
    pend_t: NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    pend_q: NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    in_flight: NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    ready_at: list[float] = field(default_factory=list)
    """When each provisioned replica is (or was) ready to serve."""
    batch_sum: float = 0.0
    batch_count: int = 0


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
) -> RunResult:
    arrivals = np.ascontiguousarray(arrivals_s, dtype=np.float64)
    n = arrivals.size
    visits = sample_visits(model, n, np.random.default_rng(seed))
    stages = [
        _Stage(
            service_s=table[s].option(c.hardware).service_s,
            max_batch=c.max_batch_size,
            price_per_hour=table[s].option(c.hardware).price_per_hour,
            heap=np.zeros(c.replicas),
            provisioned=c.replicas,
            ready_at=[0.0] * c.replicas,
        )
        for s, c in enumerate(config)
    ]
    children = [model.children(s) for s in range(model.size)]
    # A query reaches a stage once all of its visited parents are done (a join).
    waiting = [np.sum([visits[p] for p in model.parents[s]], axis=0).astype(np.int64) for s in range(model.size)]
    stage_arrival = np.full((model.size, n), -np.inf)
    completion = np.full((model.size, n), -np.inf)
    entry = [s for s in range(model.size) if not model.parents[s]]
    state = policy.initial_state() if policy is not None else None
    planned = [c.replicas for c in config]
    mu = [table[s].option(c.hardware).throughput_qps(c.max_batch_size) for s, c in enumerate(config)]
    visit_rates = model.visit_rates()

    decisions: list[TimedDecision] = []
    tick_times: list[float] = []
    replica_rows: list[list[int]] = []
    cost = 0.0
    fed = 0  # pipeline arrivals handed to entry stages so far
    now = 0.0
    end_of_trace = float(arrivals[-1]) if n else 0.0
    while True:
        horizon = now + tick_s
        upto = int(np.searchsorted(arrivals, horizon, side="left"))
        for s in entry:
            q = np.flatnonzero(visits[s, fed:upto]) + fed
            _enqueue(stages[s], arrivals[q], q)
        statuses = []
        for s in range(model.size):
            st = stages[s]
            arrived = int(np.count_nonzero((st.pend_t >= now) & (st.pend_t < horizon)))
            comp = np.empty(st.pend_t.size)
            sizes = np.empty(st.pend_t.size, dtype=np.int64)
            done = advance_stage(st.pend_t, 0, st.heap, st.service_s, st.max_batch, horizon, comp, sizes)
            q = st.pend_q[:done]
            comp, sizes = comp[:done], sizes[:done]
            completion[s, q] = comp
            busy = float(np.sum(st.service_s[sizes] / sizes)) if done else 0.0
            st.batch_sum += float(np.sum(1.0 / sizes)) if done else 0.0
            st.batch_count += done
            st.pend_t, st.pend_q = st.pend_t[done:], st.pend_q[done:]
            st.in_flight = np.concatenate([st.in_flight[st.in_flight > horizon], comp[comp > horizon]])
            for c in children[s]:
                reach = q[visits[c, q]]
                if reach.size == 0:
                    continue
                stage_arrival[c, reach] = np.maximum(stage_arrival[c, reach], completion[s, reach])
                waiting[c][reach] -= 1
                ready = reach[waiting[c][reach] == 0]
                _enqueue(stages[c], stage_arrival[c, ready], ready)
            ready_replicas = max(1, sum(1 for t in st.ready_at if t <= horizon))
            statuses.append(
                StageStatus(
                    name=model.names[s],
                    replicas=st.provisioned,
                    ready_replicas=ready_replicas,
                    queue_length=int(np.count_nonzero(st.pend_t < horizon)),
                    in_flight=int(st.in_flight.size),
                    busy_fraction=min(1.0, busy / (ready_replicas * tick_s)),
                    arrivals=arrived,
                    planned_replicas=planned[s],
                    throughput_qps=mu[s],
                    visit_rate=float(visit_rates[s]),
                )
            )
        fed = upto
        cost += sum(st.price_per_hour * st.provisioned for st in stages) * tick_s / 3600.0
        tick_times.append(horizon)
        replica_rows.append([st.provisioned for st in stages])
        drained = fed >= n and all(st.pend_t.size == 0 and st.in_flight.size == 0 for st in stages)
        if drained:
            break
        if policy is not None and horizon <= end_of_trace + tick_s:
            lo = int(np.searchsorted(arrivals, horizon - LOOKBACK_S, side="left"))
            prev = int(np.searchsorted(arrivals, now, side="left"))
            ctx = TunerContext(horizon, tick_s, tuple(statuses), arrivals[lo:upto], upto - max(prev, lo))
            changes, state = policy.decide(ctx, state)
            for d in changes:
                s = model.names.index(d.stage)
                if d.max_batch_size is not None:
                    stages[s].max_batch = d.max_batch_size
                if d.replicas != stages[s].provisioned:
                    _resize(stages[s], d.replicas, horizon, startup_s)
                decisions.append(TimedDecision(horizon, d))
        now = horizon
    latencies = np.maximum(completion.max(axis=0), arrivals) - arrivals  # no stage visited: latency 0
    duration = max(now + tick_s, end_of_trace)
    return RunResult(
        arrivals_s=arrivals,
        latencies_s=latencies,
        slo_s=slo_s,
        cost=cost,
        duration_s=duration,
        decisions=tuple(decisions),
        tick_times_s=np.array(tick_times),
        replicas={name: np.array([row[s] for row in replica_rows]) for s, name in enumerate(model.names)},
        mean_batch={
            name: (st.batch_count / st.batch_sum if st.batch_sum > 0 else math.nan)
            for name, st in zip(model.names, stages, strict=True)
        },
    )


def _enqueue(st: _Stage, times: NDArray[np.float64], queries: NDArray[np.int64]) -> None:
    if times.size == 0:
        return
    t = np.concatenate([st.pend_t, times])
    q = np.concatenate([st.pend_q, queries])
    order = np.lexsort((q, t))  # FIFO by arrival time, ties by query index
    st.pend_t, st.pend_q = np.ascontiguousarray(t[order]), np.ascontiguousarray(q[order])


def _resize(st: _Stage, replicas: int, now: float, startup_s: float) -> None:
    replicas = max(1, replicas)
    heap = np.sort(st.heap)
    if replicas > st.provisioned:
        heap = np.concatenate([heap, np.full(replicas - st.provisioned, now + startup_s)])
        st.ready_at = st.ready_at + [now + startup_s] * (replicas - st.provisioned)
    else:
        heap = _drop_idle_first(heap, st.provisioned - replicas)
        st.ready_at = sorted(st.ready_at)[:replicas]  # replicas still starting are cancelled first
    st.heap = np.sort(heap)
    st.provisioned = replicas


def _drop_idle_first(heap: NDArray[np.float64], count: int) -> NDArray[np.float64]:
    # The sorted heap's first entries free soonest (idle ones first): those replicas go; a
    # removed replica's running batch keeps its recorded completion time.
    return heap[count:]
