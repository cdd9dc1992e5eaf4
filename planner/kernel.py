"""The estimator's compiled kernel: one stage, one centralized FIFO queue, greedy batching.

Semantics (DESIGN.md, "Reference semantics of the estimator"): whenever a replica is free and
the queue is not empty, it takes min(queue length, max_batch_size) queries at once and never
waits for a batch to fill. Replicas are identical, so only their free times matter: a min-heap.

Invariant that makes one pass enough: the replica that frees first dispatches next, at
t = max(its free time, the oldest queued arrival), so dispatch times never decrease and the
queue is served in arrival order.
"""

from __future__ import annotations

import numpy as np
from numba import njit
from numpy.typing import NDArray


@njit(cache=True, nogil=True)
def _sift_down(heap: NDArray[np.float64], size: int) -> None:
    i = 0
    value = heap[0]
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
        finish = t + service_s[j - i]
        for q in range(i, j):
            completion[q] = finish
            batch_sizes[q] = j - i
        heap[0] = finish
        _sift_down(heap, k)
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
        finish = t + service_s[j - i]
        for m in range(i, j):
            q = idx[m]
            completion[q] = finish
            if finish - origin[q] > slo_s:
                misses += 1
        if misses > miss_budget:
            return completion, False
        heap[0] = finish
        _sift_down(heap, replicas)
        i = j
    return completion, True
