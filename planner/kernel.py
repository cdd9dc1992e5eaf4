"""The estimator's compiled kernel: one stage, one centralized FIFO queue, greedy batching.

Semantics (DESIGN.md, "Reference semantics of the estimator"): whenever a replica is free and
the queue is not empty, it takes min(queue length, max_batch_size) queries at once and never
waits for a batch to fill. Replicas are identical, so only their free times matter: a min-heap.

Invariant that makes one pass enough: the replica that frees first dispatches next, at
t = max(its free time, the oldest queued arrival), so dispatch times never decrease and the
queue is served in arrival order.

After-idle latency (an extension of the design's semantics, `ModelProfile.after_idle`): a batch
sent to a replica that sat idle for g seconds takes extra_s * (1 - exp(-g / tau_s)) longer
(threads and processes that went to sleep wake up first). Where several replicas are idle, the
batch goes to the one that became free last, as the router hands work to its newest idle
replica; with extra_s = 0 this is the design's semantics exactly.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit
from numpy.typing import NDArray


@njit(cache=True, nogil=True)
def _sift_down(heap: NDArray[np.float64], size: int, i: int) -> None:
    value = heap[i]
    while True:
        child = 2 * i + 1
        if child >= size:
            break
        if child + 1 < size and heap[child + 1] < heap[child]:
            child += 1
        if heap[child] >= value:
            break
        heap[i] = heap[child]
        i = child
    heap[i] = value


@njit(cache=True, nogil=True)
def after_idle_s(idle_s: float, extra_s: float, tau_s: float) -> float:
    """How much longer a call takes on a replica that sat idle for `idle_s` seconds."""
    if extra_s <= 0.0 or idle_s <= 0.0:
        return 0.0
    return extra_s * (1.0 - math.exp(-idle_s / tau_s))


@njit(cache=True, nogil=True)
def _dispatch(heap: NDArray[np.float64], size: int, t: float, service: float, extra_s: float, tau_s: float) -> float:
    """Give a batch starting at t to a replica; its finish time, which becomes that replica's free time.

    Without an after-idle cost any free replica will do, so the heap's top takes it. With one, the
    replica that became free last among those free at t (the router's newest idle one) does."""
    if extra_s <= 0.0 or heap[0] >= t:
        finish = t + service
        heap[0] = finish
        _sift_down(heap, size, 0)
        return finish
    latest = 0
    for r in range(1, size):
        if heap[latest] < heap[r] <= t:
            latest = r
    finish = t + (service + after_idle_s(t - heap[latest], extra_s, tau_s))  # as the shared-core kernel sums
    heap[latest] = finish  # later than every free time <= t: only its subtree can need it lower
    _sift_down(heap, size, latest)
    return finish


@njit(cache=True, nogil=True)
def heapify(heap: NDArray[np.float64]) -> None:
    heap.sort()  # a sorted array is a valid min-heap


@njit(cache=True, nogil=True)
def advance_stage(
    times: NDArray[np.float64],
    start: int,
    heap: NDArray[np.float64],
    service_s: NDArray[np.float64],
    max_batch: int,
    horizon_s: float,
    completion: NDArray[np.float64],
    batch_sizes: NDArray[np.int64],
    idle_extra_s: float = 0.0,
    idle_tau_s: float = 1.0,
) -> int:
    """Dispatch batches from sorted arrival `times[start:]` while the dispatch time is < horizon.

    Writes each dispatched query's finish time into `completion` and the size of its batch into
    `batch_sizes`; updates replica free times in `heap` in place; returns the index of the
    first query not yet dispatched. With horizon = inf it runs the whole queue.
    """
    n = times.shape[0]
    k = heap.shape[0]
    i = start
    if k == 0:
        return i
    while i < n:
        free = heap[0]
        arrival = times[i]
        t = free if free > arrival else arrival
        if t >= horizon_s:
            break
        j = i + 1
        limit = min(n, i + max_batch)
        while j < limit and times[j] <= t:
            j += 1
        finish = _dispatch(heap, k, t, service_s[j - i], idle_extra_s, idle_tau_s)
        for q in range(i, j):
            completion[q] = finish
            batch_sizes[q] = j - i
        i = j
    return i


@njit(cache=True, nogil=True)
def run_stage(
    stage_arrival: NDArray[np.float64],
    visited: NDArray[np.bool_],
    origin: NDArray[np.float64],
    service_s: NDArray[np.float64],
    max_batch: int,
    replicas: int,
    slo_s: float,
    miss_budget: int,
    idle_extra_s: float = 0.0,
    idle_tau_s: float = 1.0,
) -> tuple[NDArray[np.float64], bool]:
    """Simulate one stage over a whole trace, with an early stop.

    Returns per-query completion times (-inf where the stage is not visited) and whether the
    run went to the end. It stops early once more than `miss_budget` queries have finished
    this stage later than `slo_s` after their pipeline arrival `origin`: their end-to-end
    latency can only be larger, so the P99 is certainly over the SLO.
    """
    n = stage_arrival.shape[0]
    count = 0
    for q in range(n):
        if visited[q]:
            count += 1
    idx = np.empty(count, dtype=np.int64)
    c = 0
    for q in range(n):
        if visited[q]:
            idx[c] = q
            c += 1
    times = stage_arrival[idx]
    ordered = True
    for m in range(1, count):
        if times[m] < times[m - 1]:
            ordered = False
            break
    if not ordered:
        # NOTE: mergesort is stable, so equal arrivals keep query order (deterministic ties).
        order = np.argsort(times, kind="mergesort")
        idx = idx[order]
        times = times[order]
    completion = np.full(n, -np.inf)
    heap = np.zeros(replicas)
    misses = 0
    i = 0
    while i < count:
        free = heap[0]
        arrival = times[i]
        t = free if free > arrival else arrival
        j = i + 1
        limit = min(count, i + max_batch)
        while j < limit and times[j] <= t:
            j += 1
        finish = _dispatch(heap, replicas, t, service_s[j - i], idle_extra_s, idle_tau_s)
        for m in range(i, j):
            q = idx[m]
            completion[q] = finish
            if finish - origin[q] > slo_s:
                misses += 1
        if misses > miss_budget:
            return completion, False
        i = j
    return completion, True
