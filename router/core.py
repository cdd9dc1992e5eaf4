"""The router's core: runs a pipeline's DAG over replicas with the estimator's reference semantics.

Each stage has one centralized FIFO queue shared by its replicas; a replica, whenever it is free and
the queue is not empty, takes min(queue length, max batch size) queries at once and sends them as
one batch through its adapter (it never waits for a batch to fill). A replica whose adapter has
`infer_async` (Triton's calls over HTTP on the loop itself) is a coroutine on the router's loop,
which the frontends share: a query then goes from the request to the model server and back to the
reply without changing threads (with threaded replicas, the HTTP endpoint added 2-3 ms more to the
median at 500 q/s on 2 cores). Other replicas are threads blocking on `infer`. Conditional edges are
decided by the spec's route on the parents' real outputs, or sampled with the spec's probability; a
stage starts for a query once all its parents that the query visited are done (join); the query is
answered once every stage it visits is done. These are the semantics `planner/estimator.py`
simulates, which is what lets measured latency match it.

Overload is refused at the door (`Overloaded`) rather than queued without bound. A replica whose
server stops answering has its batch put back at the head of the queue for another replica, up
to `MAX_ATTEMPTS`; queries that cannot be served fail with `QueryFailed`. Every submitted query
ends exactly once, answered or failed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable, Generator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from numpy.typing import NDArray
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary
from prometheus_client.metrics_core import CounterMetricFamily
from prometheus_client.registry import Collector

from inferline.adapters.base import Adapter, ModelInfo, TensorSpec, feed_inputs
from inferline.errors import InferlineError, ServerError, ServerUnreachable
from inferline.process_cpu import machine_cpu
from inferline.router.crowding import CallCrowding, CallToken, CrowdingCollector
from inferline.router.event_loop import LoopThread
from inferline.routes import Route, resolve_route
from inferline.spec import PipelineSpec

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
"""Tries of one batch on different replicas before its queries fail."""
ARRIVALS_KEPT_S = 120.0
"""Arrival times kept for `arrivals_since` (the live tuner reads the last 60 s)."""
PROBE_INTERVAL_S = 0.5
"""How often a replica whose server stopped answering checks whether it is back."""
STOP_WAIT_S = 30.0
"""How long `stop` waits for the batches under way, all replicas together."""
LOOP_LAG_PROBE_S = 0.05
"""How often the router checks how late its event loop runs a timer (`inferline_router_loop_lag_seconds`)."""
CALL_SECONDS_BUCKETS = tuple(round(0.0005 * 1.25**i, 6) for i in range(32))
"""Bounds of the call-time histogram: 0.5 ms to about 500 ms, each 25% above the last, so that a
percentile read from it is within about 12% of the true one at any service time."""
QUEUE_WAIT_BUCKETS = (0.0001, 0.00025, *(round(0.0005 * 1.25**i, 6) for i in range(41)))
"""Bounds of the queue-wait histogram: most waits are near 0 (a free replica), the rest as the call
times' steps up to about 3.6 s (a queue under overload)."""

Tensors = dict[str, NDArray[np.generic]]
AsyncInfer = Callable[[str, Tensors], Awaitable[Tensors]]


class Overloaded(InferlineError):
    """The router's queues are full: the query is refused, not queued."""


class QueryFailed(InferlineError):
    """A query could not be served (its replicas died, or the model refused the batch)."""


class InvalidQuery(InferlineError):
    """The query's inputs do not match the pipeline's entry inputs."""


@dataclass(frozen=True)
class Replica:
    """One serving slot: a model on a server that runs one batch at a time. From `start` on, the router
    owns the adapter and closes it when the replica retires or the router stops: give each replica an
    adapter of its own."""

    adapter: Adapter
    model: str
    label: str


@dataclass(frozen=True)
class QueryResult:
    outputs: dict[str, NDArray[np.generic]]
    """Every visited stage's outputs, named "stage.OUTPUT", each with a leading batch axis of 1."""
    visited: tuple[str, ...]
    latency_ms: float


PENDING, QUEUED, DONE, SKIPPED = range(4)


@dataclass(eq=False)
class _Query:
    id: int
    arrived: float
    inputs: Tensors
    future: Future[QueryResult]
    state: list[int]
    outputs: dict[int, Tensors] = field(default_factory=dict)
    ended: bool = False
    """Answered or failed (set under the router's lock: parallel branches may fail at once)."""


@dataclass(eq=False)
class _Item:
    query: _Query
    inputs: Tensors
    attempts: int = 0
    queued_at: float = field(default_factory=time.perf_counter)
    """When it last joined its stage's queue (a retry joins again)."""


@dataclass(frozen=True)
class StageSnapshot:
    name: str
    queue_length: int
    in_flight: int
    replicas: int
    ready_replicas: int
    busy_s: float
    """Cumulative busy replica-seconds (for utilization over a tick)."""
    arrivals: int
    """Cumulative queries that reached the stage."""


