"""A deliberately simple, event-by-event reference simulator of a provisioned pipeline.

Written from DESIGN.md, "Reference semantics of the estimator", and NOT from the compiled kernel,
so that the two can be compared query by query. It is slow (pure Python, one heap event at a time)
and meant for small traces in tests only.

Semantics
---------
- One global event heap of ``(time, priority, seq, event)`` entries. ``seq`` is a global counter, so
  entries never compare their payloads and ties are resolved deterministically.
- Events, in the order they are handled at one instant (``priority``):

  0. ``ARRIVAL(stage, query)``: the query joins the stage's queue.
  1. ``FREE(stage, batch)``: a replica of the stage finishes a batch. Every query of the batch
     completes the stage at this instant; for each child stage that the query visits, one pending
     parent is ticked off, and when none is left (all the parents that the query visited have
     finished: a join) an ``ARRIVAL(child, query)`` is scheduled at this same instant.
  2. ``DISPATCH(stage)``: while the stage has a free replica and a non-empty queue, a free replica
     takes ``min(queue length, max_batch_size)`` queries from the head of the queue and finishes
     them ``service_s[n]`` later. Replicas never wait for a batch to fill.

  With an after-idle cost ``(extra_s, tau_s)`` for the stage, the replica that takes the batch is
  the one that became idle last, and the batch takes ``extra_s * (1 - exp(-idle / tau_s))`` longer,
  ``idle`` being how long that replica sat idle (replicas are idle from time 0).

  Because every service time is > 0, handling the priority-0 and priority-1 events of an instant
  only ever creates more priority-0 events at that instant and never more priority-1 ones, so all
  the arrivals of an instant (including those caused by completions at that instant) are enqueued
  before any replica dispatches at it.
- Each stage's queue is FIFO by ``(arrival time at the stage, query index)``.
- A query's latency is the time of the completion of the last stage it visits minus its arrival.
  A query that visits no stage at all has no defined latency: it is reported as NaN.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from inferline.catalog import DEFAULT_CATALOG
from inferline.planner.costtable import CostTable, build_cost_table
from inferline.planner.pipeline import PipelineModel, pipeline_model
from inferline.profiles import parse_profile
from inferline.spec import parse_spec

ARRIVAL = 0
FREE = 1
DISPATCH = 2


@dataclass
class ReferenceResult:
    latencies_s: NDArray[np.float64]
    """Per query: last visited stage's completion minus arrival (NaN if it visits no stage)."""
    completions_s: NDArray[np.float64]
    """(stages, queries): completion time of each stage, NaN where the stage is not visited."""
    batch_sizes: NDArray[np.int64]
    """(stages, queries): size of the batch the query was served in at that stage, 0 if not visited."""
    dispatch_s: NDArray[np.float64]
    """(stages, queries): when the query's batch started service at that stage, NaN if not visited."""
    arrival_s: NDArray[np.float64]
    """(stages, queries): when the query joined the stage's queue, NaN if not visited."""


