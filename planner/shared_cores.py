"""Prediction for replicas that share a machine's cores: all stages simulated at once.

The estimator gives every replica its own hardware unit, as the planner must (DESIGN.md). A local
deployment puts every replica on the same few cores, and when a burst keeps more replicas busy
than there are cores, compute-bound calls slow each other down (on a 2-core VM the cascade's large
model took 10-16 ms per call in bursts against 6-7 ms alone). Stages then no longer run
independently, so the stage-at-a-time kernel cannot express it; this kernel runs every stage's
queue in one event loop, with the same FIFO queues and greedy batching.

Sharing rule (a fluid processor-sharing model): a batch of n at a stage needs service(n) seconds
alone, a fraction share(n) of it on a core (the rest waits: I/O, sleeps). With the batches under
way demanding D = sum of their shares, each core is shared by max(1, D / cores) of them, and a
batch advances through its service at rate 1 / (1 + share * (max(1, D / cores) - 1)). Where
D never exceeds the cores, every rate is 1 and the result equals the estimator's.

A process beside the replicas on the same cores (the load generator, the router's own work) is a
single thread that every query passes through before it reaches the pipeline's first stages: it
does each query's CPU cost in arrival order, one query at a time, demanding one core while it
works, so a burst waits for it as for a stage with one replica. Several such processes are passed
in the order given (the load generator sends, then the router parses and dispatches). Part of that
work happens on the way back (the reply), which this puts in front; the queue it forms is the same
kind.

The rule is exact processor sharing when every share is 1; with mixed shares it is an
approximation (on one core, calls with shares 1 and 0.5 run at rates 2/3 and 0.8, using 1.07
cores between them).

Interference: calls computing side by side also slow each other below the cores' count, through
what the cores share (a hyperthread's sibling, caches, memory bandwidth, the hypervisor): on the
2-core bench VM the cascade's calls took 1.27 times as long with a second call under way and 1.5
with a third, where the rule alone has no slowdown until the cores are full. A stage's
interference g (a profile's, fitted to a live run by `inferline calibrate`) is what each core's
worth of other calls' demand adds to its calls: each core is shared by max(crowd, 1 + g * O) of
them, O the demand of the calls beside it. With g = 0 (the default) it is the rule above.

After-idle latency as in the estimator's kernel (`kernel.after_idle_s`): a batch goes to the
stage's replica that became idle last and takes the extra latency its idle gap adds, counted as
part of its service alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numba import njit
from numpy.typing import NDArray

from inferline.planner.estimator import Estimator
from inferline.planner.pipeline import Config, PipelineModel, time_outside_stages_s


def shared_core_latencies_s(
    estimator: Estimator, config: Config, cores: float, background_s: tuple[float, ...] = ()
) -> tuple[NDArray[np.float64], list[NDArray[np.float64]]]:
    """Like `Estimator.latencies_s`, with every replica of the pipeline sharing `cores` cores.

    `background_s`: per process beside the replicas on the same cores that each query passes through
    first (e.g. the load generator, the router's own work), the CPU seconds each query costs it.
    """
    run = shared_core_run(estimator, config, cores, background_s)
    return run.latencies_s(), run.completions()


def shared_core_run(
    estimator: Estimator, config: Config, cores: float, background_s: tuple[float, ...] = ()
) -> SharedRun:
    """The run behind `shared_core_latencies_s`, run to its end (for what else it tells: `SharedRun`)."""
    model, table = estimator.model, estimator.table
    options = [table[s].option(c.hardware) for s, c in enumerate(config)]
    run = start_shared(
        model,
        [o.service_s for o in options],
        [o.cpu_share for o in options],
        config,
        estimator.arrivals_s,
        estimator.visits,
        cores,
        background_s,
        [(o.idle_extra_s, o.idle_tau_s) for o in options],
        [o.interference for o in options],
    )
    advance_shared(run, np.inf)
    return run


@dataclass
class SharedRun:
    """One run of the shared-core kernel, resumable: `advance_shared` runs it up to a time, and
    between two calls replicas may be added or removed and batch caps changed (a tuner's ticks).

    Mutable state, changed in place by the kernel. Queries are kept in time order (`order` maps
    back to the caller's order).
    """

    order: NDArray[np.int64]
    arrivals: NDArray[np.float64]
    visits: NDArray[np.bool_]
    roots: NDArray[np.bool_]
    children: NDArray[np.int64]
    service: NDArray[np.float64]
    share: NDArray[np.float64]
    table_sizes: NDArray[np.int64]
    """Per stage, the batch sizes its service table covers (0 up to this, excluded)."""
    cores: float
    background_s: NDArray[np.float64]
    waiting: NDArray[np.int64]
    completion: NDArray[np.float64]
    admitted: NDArray[np.float64]
    """When each query passed the processes beside the replicas into its first stages' queues
    (its arrival where none costs anything; NaN until then)."""
    queue: NDArray[np.int64]
    head: NDArray[np.int64]
    tail: NDArray[np.int64]
    free: NDArray[np.int64]
    """Idle replicas per stage."""
    idle_since: NDArray[np.float64]
    """Per stage, when each of its `free` idle replicas became idle, the latest last (a stack)."""
    idle_extra: NDArray[np.float64]
    """Per stage, the after-idle extra latency and its time constant (`kernel.after_idle_s`)."""
    idle_tau: NDArray[np.float64]
    interference: NDArray[np.float64]
    """Per stage, its interference g (module doc)."""
    max_batch: NDArray[np.int64]
    pend_time: NDArray[np.float64]
    """Replicas still starting: when each is ready, and its stage (`pend_stage`); `counts[2]` of them."""
    pend_stage: NDArray[np.int64]
    act_stage: NDArray[np.int64]
    """Batches under way (`counts[0]` of them): stage, first queue slot, size, CPU share, projected
    finish, and whether its replica leaves once the batch is done (`act_retire`)."""
    act_first: NDArray[np.int64]
    act_size: NDArray[np.int64]
    act_share: NDArray[np.float64]
    act_finish: NDArray[np.float64]
    act_retire: NDArray[np.bool_]
    bg_finish: NDArray[np.float64]
    """Per process beside the replicas: when the work on the query at the head of its queue ends."""
    bg_queue: NDArray[np.int64]
    """Per process, the queries it has to work on (a FIFO between `bg_head` and `bg_tail`; busy
    while not empty)."""
    bg_head: NDArray[np.int64]
    bg_tail: NDArray[np.int64]
    clock: NDArray[np.float64]
    """The time of the last event and the cores' worth of demand then (of batches under way and
    processes beside them at work)."""
    counts: NDArray[np.int64]
    """Batches under way, queries arrived, replicas starting."""
    busy_s: NDArray[np.float64]
    """Per stage, since the start: service time (alone) of the batches dispatched, queries
    dispatched, batches dispatched, queries that joined its queue."""
    dispatched: NDArray[np.int64]
    batches: NDArray[np.int64]
    entered: NDArray[np.int64]

    def latencies_s(self) -> NDArray[np.float64]:
        """Each query's latency, in the caller's query order (a query visiting no stage: 0)."""
        done = np.maximum(self.completion.max(axis=0), self.arrivals)
        out = np.empty_like(self.arrivals)
        out[self.order] = done - self.arrivals
        return out

    def outside_s(self) -> NDArray[np.float64]:
        """Each query's latency outside every stage's queue and calls (`time_outside_stages_s`), in
        the caller's order: here, its way through the processes beside the replicas."""
        stages = self.children.shape[0]
        parents = tuple(tuple(p for p in range(stages) if s in self.children[p]) for s in range(stages))
        latencies = self.latencies_s()[self.order]  # back in the kernel's order
        inside_order = time_outside_stages_s(parents, self.visits, self.admitted, self.completion, latencies)
        out = np.empty_like(self.arrivals)
        out[self.order] = inside_order
        return out

    def completions(self) -> list[NDArray[np.float64]]:
        """Per stage, each query's completion there (-inf where not visited), in the caller's order."""
        out = np.empty_like(self.completion)
        out[:, self.order] = self.completion
        return [out[s] for s in range(out.shape[0])]

    def queued(self, stage: int) -> int:
        return int(self.tail[stage] - self.head[stage])

    def in_flight(self, stage: int, after_s: float) -> int:
        """Queries in the stage's batches under way that finish after `after_s`."""
        active = int(self.counts[0])
        mine = (self.act_stage[:active] == stage) & (self.act_finish[:active] > after_s)
        return int(self.act_size[:active][mine].sum())

    def drained(self) -> bool:
        return bool(
            self.counts[1] == self.arrivals.size
            and self.counts[0] == 0
            and np.all(self.tail == self.head)
            and np.all(self.bg_tail == self.bg_head)
        )

    def add_replicas(self, stage: int, count: int, ready_s: float) -> None:
        """`count` replicas for `stage`, serving from `ready_s`."""
        pending = int(self.counts[2])
        if pending + count > self.pend_time.size:
            grow = max(pending + count, 2 * self.pend_time.size)
            self.pend_time = np.resize(self.pend_time, grow)
            self.pend_stage = np.resize(self.pend_stage, grow)
        self.pend_time[pending : pending + count] = ready_s
        self.pend_stage[pending : pending + count] = stage
        self.counts[2] = pending + count
        slots = int(self.free.sum()) + int(self.counts[0]) + pending + count
        if slots > self.act_stage.size:  # room for every replica to run a batch at once
            grow = max(slots, 2 * self.act_stage.size)
            for name in ("act_stage", "act_first", "act_size", "act_share", "act_finish", "act_retire"):
                setattr(self, name, np.resize(getattr(self, name), grow))
        if slots > self.idle_since.shape[1]:  # and for every replica to be idle at once
            grow = max(slots, 2 * self.idle_since.shape[1])
            self.idle_since = np.pad(self.idle_since, ((0, 0), (0, grow - self.idle_since.shape[1])))

    def remove_replicas(self, stage: int, count: int) -> None:
        """`count` of the stage's replicas leave: those free soonest (idle ones, then busy ones by
        their batch's projected finish, whose batch still completes, then starting ones by ready time)."""
        active, pending = int(self.counts[0]), int(self.counts[2])
        candidates = [(-np.inf, "idle", 0)] * int(self.free[stage])
        candidates += [
            (float(self.act_finish[i]), "busy", i)
            for i in range(active)
            if self.act_stage[i] == stage and not self.act_retire[i]
        ]
        candidates += [(float(self.pend_time[k]), "starting", k) for k in range(pending) if self.pend_stage[k] == stage]
        leaving = sorted(candidates, key=lambda c: c[0])[:count]
        idle, gone_idle = int(self.free[stage]), sum(1 for _, kind, _ in leaving if kind == "idle")
        since = self.idle_since[stage]
        since[: idle - gone_idle] = since[gone_idle:idle].copy()  # the longest idle leave
        self.free[stage] = idle - gone_idle
        for _, kind, i in leaving:
            if kind == "busy":
                self.act_retire[i] = True
        gone = sorted((k for _, kind, k in leaving if kind == "starting"), reverse=True)
        for k in gone:  # from the back, so that moving the last entry into k keeps the rest valid
            last = int(self.counts[2]) - 1
            self.pend_time[k], self.pend_stage[k] = self.pend_time[last], self.pend_stage[last]
            self.counts[2] = last


def start_shared(
    model: PipelineModel,
    service_s: Sequence[NDArray[np.float64]],
    cpu_share: Sequence[NDArray[np.float64] | None],
    config: Config,
    arrivals_s: NDArray[np.float64],
    visits: NDArray[np.bool_],
    cores: float,
    background_s: tuple[float, ...] = (),
    after_idle: Sequence[tuple[float, float]] = (),
    interference: Sequence[float] = (),
) -> SharedRun:
    """A run of `config` over the arrivals (any order), every replica sharing `cores` cores.

    `service_s[s]` / `cpu_share[s]`: the stage's service time and CPU share per batch size (None:
    compute-bound), at least up to the largest batch cap the run will use. `visits` as sampled by
    `sample_visits`. `background_s` as in `shared_core_latencies_s`. `after_idle[s]`: the
    stage's after-idle (extra, time constant) in seconds (none given: no extra latency).
    `interference[s]`: the stage's interference g (module doc; none given: 0).
    """
    if not cores > 0:
        raise ValueError(f"cores must be positive, got {cores}")
    if any(not b >= 0 for b in background_s):
        raise ValueError(f"background CPU per query must be >= 0, got {background_s}")
    if any(not 0.0 <= g < math.inf for g in interference):
        raise ValueError(f"interference must be finite and >= 0, got {tuple(interference)}")
    if any(c.replicas < 1 for c in config):
        raise ValueError(f"every stage needs a replica, got {[c.replicas for c in config]}")
    widest = max(s.size for s in service_s)
    service = np.zeros((model.size, widest))
    share = np.ones((model.size, widest))
    for s in range(model.size):
        service[s, : service_s[s].size] = service_s[s]
        table = cpu_share[s]
        if table is not None:
            share[s, : table.size] = table
    children = np.full((model.size, max(1, model.size)), -1, dtype=np.int64)
    for s in range(model.size):
        for i, child in enumerate(model.children(s)):
            children[s, i] = child
    # The kernel takes arrivals in time order; a stable sort keeps ties in query order.
    order = np.argsort(arrivals_s, kind="mergesort").astype(np.int64)
    in_order = np.ascontiguousarray(visits[:, order])
    stages, n = in_order.shape
    slots = max(1, sum(c.replicas for c in config))
    workers = len(background_s)
    idle = list(after_idle) or [(0.0, 1.0)] * model.size
    return SharedRun(
        order=order,
        arrivals=np.ascontiguousarray(np.asarray(arrivals_s, dtype=np.float64)[order]),
        visits=in_order,
        roots=np.array([not model.parents[s] for s in range(model.size)], dtype=np.bool_),
        children=children,
        service=service,
        share=share,
        table_sizes=np.array([t.size for t in service_s], dtype=np.int64),
        cores=float(cores),
        background_s=np.asarray(background_s, dtype=np.float64).reshape(-1),
        waiting=_visited_parents(in_order, model.parents),
        completion=np.full((stages, n), -np.inf),
        admitted=np.full(n, np.nan),
        queue=np.empty((stages, n), dtype=np.int64),
        head=np.zeros(stages, dtype=np.int64),
        tail=np.zeros(stages, dtype=np.int64),
        free=np.array([c.replicas for c in config], dtype=np.int64),
        idle_since=np.zeros((stages, slots)),  # every replica idle from time 0, as the estimator's
        idle_extra=np.array([e for e, _ in idle], dtype=np.float64),
        idle_tau=np.array([tau for _, tau in idle], dtype=np.float64),
        interference=np.array(list(interference) or [0.0] * model.size, dtype=np.float64),
        max_batch=np.array([c.max_batch_size for c in config], dtype=np.int64),
        pend_time=np.zeros(4),
        pend_stage=np.zeros(4, dtype=np.int64),
        act_stage=np.empty(slots, dtype=np.int64),
        act_first=np.empty(slots, dtype=np.int64),
        act_size=np.empty(slots, dtype=np.int64),
        act_share=np.empty(slots),
        act_finish=np.empty(slots),
        act_retire=np.zeros(slots, dtype=np.bool_),
        bg_finish=np.zeros(workers),
        bg_queue=np.empty((workers, n), dtype=np.int64),
        bg_head=np.zeros(workers, dtype=np.int64),
        bg_tail=np.zeros(workers, dtype=np.int64),
        clock=np.array([0.0, 0.0]),
        counts=np.zeros(3, dtype=np.int64),
        busy_s=np.zeros(stages),
        dispatched=np.zeros(stages, dtype=np.int64),
        batches=np.zeros(stages, dtype=np.int64),
        entered=np.zeros(stages, dtype=np.int64),
    )


def advance_shared(run: SharedRun, horizon_s: float) -> bool:
    """Run every event before `horizon_s` (all of them: inf); True once every query is done."""
    beyond = np.flatnonzero(run.max_batch >= run.table_sizes)
    if beyond.size:
        s = int(beyond[0])
        raise ValueError(
            f"stage {s}'s batch cap {int(run.max_batch[s])} exceeds its service table (up to {run.table_sizes[s] - 1})"
        )
    finished = _advance(
        run.arrivals, run.order, run.visits, run.roots, run.children,
        run.service, run.share, run.cores, run.background_s, run.waiting, run.completion, run.admitted, run.queue,
        run.head, run.tail, run.free, run.idle_since, run.idle_extra, run.idle_tau, run.interference, run.max_batch,
        run.pend_time,
        run.pend_stage, run.act_stage,
        run.act_first, run.act_size, run.act_share, run.act_finish, run.act_retire,
        run.bg_finish, run.bg_queue, run.bg_head, run.bg_tail, run.clock, run.counts, run.busy_s, run.dispatched,
        run.batches, run.entered,
        float(horizon_s),
    )  # fmt: skip
    return bool(finished)


def _visited_parents(visits: NDArray[np.bool_], parents: tuple[tuple[int, ...], ...]) -> NDArray[np.int64]:
    """Per stage and query, how many visited parents must finish before the query joins the queue."""
    waiting = np.zeros(visits.shape, dtype=np.int64)
    for s, ps in enumerate(parents):
        for p in ps:
            waiting[s] += visits[p]
    return np.where(visits, waiting, 0)


@njit(cache=True, nogil=True)
def slowdown(share: float, crowd: float) -> float:
    """How much longer a call with this CPU share takes when each core is shared by `crowd` calls."""
    return 1.0 + share * (crowd - 1.0)


@njit(cache=True, nogil=True)
def crowd_of(demand: float, cores: float) -> float:
    """Calls per core, max(1, demand / cores); a demand equal to the cores up to rounding is no crowd."""
    if demand <= cores * (1.0 + 1e-12):
        return 1.0
    return demand / cores


@njit(cache=True, nogil=True)
def call_slowdown(share: float, interference: float, demand: float, cores: float) -> float:
    """How much longer a call with this CPU share and interference takes while the calls under way
    (itself included) and the processes at work beside them demand `demand` cores (module doc)."""
    crowd = max(crowd_of(demand, cores), 1.0 + interference * (demand - share))
    return slowdown(share, crowd)


@njit(cache=True, nogil=True)
def _pass_through(
    q: int,
    first: int,
    t: float,
    crowd: float,
    background_s: NDArray[np.float64],
    bg_queue: NDArray[np.int64],
    bg_head: NDArray[np.int64],
    bg_tail: NDArray[np.int64],
    bg_finish: NDArray[np.float64],
    roots: NDArray[np.bool_],
    visits: NDArray[np.bool_],
    queue: NDArray[np.int64],
    tail: NDArray[np.int64],
    entered: NDArray[np.int64],
    admitted: NDArray[np.float64],
) -> None:
    """Query q, at time t, goes on to the processes beside the replicas from `first` (one that
    costs nothing is passed at once), and once past them all into the first stages' queues."""
    for j in range(first, background_s.shape[0]):
        if background_s[j] <= 0.0:
            continue
        if bg_tail[j] == bg_head[j]:  # idle until now: it starts on q at once
            bg_finish[j] = t + background_s[j] * crowd
        bg_queue[j, bg_tail[j]] = q
        bg_tail[j] += 1
        return
    admitted[q] = t
    for s in range(roots.shape[0]):
        if roots[s] and visits[s, q]:
            queue[s, tail[s]] = q
            tail[s] += 1
            entered[s] += 1


@njit(cache=True, nogil=True)
def _advance(
    arrivals: NDArray[np.float64],
    rank: NDArray[np.int64],
    visits: NDArray[np.bool_],
    roots: NDArray[np.bool_],
    children: NDArray[np.int64],
    service: NDArray[np.float64],
    share: NDArray[np.float64],
    cores: float,
    background_s: NDArray[np.float64],
    waiting: NDArray[np.int64],
    completion: NDArray[np.float64],
    admitted: NDArray[np.float64],
    queue: NDArray[np.int64],
    head: NDArray[np.int64],
    tail: NDArray[np.int64],
    free: NDArray[np.int64],
    idle_since: NDArray[np.float64],
    idle_extra: NDArray[np.float64],
    idle_tau: NDArray[np.float64],
    interference: NDArray[np.float64],
    max_batch: NDArray[np.int64],
    pend_time: NDArray[np.float64],
    pend_stage: NDArray[np.int64],
    act_stage: NDArray[np.int64],
    act_first: NDArray[np.int64],
    act_size: NDArray[np.int64],
    act_share: NDArray[np.float64],
    act_finish: NDArray[np.float64],
    act_retire: NDArray[np.bool_],
    bg_finish: NDArray[np.float64],
    bg_queue: NDArray[np.int64],
    bg_head: NDArray[np.int64],
    bg_tail: NDArray[np.int64],
    clock: NDArray[np.float64],
    counts: NDArray[np.int64],
    busy_s: NDArray[np.float64],
    dispatched: NDArray[np.int64],
    batches: NDArray[np.int64],
    entered: NDArray[np.int64],
    horizon: float,
) -> bool:
    """Run the events before `horizon` (arrivals sorted); the state is `SharedRun`'s, changed in place.

    `rank[q]`: query q's index before the sort, which orders queries ready at the same instant.
    `background_s[j]`: CPU seconds that each query costs process j beside the replicas (a
    single-threaded process on the same cores, which the query passes through before the first
    stages, in the order of j): it works on one query at a time, in arrival order, demanding one
    core, and shares the cores like a batch.

    Each stage's queue is an array of query ids in the order they became ready; a batch is a
    slice of it, so a batch is (stage, first, size). A batch's projected finish is kept as an
    absolute time and rescaled only when the cores' sharing changes, so that without sharing
    every finish is exactly start + service, as in the estimator's kernel.
    """
    stages, n = visits.shape
    workers = background_s.shape[0]
    t, demand = clock[0], clock[1]
    crowd = crowd_of(demand, cores)
    interfering = False
    for s in range(stages):
        if interference[s] > 0.0:
            interfering = True
    active, arrived, pending = counts[0], counts[1], counts[2]
    finished = False
    mark = np.empty(stages, dtype=np.int64)
    while True:
        # Dispatch: every free replica takes what its queue holds, up to its batch cap. New
        # batches hold their service time alone until the crowd they start in is known.
        running = active
        for s in range(stages):
            while free[s] > 0 and tail[s] > head[s]:
                size = min(tail[s] - head[s], max_batch[s])
                act_stage[active] = s
                act_first[active] = head[s]
                act_size[active] = size
                act_share[active] = share[s, size]
                free[s] -= 1  # the replica idle the shortest: the top of the stack
                woken = 0.0  # kernel.after_idle_s, inlined: numba's cache tracks only this file's changes
                if idle_extra[s] > 0.0 and t > idle_since[s, free[s]]:
                    woken = idle_extra[s] * (1.0 - math.exp(-(t - idle_since[s, free[s]]) / idle_tau[s]))
                act_finish[active] = service[s, size] + woken
                act_retire[active] = False
                active += 1
                head[s] += size
                busy_s[s] += service[s, size]
                dispatched[s] += size
                batches[s] += 1
        # Summed afresh at every event: adding and removing fractional shares would drift.
        new_demand = 0.0
        for i in range(active):
            new_demand += act_share[i]
        for j in range(workers):
            if bg_tail[j] > bg_head[j]:
                new_demand += 1.0
        new_crowd = crowd_of(new_demand, cores)
        # Without interference only the crowd slows calls: most events leave every finish alone.
        if new_demand != demand and (interfering or new_crowd != crowd):
            for i in range(running):
                g = interference[act_stage[i]]
                before = call_slowdown(act_share[i], g, demand, cores)
                after = call_slowdown(act_share[i], g, new_demand, cores)
                if after != before:  # unchanged, a finish stays exactly start + service
                    act_finish[i] = t + (act_finish[i] - t) / before * after  # work left, in seconds alone
            if new_crowd != crowd:
                for j in range(workers):
                    if bg_tail[j] > bg_head[j]:
                        bg_finish[j] = t + (bg_finish[j] - t) / crowd * new_crowd
        demand, crowd = new_demand, new_crowd
        for i in range(running, active):
            act_finish[i] = t + act_finish[i] * call_slowdown(act_share[i], interference[act_stage[i]], demand, cores)
        if active == 0 and arrived == n:
            queued = False
            for s in range(stages):
                if tail[s] > head[s]:
                    queued = True
            for j in range(workers):
                if bg_tail[j] > bg_head[j]:
                    queued = True
            if not queued:
                finished = True
                break
        t_next = np.inf
        for i in range(active):
            if act_finish[i] < t_next:
                t_next = act_finish[i]
        for j in range(workers):
            if bg_tail[j] > bg_head[j] and bg_finish[j] < t_next:
                t_next = bg_finish[j]
        for k in range(pending):
            if pend_time[k] < t_next:
                t_next = pend_time[k]
        if arrived < n and arrivals[arrived] < t_next:
            t_next = arrivals[arrived]
        if t_next >= horizon or t_next == np.inf:
            break
        t = t_next
        # Every event at t happens before the next dispatch, so a batch formed at t holds every
        # query ready at t, as in the estimator.
        for s in range(stages):
            mark[s] = tail[s]
        i = 0
        while i < active:
            if act_finish[i] > t:
                i += 1
                continue
            s = act_stage[i]
            for m in range(act_first[i], act_first[i] + act_size[i]):
                q = queue[s, m]
                completion[s, q] = t
                for k in range(children.shape[1]):
                    c = children[s, k]
                    if c < 0:
                        break
                    if visits[c, q]:
                        waiting[c, q] -= 1
                        if waiting[c, q] == 0:
                            queue[c, tail[c]] = q
                            tail[c] += 1
                            entered[c] += 1
            if not act_retire[i]:
                idle_since[s, free[s]] = t
                free[s] += 1
            active -= 1
            act_stage[i] = act_stage[active]
            act_first[i] = act_first[active]
            act_size[i] = act_size[active]
            act_share[i] = act_share[active]
            act_finish[i] = act_finish[active]
            act_retire[i] = act_retire[active]
        k = 0
        while k < pending:  # replicas done starting
            if pend_time[k] <= t:
                idle_since[pend_stage[k], free[pend_stage[k]]] = pend_time[k]
                free[pend_stage[k]] += 1
                pending -= 1
                pend_time[k] = pend_time[pending]
                pend_stage[k] = pend_stage[pending]
            else:
                k += 1
        for j in range(workers):  # in order: a query done by one process may start in the next at once
            if bg_tail[j] > bg_head[j] and bg_finish[j] <= t:
                q = bg_queue[j, bg_head[j]]
                bg_head[j] += 1
                if bg_tail[j] > bg_head[j]:
                    bg_finish[j] = t + background_s[j] * crowd
                _pass_through(q, j + 1, t, crowd, background_s, bg_queue, bg_head, bg_tail, bg_finish,
                              roots, visits, queue, tail, entered, admitted)  # fmt: skip
        for s in range(stages):
            if tail[s] - mark[s] > 1:  # ready at the same instant: in query order, as the estimator
                ready = queue[s, mark[s] : tail[s]].copy()
                queue[s, mark[s] : tail[s]] = ready[np.argsort(rank[ready], kind="mergesort")]
        while arrived < n and arrivals[arrived] <= t:
            _pass_through(arrived, 0, t, crowd, background_s, bg_queue, bg_head, bg_tail, bg_finish,
                          roots, visits, queue, tail, entered, admitted)  # fmt: skip
            arrived += 1
    clock[0], clock[1] = t, demand
    counts[0], counts[1], counts[2] = active, arrived, pending
    return finished