class _Stage:
    def __init__(self, index: int, name: str, info: ModelInfo, max_batch: int) -> None:
        self.index, self.name, self.info, self.max_batch = index, name, info, max_batch
        self.items: collections.deque[_Item] = collections.deque()
        self.cond = threading.Condition()
        """Guards the stage's state; thread replicas wait on it for work."""
        self.workers: list[_Worker] = []
        self.idle: dict[_Worker, None] = {}
        """Coroutine replicas waiting for work, newest last (an ordered set: one entry each)."""
        self.in_flight = 0
        self.busy_s = 0.0
        self.arrivals = 0
        self.batch_sizes: collections.Counter[int] = collections.Counter()

    def take_idle(self, everyone: bool) -> list[_Worker]:
        """Called under `cond` when work comes: wake the thread replicas, and one idle coroutine
        replica (a query) or all of them (a batch put back, a bigger max batch); the caller wakes
        those returned once it released the lock."""
        self.cond.notify_all()  # a plain notify could wake only a replica that is probing its server
        if not self.idle:
            return []
        if everyone:
            woken, self.idle = list(self.idle), {}
            return woken
        return [self.idle.popitem()[0]]


def _leaves_first(worker: _Worker) -> tuple[int, float]:
    """Which replica a scale-down retires first, as the simulators do: one that cannot serve, then
    the one idle longest (the coldest: a long idle gap makes its next call slower; its last batch
    answered or failed), then the busy one that took its batch first (the simulators take the one
    that frees soonest, which for batches of one size is the same). Read under the stage's lock."""
    if not worker.healthy:
        return (0, 0.0)
    if worker.busy_since is None:
        return (1, worker.free_since if worker.free_since is not None else -math.inf)
    return (2, worker.busy_since)