def simulate(
    arrivals_s: Sequence[float] | NDArray[np.float64],
    parents: Sequence[Sequence[int]],
    visits: NDArray[np.bool_],
    service_s: Sequence[Sequence[float] | NDArray[np.float64]],
    max_batch: Sequence[int],
    replicas: Sequence[int],
    after_idle: Sequence[tuple[float, float]] | None = None,
) -> ReferenceResult:
    """Simulate every query of the trace through the pipeline, one event at a time.

    ``parents[s]`` lists stage ``s``'s parents (indices of earlier stages); ``visits[s, q]`` says
    whether query ``q`` visits stage ``s``; ``service_s[s][n]`` is stage ``s``'s service time for a
    batch of ``n``; ``max_batch[s]`` and ``replicas[s]`` are its provisioning; ``after_idle[s]`` its
    after-idle ``(extra_s, tau_s)`` (none: no extra latency).
    """
    arrivals = [float(a) for a in arrivals_s]
    n_queries = len(arrivals)
    n_stages = len(parents)
    visits = np.asarray(visits, dtype=bool)
    assert visits.shape == (n_stages, n_queries)
    children: list[list[int]] = [[] for _ in range(n_stages)]
    for s, ps in enumerate(parents):
        for p in ps:
            assert 0 <= p < s, "stages must be in topological order"
            children[p].append(s)
    for s in range(n_stages):
        assert replicas[s] >= 1
        assert 1 <= max_batch[s] < len(service_s[s])
        for n in range(1, max_batch[s] + 1):
            assert service_s[s][n] > 0.0

    # pending[s][q]: how many of stage s's parents query q visits and has not finished yet.
    pending = [[0] * n_queries for _ in range(n_stages)]
    for s, ps in enumerate(parents):
        for q in range(n_queries):
            if visits[s, q]:
                pending[s][q] = sum(1 for p in ps if visits[p, q])
                assert not ps or pending[s][q] > 0, f"query {q} visits stage {s} but none of its parents"

    events: list[tuple[float, int, int, tuple[int, ...]]] = []
    seq = 0

    def push(time: float, priority: int, payload: tuple[int, ...]) -> None:
        nonlocal seq
        heapq.heappush(events, (time, priority, seq, payload))
        seq += 1

    for q, a in enumerate(arrivals):
        for s in range(n_stages):
            if not parents[s] and visits[s, q]:
                push(a, ARRIVAL, (s, q))

    queues: list[list[tuple[float, int]]] = [[] for _ in range(n_stages)]
    free = [int(r) for r in replicas]
    idle_since: list[list[float]] = [[0.0] * int(r) for r in replicas]  # per stage, in the order they idled
    completion = np.full((n_stages, n_queries), np.nan)
    dispatch = np.full((n_stages, n_queries), np.nan)
    arrived = np.full((n_stages, n_queries), np.nan)
    batch_of = np.zeros((n_stages, n_queries), dtype=np.int64)

    while events:
        time, priority, _, payload = heapq.heappop(events)
        if priority == ARRIVAL:
            s, q = payload
            arrived[s, q] = time
            heapq.heappush(queues[s], (time, q))
            push(time, DISPATCH, (s,))
        elif priority == FREE:
            s, *batch = payload
            free[s] += 1
            idle_since[s].append(time)
            for q in batch:
                completion[s, q] = time
                for c in children[s]:
                    if visits[c, q]:
                        pending[c][q] -= 1
                        if pending[c][q] == 0:
                            push(time, ARRIVAL, (c, q))
            push(time, DISPATCH, (s,))
        else:
            (s,) = payload
            while free[s] > 0 and queues[s]:
                n = min(len(queues[s]), max_batch[s])
                batch = [heapq.heappop(queues[s])[1] for _ in range(n)]
                finish = time + float(service_s[s][n])
                since = idle_since[s].pop()  # the replica that became idle last
                if after_idle is not None and after_idle[s][0] > 0.0:
                    extra_s, tau_s = after_idle[s]
                    finish += extra_s * (1.0 - math.exp(-(time - since) / tau_s))
                assert finish > time
                for q in batch:
                    dispatch[s, q] = time
                    batch_of[s, q] = n
                free[s] -= 1
                push(finish, FREE, (s, *batch))

    assert all(not queue for queue in queues)
    assert free == [int(r) for r in replicas]
    latencies = np.full(n_queries, np.nan)
    for q in range(n_queries):
        done = [completion[s, q] for s in range(n_stages) if visits[s, q]]
        assert all(not math.isnan(d) for d in done)
        if done:
            latencies[q] = max(done) - arrivals[q]
    return ReferenceResult(latencies, completion, batch_of, dispatch, arrived)


def nearest_rank_p99(latencies: Sequence[float] | NDArray[np.float64]) -> float:
    """The smallest latency that at least 99% of the queries do not exceed (nearest rank)."""
    values = sorted(float(v) for v in latencies)
    assert values, "no latencies"
    rank = (99 * len(values) + 99) // 100  # ceil(0.99 n) in exact integer arithmetic, 1-based
    return values[rank - 1]


def build_pipeline(
    stages: Sequence[Mapping[str, Any]], profiles: Mapping[str, Any], name: str = "test"
) -> tuple[PipelineModel, CostTable]:
    """A PipelineModel and its cost table from a spec's stage list and raw profile documents.

    ``profiles`` maps a model name to its profile document's ``profiles`` field, e.g.
    ``{"m": {"cpu": [{"batch_size": 1, "latency_ms": {"mean": 10.0}}]}}``.
    """
    spec = parse_spec({"name": name, "stages": list(stages)})
    parsed = {m: parse_profile({"model": m, "profiles": doc}, "test") for m, doc in profiles.items()}
    model = pipeline_model(spec)
    return model, build_cost_table(model, parsed, DEFAULT_CATALOG)
