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

A process beside the replicas on the same cores (a load generator) is a single thread that gets
each query's CPU cost at the query's arrival and, while it has work left, demands one core.

The rule is exact processor sharing when every share is 1; with mixed shares it is an
approximation (on one core, calls with shares 1 and 0.5 run at rates 2/3 and 0.8, using 1.07
cores between them).
"""

from __future__ import annotations

import numpy as np
from numba import njit
from numpy.typing import NDArray

from inferline.planner.estimator import Estimator
from inferline.planner.pipeline import Config


def shared_core_latencies_s(
    estimator: Estimator, config: Config, cores: float, background_s: tuple[float, ...] = ()
) -> tuple[NDArray[np.float64], list[NDArray[np.float64]]]:
    """Like `Estimator.latencies_s`, with every replica of the pipeline sharing `cores` cores.

    `background_s`: per process beside the replicas on the same cores (e.g. a load generator), the
    CPU seconds each query costs it.
    """
    if not cores > 0:
        raise ValueError(f"cores must be positive, got {cores}")
    if any(not b >= 0 for b in background_s):
        raise ValueError(f"background CPU per query must be >= 0, got {background_s}")
    if any(c.replicas < 1 for c in config):
        raise ValueError(f"every stage needs a replica, got {[c.replicas for c in config]}")
    model, table = estimator.model, estimator.table
    options = [table[s].option(c.hardware) for s, c in enumerate(config)]
    widest = max(c.max_batch_size for c in config)
    service = np.zeros((model.size, widest + 1))
    share = np.ones((model.size, widest + 1))
    for s, (option, c) in enumerate(zip(options, config, strict=True)):
        b = c.max_batch_size
        service[s, : b + 1] = option.service_s[: b + 1]
        if option.cpu_share is not None:
            share[s, : b + 1] = option.cpu_share[: b + 1]
    children = np.full((model.size, max(1, model.size)), -1, dtype=np.int64)
    for s in range(model.size):
        for i, child in enumerate(model.children(s)):
            children[s, i] = child
    roots = np.array([not model.parents[s] for s in range(model.size)], dtype=np.bool_)
    # The kernel takes arrivals in time order; a stable sort keeps ties in query order.
    order = np.argsort(estimator.arrivals_s, kind="mergesort")
    visits = np.ascontiguousarray(estimator.visits[:, order])
    in_order = run_shared(
        np.ascontiguousarray(estimator.arrivals_s[order]),
        order.astype(np.int64),
        visits,
        roots,
        children,
        _visited_parents(visits, model.parents),
        service,
        share,
        np.array([c.max_batch_size for c in config], dtype=np.int64),
        np.array([c.replicas for c in config], dtype=np.int64),
        float(cores),
        np.asarray(background_s, dtype=np.float64).reshape(-1),
    )
    completion = np.empty_like(in_order)
    completion[:, order] = in_order
    done = estimator.arrivals_s.copy()  # a query visiting no stage is done on arrival
    for s in range(model.size):
        np.maximum(done, completion[s], out=done)
    return done - estimator.arrivals_s, [completion[s] for s in range(model.size)]


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
def run_shared(
    arrivals: NDArray[np.float64],
    rank: NDArray[np.int64],
    visits: NDArray[np.bool_],
    roots: NDArray[np.bool_],
    children: NDArray[np.int64],
    waiting: NDArray[np.int64],
    service: NDArray[np.float64],
    share: NDArray[np.float64],
    max_batch: NDArray[np.int64],
    replicas: NDArray[np.int64],
    cores: float,
    background_s: NDArray[np.float64],
) -> NDArray[np.float64]:
    """Completion time of every query at every stage (-inf where not visited); arrivals sorted.

    `rank[q]`: query q's index before the sort, which orders queries ready at the same instant.
    `background_s[j]`: CPU seconds that each arriving query costs background process j (a
    single-threaded process on the same cores): it computes while it has work left, demanding one
    core, and shares the cores like a batch.

    Each stage's queue is an array of query ids in the order they became ready; a batch is a
    slice of it, so a batch is (stage, first, size). A batch's projected finish is kept as an
    absolute time and rescaled only when the cores' sharing changes, so that without sharing
    every finish is exactly start + service, as in the estimator's kernel.
    """
    stages, n = visits.shape
    waiting = waiting.copy()
    completion = np.full((stages, n), -np.inf)
    queue = np.empty((stages, n), dtype=np.int64)
    head = np.zeros(stages, dtype=np.int64)
    tail = np.zeros(stages, dtype=np.int64)
    free = replicas.copy()
    mark = np.zeros(stages, dtype=np.int64)
    slots = max(1, int(replicas.sum()))
    act_stage = np.empty(slots, dtype=np.int64)
    act_first = np.empty(slots, dtype=np.int64)
    act_size = np.empty(slots, dtype=np.int64)
    act_share = np.empty(slots)
    act_finish = np.empty(slots)
    active = 0
    workers = background_s.shape[0]
    bg_busy = np.zeros(workers, dtype=np.bool_)
    bg_finish = np.zeros(workers)
    crowd = 1.0
    t = 0.0
    arrived = 0
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
                act_finish[active] = service[s, size]
                active += 1
                head[s] += size
                free[s] -= 1
        # Summed afresh at every event: adding and removing fractional shares would drift.
        demand = 0.0
        for i in range(active):
            demand += act_share[i]
        for j in range(workers):
            if bg_busy[j]:
                demand += 1.0
        new_crowd = crowd_of(demand, cores)
        if new_crowd != crowd:
            for i in range(running):
                left = (act_finish[i] - t) / slowdown(act_share[i], crowd)  # work left, in seconds alone
                act_finish[i] = t + left * slowdown(act_share[i], new_crowd)
            for j in range(workers):
                if bg_busy[j]:
                    bg_finish[j] = t + (bg_finish[j] - t) / crowd * new_crowd
            crowd = new_crowd
        for i in range(running, active):
            act_finish[i] = t + act_finish[i] * slowdown(act_share[i], crowd)
        if active == 0 and arrived == n:
            break
        t_next = np.inf
        for i in range(active):
            if act_finish[i] < t_next:
                t_next = act_finish[i]
        for j in range(workers):
            if bg_busy[j] and bg_finish[j] < t_next:
                t_next = bg_finish[j]
        if arrived < n and arrivals[arrived] < t_next:
            t_next = arrivals[arrived]
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
            free[s] += 1
            active -= 1
            act_stage[i] = act_stage[active]
            act_first[i] = act_first[active]
            act_size[i] = act_size[active]
            act_share[i] = act_share[active]
            act_finish[i] = act_finish[active]
        for j in range(workers):
            if bg_busy[j] and bg_finish[j] <= t:
                bg_busy[j] = False
        for s in range(stages):
            if tail[s] - mark[s] > 1:  # ready at the same instant: in query order, as the estimator
                ready = queue[s, mark[s] : tail[s]].copy()
                queue[s, mark[s] : tail[s]] = ready[np.argsort(rank[ready], kind="mergesort")]
        while arrived < n and arrivals[arrived] <= t:
            q = arrived
            for s in range(stages):
                if roots[s] and visits[s, q]:
                    queue[s, tail[s]] = q
                    tail[s] += 1
            for j in range(workers):
                if background_s[j] <= 0.0:
                    continue
                if bg_busy[j]:
                    bg_finish[j] += background_s[j] * crowd
                else:
                    bg_busy[j] = True
                    bg_finish[j] = t + background_s[j] * crowd
            arrived += 1
    return completion