class _Worker:
    """One replica: whenever it is free and its stage's queue is not empty, it takes a batch and
    sends it. It runs as a coroutine on the router's event loop where its adapter can infer there
    (`infer_async`): no thread of its own, and its answers reach a frontend on that loop without a
    hand-off. Otherwise it is a thread blocking on `infer`."""

    def __init__(self, router: PipelineRouter, stage: _Stage, replica: Replica) -> None:
        self.router, self.stage, self.replica = router, stage, replica
        self.stopping = False
        self.healthy = True
        self.last_call_end: float | None = None
        self.busy_since: float | None = None
        """When it took its batch under way; None while it has none (set and cleared under the stage's lock)."""
        self.free_since: float | None = None
        """When its last batch ended, answered or failed; None before its first."""
        self.thread: threading.Thread | None = None
        self.done: Future[None] | None = None
        """Where it is a coroutine: done once it ended."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread_id: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._call: CallToken | None = None
        """The call under way, for the crowding its end records."""
        self._finished: Callable[[], None] | None = None
        """A coroutine's last batch, passed on (routed onward, answered) right after its next batch is
        sent, or at once when none waits: the model server starts on the next batch first, and the
        answers still leave in the same turn of the loop."""

    # -- as a thread -----------------------------------------------------------------------
    def start_thread(self) -> None:
        self.thread = threading.Thread(target=self._run_thread, name=f"replica-{self.replica.label}", daemon=True)
        self.thread.start()

    def _run_thread(self) -> None:
        try:
            self._serve_in_thread()
        finally:
            self._close_adapter()

    def _serve_in_thread(self) -> None:
        stage = self.stage
        while True:
            if not self.healthy:
                # Its server stopped answering: leave the queue to the others and probe now and then.
                with stage.cond:
                    if not self.stopping:
                        stage.cond.wait(PROBE_INTERVAL_S)
                if self.stopping:
                    return
                self.healthy = self._probe()
                continue
            with stage.cond:
                back_to_back = bool(stage.items)
                while not self.stopping and not stage.items:
                    stage.cond.wait()
                if self.stopping:
                    return
                batch = self._take()
            cpu = time.thread_time()
            tensors = self._tensors(batch)
            if tensors is None:
                continue
            started = self._begin(batch, back_to_back)
            try:
                outputs = self.replica.adapter.infer(self.replica.model, tensors)
            except Exception as exc:
                self._failed(batch, started, exc)
            else:
                self._ended(batch, started)
                self._pass_on(batch, outputs)
            finally:
                self.router._metrics.observe_replica_cpu(stage.name, time.thread_time() - cpu)

    # -- as a coroutine ----------------------------------------------------------------------
    def start_on(self, loop: asyncio.AbstractEventLoop, infer: AsyncInfer) -> None:
        self._loop = loop
        self.done = asyncio.run_coroutine_threadsafe(self._run_coroutine(infer), loop)

    def wake(self) -> None:
        """Resume the coroutine replica if it waits (from any thread; a no-op for a thread replica)."""
        if self._loop is None:
            return
        if threading.get_ident() == self._loop_thread_id:
            self._resume()
        else:
            with contextlib.suppress(RuntimeError):  # the loop closed: the replica is gone already
                self._loop.call_soon_threadsafe(self._resume)

    def cancel(self) -> None:
        """On its loop's thread: end the coroutine at its next step, a call under way included."""
        if self._task is not None:
            self._task.cancel()
        elif self.done is not None:
            self.done.cancel()  # not started yet: it never will

    def _resume(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait(self, timeout_s: float | None = None) -> None:
        assert self._loop is not None
        self._waiter = self._loop.create_future()
        timer = self._loop.call_later(timeout_s, self._resume) if timeout_s is not None else None
        try:
            await self._waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    async def _run_coroutine(self, infer: AsyncInfer) -> None:
        self._loop_thread_id = threading.get_ident()
        self._task = asyncio.current_task()
        try:
            await self._serve_on_loop(infer)
        except Exception:  # a bug must not end the replica unnoticed
            log.exception("replica %s stopped on an internal error", self.replica.label)
        finally:
            self._retire()
            self._close_adapter()  # on the loop, still running: its connections close there

    def _retire(self) -> None:
        """The coroutine ended (stopped, cancelled or failed): out of the idle set for good, and a
        wake-up it may have been handed goes on to another idle replica."""
        stage = self.stage
        with stage.cond:
            stage.idle.pop(self, None)
            if not self.stopping:  # cancelled with its loop, or failed: it serves no more
                self.stopping, self.healthy = True, False
            woken = stage.take_idle(everyone=False) if stage.items else []
        for w in woken:
            w.wake()

    async def _serve_on_loop(self, infer: AsyncInfer) -> None:
        stage = self.stage
        back_to_back = False
        try:
            while True:
                if not self.healthy:
                    await self._wait(PROBE_INTERVAL_S)
                    if self.stopping:
                        return
                    self.healthy = await asyncio.to_thread(self._probe)
                    continue
                with stage.cond:
                    if self.stopping:
                        return
                    batch = self._take() if stage.items else None
                    if batch is None:
                        stage.idle[self] = None
                if batch is None:
                    self._pass_finished()
                    await self._wait()
                    back_to_back = False
                    continue
                await self._serve(infer, batch, back_to_back)
                back_to_back = True
        finally:
            self._pass_finished()  # stopped or cancelled right after a call: its queries still go on

    async def _serve(self, infer: AsyncInfer, batch: list[_Item], back_to_back: bool) -> None:
        """One call: the batch is sent, then the last one passed on; this one waits to be passed on in turn."""
        cpu = time.thread_time()
        tensors = self._tensors(batch)
        if tensors is None:
            return
        started = self._begin(batch, back_to_back)
        call = _OwnCpu(infer, self.replica.model, tensors, then=self._pass_finished)
        own_cpu = time.thread_time() - cpu
        outcome: Tensors | Exception
        try:
            outcome = await call
        except asyncio.CancelledError:  # the loop is going away: the batch's queries still end once
            self._failed(batch, started, QueryFailed("the router stopped"))
            raise
        except Exception as exc:
            outcome = exc
        cpu = time.thread_time()
        if isinstance(outcome, Exception):
            self._failed(batch, started, outcome)
        else:
            self._ended(batch, started)
            self._finished = functools.partial(self._pass_on, batch, outcome)
        own_cpu += call.cpu_s + time.thread_time() - cpu
        self.router._metrics.observe_replica_cpu(self.stage.name, own_cpu)

    def _pass_finished(self) -> None:
        finished, self._finished = self._finished, None
        if finished is not None:
            finished()

    def _probe(self) -> bool:
        try:
            return self.replica.adapter.is_ready()
        except Exception:  # the contract says never; a replica must not end on it
            log.exception("probing replica %s failed", self.replica.label)
            return False

    def _close_adapter(self) -> None:
        try:
            self.replica.adapter.close()
        except Exception:  # closing must not hide why the replica ended
            log.exception("closing replica %s failed", self.replica.label)

    # -- one batch, either way -------------------------------------------------------------
    def _take(self) -> list[_Item]:
        """Called under the stage's lock with a non-empty queue: the next batch, counted in flight."""
        stage = self.stage
        n = min(len(stage.items), stage.max_batch)
        stage.in_flight += n
        self.busy_since = time.perf_counter()
        return [stage.items.popleft() for _ in range(n)]

    def _tensors(self, batch: list[_Item]) -> Tensors | None:
        """The batch's inputs stacked, or None where they cannot be (queries of different lengths
        along a variable dimension): then its queries fail and nothing is sent."""
        try:
            return {name: np.concatenate([item.inputs[name] for item in batch]) for name in batch[0].inputs}
        except ValueError as exc:
            with self.stage.cond:
                self._release(batch)
            self.router._fail(batch, f"stage {self.stage.name!r}: its queries cannot form one batch ({exc})")
            return None

    def _begin(self, batch: list[_Item], back_to_back: bool) -> float:
        stage = self.stage
        started = time.perf_counter()
        if self.last_call_end is not None:
            gap = started - self.last_call_end
            if back_to_back:
                # The queue waited while the replica did the router's own work between two calls
                # (part of the service time once calibrated: the estimator sees no gap there).
                self.router._metrics.observe_dispatch(stage.name, gap)
            else:
                self.router._metrics.observe_idle_gap(stage.name, gap)
        self.last_call_end = None  # set again only when this call succeeds
        self._call = self.router._call_started(stage.name, not back_to_back, started)
        self.router._metrics.observe_queue_waits(stage.name, [started - item.queued_at for item in batch])
        return started

    def _failed(self, batch: list[_Item], started: float, exc: Exception) -> None:
        stage = self.stage
        self._settle(batch, started, answered=False)
        if isinstance(exc, ServerUnreachable):
            self.healthy = False
            self.router._retry(stage, batch, exc)
        elif isinstance(exc, (ServerError, QueryFailed)):
            self.router._fail(batch, f"stage {stage.name!r}: {exc.message}")
        else:  # an adapter bug must not kill the replica silently
            log.error("replica %s failed", self.replica.label, exc_info=exc)
            self.router._fail(batch, f"stage {stage.name!r}: internal error {type(exc).__name__}")

    def _ended(self, batch: list[_Item], started: float) -> None:
        """A call answered: the replica is free, and the batch's service time is recorded."""
        stage = self.stage
        self.last_call_end = time.perf_counter()
        self._settle(batch, started, answered=True, ended=self.last_call_end)
        stage.batch_sizes[len(batch)] += 1
        self.router._metrics.observe_batch(stage.name, len(batch), self.last_call_end - started)

    def _pass_on(self, batch: list[_Item], outputs: Tensors) -> None:
        """Each query's share of the outputs goes on: to the stages after this one, or as its answer."""
        stage = self.stage
        for i, item in enumerate(batch):
            try:
                self.router._stage_done(item.query, stage.index, {k: v[i : i + 1] for k, v in outputs.items()})
            except Exception as exc:  # e.g. a routing function raising: fail that query, keep the replica
                log.exception("query %d failed after stage %s", item.query.id, stage.name)
                self.router._fail([item], f"stage {stage.name!r}: routing failed: {type(exc).__name__}: {exc}")

    def _settle(self, batch: list[_Item], started: float, answered: bool, ended: float | None = None) -> None:
        if self._call is not None:
            self.router._crowding.ended(self.stage.name, self._call, answered, ended)
            self._call = None
        with self.stage.cond:
            self.stage.busy_s += self._release(batch) - started

    def _release(self, batch: list[_Item]) -> float:
        """Called under the stage's lock: the batch is no longer in flight and the replica is free; when."""
        self.stage.in_flight -= len(batch)
        self.busy_since, self.free_since = None, time.perf_counter()
        return self.free_since


class _OwnCpu:
    """Makes and awaits an adapter's call, summing the CPU of its own steps only: on an event loop,
    the thread's CPU between two of its resumptions is other coroutines' work. The call is made in
    the first step, so an adapter raising there fails only its batch, like any failed call; `then`
    runs right after that step (the request sent), whatever its outcome, and counts as own CPU."""

    def __init__(self, infer: AsyncInfer, model: str, tensors: Tensors, then: Callable[[], None] | None = None) -> None:
        self.infer, self.model, self.tensors = infer, model, tensors
        self.then = then
        self.cpu_s = 0.0

    def __await__(self) -> Generator[Any, Any, Tensors]:
        cpu = time.thread_time()
        try:
            steps = self.infer(self.model, self.tensors).__await__()
        except BaseException:
            self._sent()
            raise
        finally:
            self.cpu_s += time.thread_time() - cpu
        step: Callable[[Any], Any] = steps.send
        value: Any = None
        while True:
            cpu = time.thread_time()
            try:
                yielded = step(value)
            except StopIteration as done:
                return cast(Tensors, done.value)
            finally:
                self.cpu_s += time.thread_time() - cpu
                self._sent()
            try:
                value, step = (yield yielded), steps.send
            except GeneratorExit:
                close = getattr(steps, "close", None)
                if close is not None:
                    close()
                raise
            except BaseException as exc:  # thrown in (a cancellation): the call handles it
                value, step = exc, steps.throw

    def _sent(self) -> None:
        then, self.then = self.then, None
        if then is not None:
            cpu = time.thread_time()
            try:
                then()
            finally:
                self.cpu_s += time.thread_time() - cpu


class PipelineRouter:
    """A pipeline endpoint's engine; the protocol frontends call `submit`."""

    def __init__(
        self,
        spec: PipelineSpec,
        pools: Mapping[str, Sequence[Replica]],
        max_batch_sizes: Mapping[str, int],
        slo_ms: float | None = None,
        max_queue: int = 2000,
        seed: int = 0,
        arrivals_kept_s: float = ARRIVALS_KEPT_S,
    ) -> None:
        self.name = spec.name
        self.spec = spec
        self.slo_ms = slo_ms if slo_ms is not None else spec.slo_ms
        self.max_queue = max_queue
        order = spec.topological_order()
        self._order = order
        self._index = {s.name: i for i, s in enumerate(order)}
        self._parents = [tuple(self._index[p] for p in s.after) for s in order]
        self._children = [tuple(j for j, t in enumerate(order) if i in self._parents[j]) for i in range(len(order))]
        self._ancestors = _ancestors(self._parents)
        self._routes: list[Route | None] = [resolve_route(s.route, s.name) if s.route else None for s in order]
        self._probabilities = [s.probability for s in order]
        missing = [s.name for s in order if not pools.get(s.name)]
        if missing:
            raise InferlineError(f"stage(s) {missing} have no replicas", "give every stage at least one replica")
        self._stages = [
            _Stage(i, s.name, pools[s.name][0].adapter.model_info(pools[s.name][0].model), max_batch_sizes[s.name])
            for i, s in enumerate(order)
        ]
        # Fixed for the router's life; `submit` reads them for every query.
        self._entry = tuple(i for i in range(len(order)) if not self._parents[i])
        self._input_specs = self._entry_input_specs()
        self._check_wiring()
        self._pools = {s.name: list(pools[s.name]) for s in order}
        self._lock = threading.Lock()
        self._rng = np.random.default_rng(seed)
        self._ids = itertools.count()
        self._inflight = 0
        self._crowding = CallCrowding([s.name for s in order])
        """Replica calls under way across all stages: how many models compute at once."""
        self._arrivals: collections.deque[float] = collections.deque()
        self._arrivals_kept_s = arrivals_kept_s
        self._started = self._stopped = self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.loop_thread: LoopThread | None = None
        """The router's own event loop, where it made one (see `start`)."""
        self.metrics_registry = CollectorRegistry()
        self._metrics = _RouterMetrics(self.metrics_registry, self)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> PipelineRouter:
        """Start every replica. Those whose adapter infers on an event loop run as coroutines on
        `loop` where given (a running loop of the caller's, e.g. a load generator's), else on an event
        loop thread of the router's own (`loop_thread`), which its frontends should share so that
        queries and answers never change threads. A router starts once."""
        if self._started or self._stopped:
            raise InferlineError(f"pipeline {self.name!r}: the router was started already", "make a new router")
        if loop is None:
            self.loop_thread = LoopThread(f"inferline-router-{self.name}")
            # An adapter whose `infer_async` runs a blocking client in the loop's executor (Triton's over
            # gRPC only) needs a thread per replica there: the default has min(32, cores + 4).
            self.loop_thread.loop.set_default_executor(ThreadPoolExecutor(256, "inferline-replica-call"))
            loop = self.loop_thread.loop
        self._loop = loop
        for stage in self._stages:
            for replica in self._pools[stage.name]:
                self._add_worker(stage, replica)
        self._started = True
        loop.call_soon_threadsafe(self._probe_loop_lag, None)
        return self

    def _probe_loop_lag(self, due: float | None) -> None:
        """On the loop: how late this timer ran (the loop was busy with other work: frontends,
        replicas' requests and answers), then the next one; ends once the router stops."""
        if self._stopping or self._loop is None:
            return
        now = self._loop.time()
        if due is not None:
            self._metrics.loop_lag.observe(max(0.0, now - due))
        self._loop.call_later(LOOP_LAG_PROBE_S, self._probe_loop_lag, now + LOOP_LAG_PROBE_S)

    def stop(self) -> None:
        """Stop the replicas once their batches under way end (called on the loop its coroutine
        replicas run on, a caller's, it cancels them instead), then fail the queries still queued:
        every query ends once. Stop frontends that share the router's loop before it."""
        on_loop = self._loop is not None and _running_loop() is self._loop
        if on_loop and self.loop_thread is not None:
            raise InferlineError(
                f"pipeline {self.name!r}: the router cannot stop from its own event loop", "stop it from another thread"
            )
        self._stopping = True
        for stage in self._stages:
            with stage.cond:
                for w in stage.workers:
                    w.stopping = True
                stage.take_idle(everyone=True)
        deadline = time.monotonic() + STOP_WAIT_S
        coroutines = []
        for stage in self._stages:
            for w in stage.workers:
                w.wake()
                if w.thread is not None and not on_loop:  # never block the loop on a thread
                    w.thread.join(timeout=max(0.0, deadline - time.monotonic()))
                elif w.done is not None:
                    coroutines.append(w)
        if on_loop:
            for w in coroutines:
                w.cancel()
        elif self._loop is not None and self._loop.is_running():
            wait_for_futures([w.done for w in coroutines if w.done], timeout=max(0.0, deadline - time.monotonic()))
        for stage in self._stages:
            with stage.cond:
                left = list(stage.items)
                stage.items.clear()
                stage.workers.clear()
            self._fail(left, "the router stopped")
        if self.loop_thread is not None:
            self.loop_thread.close()
            self.loop_thread = None
        self._started, self._stopped = False, True

    def ready(self) -> bool:
        return self._started and all(any(w.healthy for w in s.workers) for s in self._stages)

    # -- replicas (the live tuner's actuator calls these) ----------------------------------
    def add_replica(self, stage_name: str, replica: Replica) -> None:
        stage = self._stages[self._index[stage_name]]
        self._add_worker(stage, replica)

    def set_max_batch(self, stage_name: str, max_batch: int) -> None:
        """Cap the stage's batches at `max_batch` from its next batch on (the servers must take it)."""
        stage = self._stages[self._index[stage_name]]
        with stage.cond:
            stage.max_batch = max_batch
            woken = stage.take_idle(everyone=True)
        for w in woken:
            w.wake()

    def remove_replica(self, stage_name: str) -> Replica | None:
        """Retire one replica of a stage once its current batch is done (never the last one): the one
        the simulators remove (`planner/closedloop.py`, `planner/shared_cores.py`), so that a live
        tuner's scale-down leaves the replicas they predict with."""
        stage = self._stages[self._index[stage_name]]
        with stage.cond:
            live = [w for w in stage.workers if not w.stopping]
            if len(live) <= 1:
                return None
            worker = min(live, key=_leaves_first)
            worker.stopping = True
            stage.workers.remove(worker)
            stage.idle.pop(worker, None)
            stage.cond.notify_all()
        worker.wake()
        return worker.replica

    def _add_worker(self, stage: _Stage, replica: Replica) -> None:
        assert self._loop is not None, "start() first"
        worker = _Worker(self, stage, replica)
        with stage.cond:
            stage.workers.append(worker)
        infer = getattr(replica.adapter, "infer_async", None)
        if infer is not None:
            worker.start_on(self._loop, infer)
        else:
            worker.start_thread()

    # -- queries ---------------------------------------------------------------------------
    def input_specs(self) -> tuple[TensorSpec, ...]:
        return self._input_specs

    def _entry_input_specs(self) -> tuple[TensorSpec, ...]:
        seen: dict[str, TensorSpec] = {}
        for i in self._entry:
            for t in self._stages[i].info.inputs:
                seen.setdefault(t.name, t)
        return tuple(seen.values())

    def output_specs(self) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(f"{s.name}.{t.name}", t.dtype, t.shape) for s in self._stages for t in s.info.outputs)

    def submit(self, inputs: Mapping[str, NDArray[np.generic]]) -> Future[QueryResult]:
        tensors = self._validated(inputs)
        future: Future[QueryResult] = Future()
        future.set_running_or_notify_cancel()
        now = time.perf_counter()
        with self._lock:
            if self._stopping:
                raise InferlineError(f"pipeline {self.name!r} is stopping", "send the query to a running router")
            if self._inflight >= self.max_queue:
                self._metrics.rejected.inc()
                raise Overloaded(
                    f"pipeline {self.name!r} has {self._inflight} queries in flight (limit {self.max_queue})",
                    "retry later or scale the pipeline",
                )
            self._inflight += 1
            self._arrivals.append(now)
            while self._arrivals[0] < now - self._arrivals_kept_s:  # bounded also when no tuner reads them
                self._arrivals.popleft()
            query = _Query(next(self._ids), now, tensors, future, [PENDING] * len(self._stages))
            for i in self._entry:
                query.state[i] = QUEUED
        self._metrics.queries.inc()
        for i in self._entry:
            self._enqueue(i, query, {t.name: tensors[t.name] for t in self._stages[i].info.inputs})
        return future

    def _validated(self, inputs: Mapping[str, NDArray[np.generic]]) -> Tensors:
        specs = {t.name: t for t in self._input_specs}
        missing = sorted(set(specs) - set(inputs))
        unknown = sorted(set(inputs) - set(specs))
        if missing or unknown:
            raise InvalidQuery(
                f"pipeline {self.name!r} expects inputs {sorted(specs)}; missing {missing}, unknown {unknown}"
            )
        out: Tensors = {}
        for name, spec in specs.items():
            array = np.asarray(inputs[name])
            want = (1, *spec.shape)
            if array.ndim != len(want) or any(w not in (-1, a) for w, a in zip(want, array.shape, strict=True)):
                raise InvalidQuery(f"input {name!r} has shape {list(array.shape)}, expected {list(want)}")
            out[name] = array.astype(np.dtype(spec.dtype), copy=False)
        return out

    def _enqueue(self, index: int, query: _Query, inputs: Tensors) -> None:
        stage = self._stages[index]
        with stage.cond:
            if self._stopping:  # its queue was emptied already: nobody would serve it
                woken = None
            else:
                stage.items.append(_Item(query, inputs))
                stage.arrivals += 1
                woken = stage.take_idle(everyone=False)
        if woken is None:
            self._fail([_Item(query, inputs)], "the router stopped")
            return
        for w in woken:
            w.wake()

    def _stage_done(self, query: _Query, index: int, outputs: Tensors) -> None:
        ready: list[tuple[int, Tensors]] = []
        with self._lock:
            query.outputs[index] = outputs
            query.state[index] = DONE
            self._resolve(query, index, ready)
            finished = all(s in (DONE, SKIPPED) for s in query.state)
        for child, inputs in ready:
            self._enqueue(child, query, inputs)
        if finished:
            self._answer(query)

    def _resolve(self, query: _Query, index: int, ready: list[tuple[int, Tensors]]) -> None:
        """Decide the children whose parents are all done or skipped (called under the lock)."""
        for child in self._children[index]:
            if query.state[child] != PENDING:
                continue
            parents = self._parents[child]
            if any(query.state[p] not in (DONE, SKIPPED) for p in parents):
                continue
            visited = [p for p in parents if query.state[p] == DONE]
            available = {k: v for p in visited for k, v in query.outputs[p].items()}
            if visited and self._decide(child, available):
                query.state[child] = QUEUED
                ready.append((child, self._inputs_for(query, child)))
            else:
                query.state[child] = SKIPPED
                self._resolve(query, child, ready)

    def _inputs_for(self, query: _Query, child: int) -> Tensors:
        """A stage's inputs: from its parents' outputs (by name, else by shape), else from its other
        ancestors' outputs or the query's own inputs (e.g. a cascade's second classifier reading the
        preprocessed image that its parent, the first classifier, consumed)."""
        info = self._stages[child].info
        wider = dict(query.inputs)
        for a in self._ancestors[child]:
            wider.update(query.outputs.get(a, {}))
        parents = {k: v for p in self._parents[child] for k, v in query.outputs.get(p, {}).items()}
        return feed_inputs(info, parents, feed_inputs(info, wider, {}))

    def _decide(self, child: int, available: Tensors) -> bool:
        route = self._routes[child]
        if route is not None:
            return bool(route({k: v[0] for k, v in available.items()}))
        return bool(self._rng.random() < self._probabilities[child])

    def _answer(self, query: _Query) -> None:
        latency_ms = (time.perf_counter() - query.arrived) * 1000.0
        outputs = {f"{self._stages[i].name}.{k}": v for i in sorted(query.outputs) for k, v in query.outputs[i].items()}
        visited = tuple(self._stages[i].name for i in sorted(query.outputs))
        with self._lock:
            if query.ended:  # a parallel branch failed it already
                return
            query.ended = True
            self._inflight -= 1
        self._metrics.observe(latency_ms, self.slo_ms)
        query.future.set_result(QueryResult(outputs, visited, latency_ms))

    def _fail(self, items: Sequence[_Item], reason: str) -> None:
        for item in items:
            with self._lock:
                if item.query.ended:
                    continue
                item.query.ended = True
                self._inflight -= 1
            self._metrics.errors.labels(kind="failed").inc()
            item.query.future.set_exception(QueryFailed(reason))

    def _retry(self, stage: _Stage, batch: list[_Item], exc: ServerError) -> None:
        log.warning("stage %s: a replica stopped answering (%s); retrying its batch", stage.name, exc.message)
        retry = [item for item in batch if item.attempts + 1 < MAX_ATTEMPTS]
        give_up = [item for item in batch if item.attempts + 1 >= MAX_ATTEMPTS]
        with stage.cond:
            alive = any(w.healthy and not w.stopping for w in stage.workers)
            woken = []
            if alive:
                for item in reversed(retry):
                    item.attempts += 1
                    item.queued_at = time.perf_counter()
                    stage.items.appendleft(item)  # FIFO: the oldest queries go first again
                woken = stage.take_idle(everyone=True)
        for w in woken:
            w.wake()
        if not alive:
            give_up = batch
        self._fail(give_up, f"stage {stage.name!r}: no replica could serve the query ({exc.message})")

    # -- observation (metrics, the live tuner) -----------------------------------------------
    def snapshot(self) -> tuple[StageSnapshot, ...]:
        out = []
        for stage in self._stages:
            with stage.cond:
                live = [w for w in stage.workers if not w.stopping]
                out.append(
                    StageSnapshot(
                        stage.name, len(stage.items), stage.in_flight, len(live),
                        sum(1 for w in live if w.healthy), stage.busy_s, stage.arrivals,
                    )
                )  # fmt: skip
        return tuple(out)

    def arrivals_since(self, since: float) -> NDArray[np.float64]:
        """Arrival times (time.perf_counter seconds) after `since`; older ones are dropped."""
        with self._lock:
            while self._arrivals and self._arrivals[0] < since:
                self._arrivals.popleft()
            return np.fromiter(self._arrivals, dtype=np.float64)

    def batch_sizes(self) -> dict[str, dict[int, int]]:
        """Batches sent per stage by size: what the plan's max batch size must bound."""
        return {s.name: dict(s.batch_sizes) for s in self._stages}

    def service_times_ms(self) -> dict[str, dict[int, float]]:
        """Mean call time per batch size and stage, as the router saw it (queueing excluded)."""
        return {s.name: {n: self._metrics.mean_call_ms(s.name, n) for n in sorted(s.batch_sizes)} for s in self._stages}

    def dispatch_ms(self) -> dict[str, float]:
        """Mean time per stage between back-to-back calls of a replica (NaN before any): what the
        router adds to each batch's service time beyond the call itself."""
        return {s.name: self._metrics.mean_dispatch_ms(s.name) for s in self._stages}

    def _call_started(self, stage: str, after_idle: bool, now: float) -> CallToken:
        call = self._crowding.started(after_idle, now)
        self._metrics.observe_concurrency(stage, call.under_way)
        return call

    def _check_wiring(self) -> None:
        """Every non-entry stage's inputs must come from its parents' outputs (by name or shape)."""
        for i, stage in enumerate(self._stages):
            if not self._parents[i]:
                continue

            def zeros(specs: Sequence[TensorSpec]) -> Tensors:
                return {t.name: np.zeros((1, *(d if d > 0 else 1 for d in t.shape)), dtype=t.dtype) for t in specs}

            wider = zeros([*self.input_specs(), *(t for a in self._ancestors[i] for t in self._stages[a].info.outputs)])
            parents = zeros([t for p in self._parents[i] for t in self._stages[p].info.outputs])
            fed = feed_inputs(stage.info, parents, feed_inputs(stage.info, wider, {}))
            missing = [t.name for t in stage.info.inputs if t.name not in fed]
            if missing:
                raise InferlineError(
                    f"stage {stage.name!r} needs input(s) {missing} that neither the query nor its ancestors "
                    f"{[self._stages[a].name for a in self._ancestors[i]]} provide",
                    "name the parent's output like the child's input, or give them a single matching shape",
                )


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _ancestors(parents: Sequence[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """Per stage (topological order), its ancestors, farthest first."""
    out: list[tuple[int, ...]] = []
    for ps in parents:
        seen: dict[int, None] = {}
        for p in ps:
            for a in (*out[p], p):
                seen.setdefault(a)
        out.append(tuple(sorted(seen)))
    return out


class _RouterMetrics:
    def __init__(self, registry: CollectorRegistry, router: PipelineRouter) -> None:
        self.registry = registry
        self.queries = Counter("inferline_router_queries", "Queries admitted", registry=registry)
        self.rejected = Counter("inferline_router_rejected", "Queries refused as overload", registry=registry)
        self.answered = Counter("inferline_router_answered", "Queries answered", registry=registry)
        self.errors = Counter("inferline_router_errors", "Queries failed", ["kind"], registry=registry)
        self.slo_misses = Counter("inferline_router_slo_misses", "Answered queries over the SLO", registry=registry)
        self.latency = Histogram(
            "inferline_router_latency_seconds",
            "End-to-end query latency",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0),
            registry=registry,
        )
        self.batch_size = Histogram(
            "inferline_router_batch_size",
            "Queries per batch sent to a replica",
            ["stage"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=registry,
        )
        self.call_seconds = Histogram(
            "inferline_router_call_seconds",
            "Time of a replica call by batch size: live service times and their spread, to set against the profiles",
            ["stage", "batch_size"],
            buckets=CALL_SECONDS_BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            "inferline_router_queue_wait_seconds",
            "Time a query waited in a stage's queue, from joining it to its batch's call starting: where "
            "the pipeline's latency grows under bursts, stage by stage",
            ["stage"],
            buckets=QUEUE_WAIT_BUCKETS,
            registry=registry,
        )
        self.concurrent_calls = Histogram(
            "inferline_router_concurrent_calls",
            "Replica calls under way in the whole pipeline when a call of this stage starts, itself included: "
            "where it exceeds the cores the replicas run on, they compute at once and slow each other down",
            ["stage"],
            buckets=(*range(1, 17), 24, 32, 64),  # every count up to 16: calibration reads the counts
            registry=registry,
        )
        self.replica_cpu = Counter(
            "inferline_router_replica_cpu_seconds",
            "CPU of the router's replicas serving batches (forming them, the call's client side, handing "
            "results on; on an event loop, only the replicas' own steps): the router's CPU that live "
            "service times already hold",
            ["stage"],
            registry=registry,
        )
        self.dispatch_seconds = Summary(
            "inferline_router_dispatch_seconds",
            "Time a replica spends between two back-to-back calls on the router's own work (handing "
            "results on, forming the next batch): part of the service time the stage's queue sees",
            ["stage"],
            registry=registry,
        )
        self.idle_gap = Histogram(
            "inferline_router_idle_gap_seconds",
            "Time from a replica's last call's end to its next call's start where the replica sat idle in "
            "between (not back to back): a call after a longer gap can take longer while the server's "
            "threads wake up (a profile's after_idle term)",
            ["stage"],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 5.0),
            registry=registry,
        )
        self.loop_lag = Histogram(
            "inferline_router_loop_lag_seconds",
            "How late the router's event loop ran a timer (sampled every 50 ms): the wait of any work on "
            "it (a request read, a replica's answer) behind other work; the router runs on one thread",
            buckets=(0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5),
            registry=registry,
        )
        registry.register(_MachineCpuSinceStart())
        registry.register(CrowdingCollector(router._crowding, [s.name for s in router.spec.stages]))
        queue = Gauge("inferline_router_queue_length", "Queries waiting per stage", ["stage"], registry=registry)
        replicas = Gauge("inferline_router_replicas", "Live replicas per stage", ["stage"], registry=registry)
        for name in (s.name for s in router.spec.stages):
            self.idle_gap.labels(
                stage=name
            )  # present from the start: calibration tells "none idle" from "not measured"
            queue.labels(stage=name).set_function(_snapshot_field(router, name, "queue_length"))
            replicas.labels(stage=name).set_function(_snapshot_field(router, name, "replicas"))

    def observe_batch(self, stage: str, size: int, call_s: float) -> None:
        self.batch_size.labels(stage=stage).observe(size)
        self.call_seconds.labels(stage=stage, batch_size=str(size)).observe(call_s)

    def observe_replica_cpu(self, stage: str, seconds: float) -> None:
        self.replica_cpu.labels(stage=stage).inc(seconds)

    def observe_concurrency(self, stage: str, calls: int) -> None:
        self.concurrent_calls.labels(stage=stage).observe(calls)

    def observe_idle_gap(self, stage: str, seconds: float) -> None:
        self.idle_gap.labels(stage=stage).observe(seconds)

    def observe_queue_waits(self, stage: str, waits_s: list[float]) -> None:
        waited = self.queue_wait.labels(stage=stage)
        for seconds in waits_s:
            waited.observe(seconds)

    def observe_dispatch(self, stage: str, seconds: float) -> None:
        self.dispatch_seconds.labels(stage=stage).observe(seconds)

    def mean_dispatch_ms(self, stage: str) -> float:
        return self._mean_ms("inferline_router_dispatch_seconds", {"stage": stage})

    def mean_call_ms(self, stage: str, size: int) -> float:
        return self._mean_ms("inferline_router_call_seconds", {"stage": stage, "batch_size": str(size)})

    def _mean_ms(self, summary: str, labels: dict[str, str]) -> float:
        """A summary's mean in ms (NaN before any observation)."""
        total = self.registry.get_sample_value(f"{summary}_sum", labels) or 0.0
        count = self.registry.get_sample_value(f"{summary}_count", labels) or 0.0
        return 1000.0 * total / count if count else float("nan")

    def observe(self, latency_ms: float, slo_ms: float | None) -> None:
        self.answered.inc()
        self.latency.observe(latency_ms / 1000.0)
        if slo_ms is not None and latency_ms > slo_ms:
            self.slo_misses.inc()


class _MachineCpuSinceStart(Collector):
    """The machine's CPU time since the router started, and the hypervisor's steal among it, read at
    each scrape: calibration tells from it whether the calls it rewrites profiles from ran on a
    machine whose hypervisor took part of its CPU away (absent where /proc/stat cannot tell)."""

    def __init__(self) -> None:
        self._start, self._created = machine_cpu(), time.time()

    def collect(self) -> Generator[CounterMetricFamily, None, None]:
        now, start = machine_cpu(), self._start
        if start is None or now is None:
            return
        family = CounterMetricFamily(
            "inferline_router_machine_cpu_seconds",
            "CPU time of the router's machine since the router started, summed over its cores: all of it, "
            "and the part its hypervisor gave to others while this machine wanted to run (steal)",
            labels=["mode"],
        )
        family.add_metric(["all"], now.all_s - start.all_s, created=self._created)
        family.add_metric(["steal"], now.steal_s - start.steal_s, created=self._created)
        yield family


def _snapshot_field(router: PipelineRouter, stage: str, name: str) -> Callable[[], float]:
    def read() -> float:
        for snap in router.snapshot():
            if snap.name == stage:
                return float(getattr(snap, name))
        return 0.0

    return read
