"""The router's replicas, either kind: a coroutine on an event loop (an adapter with `infer_async`)
or a thread (the others). Both keep the reference semantics: batches up to the stage's maximum from
one FIFO queue, a batch handed on when its server stops answering, scaling, and every query ending
exactly once."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray
from prometheus_client import generate_latest

from inferline.adapters.base import ModelInfo, TensorSpec
from inferline.calibration import replica_cpu_s
from inferline.errors import InferlineError, ServerError, ServerUnreachable
from inferline.router.core import PipelineRouter, QueryFailed, QueryResult, Replica, _leaves_first
from inferline.router.http_frontend import serve_http
from tests.unit.test_calibration import SPEC, SleepingServer, Tensors, outputs

QUERY = {"INPUT": np.zeros((1, 4), np.float32)}


class Counting(SleepingServer):
    """A thread replica's server that counts its calls and the batch sizes it was sent."""

    def __init__(self, delay_s: float = 0.002) -> None:
        super().__init__(delay_s)
        self.sizes: list[int] = []
        self.closed = False

    def close(self) -> None:
        self.closed = True

    def infer(self, model: str, inputs: Mapping[str, NDArray[np.generic]]) -> Tensors:
        self.sizes.append(next(iter(inputs.values())).shape[0])
        return super().infer(model, inputs)


class AsyncCounting(Counting):
    """The same server for a coroutine replica: it waits on the loop instead of blocking a thread."""

    async def infer_async(self, model: str, inputs: Mapping[str, NDArray[np.generic]]) -> Tensors:
        self.sizes.append(next(iter(inputs.values())).shape[0])
        await asyncio.sleep(self.delay_s)
        return outputs(model, inputs)


KINDS: dict[str, Callable[..., Counting]] = {"thread": Counting, "coroutine": AsyncCounting}


@pytest.fixture(params=sorted(KINDS))
def server(request: pytest.FixtureRequest) -> Callable[..., Counting]:
    return KINDS[request.param]


def router(pools: dict[str, list[Counting]], max_batch: int = 4) -> PipelineRouter:
    replicas = {s: [Replica(srv, s, f"{s}-{i}") for i, srv in enumerate(servers)] for s, servers in pools.items()}
    return PipelineRouter(SPEC, replicas, {"a": max_batch, "b": max_batch})  # type: ignore[arg-type]


def ends(futures: list[Future[QueryResult]]) -> tuple[int, list[str]]:
    """(answered, failure messages) once every query ended."""
    answered, failed = 0, []
    for f in futures:
        exc = f.exception(timeout=30)
        if exc is None:
            answered += 1
        else:
            assert isinstance(exc, QueryFailed), exc
            failed.append(str(exc))
    return answered, failed


def test_a_burst_is_served_in_batches_up_to_the_maximum(server: Callable[..., Counting]) -> None:
    a, b = [server(), server()], [server()]
    r = router({"a": a, "b": b}).start()
    try:
        assert ends([r.submit(QUERY) for _ in range(120)]) == (120, [])
    finally:
        r.stop()
    for srv in (*a, *b):
        assert srv.sizes and max(srv.sizes) <= 4
    assert sum(s for srv in a for s in srv.sizes) == 120 == sum(b[0].sizes)
    assert max(b[0].sizes) == 4  # 120 queued at once: the queue fills batches, greedily


class Dead(Counting):
    """A server that stopped answering: every call is refused, and it never becomes ready."""

    def infer(self, model: str, inputs: Mapping[str, NDArray[np.generic]]) -> Tensors:
        self.sizes.append(next(iter(inputs.values())).shape[0])
        raise ServerUnreachable("connection refused")

    def is_ready(self) -> bool:
        return False


class AsyncDead(Dead):
    async def infer_async(self, model: str, inputs: Mapping[str, NDArray[np.generic]]) -> Tensors:
        return self.infer(model, inputs)


def test_a_batch_whose_server_stopped_answering_goes_to_another_replica(server: Callable[..., Counting]) -> None:
    dead = AsyncDead() if server is AsyncCounting else Dead()
    alive = server()
    r = router({"a": [dead, alive], "b": [server()]}).start()
    try:
        assert ends([r.submit(QUERY) for _ in range(60)]) == (60, [])
        a = r.snapshot()[0]
    finally:
        r.stop()
    assert dead.sizes  # it was tried ...
    assert sum(alive.sizes) == 60  # ... and every query it held was served by the other
    assert (a.replicas, a.ready_replicas) == (2, 1)


def test_stop_fails_the_queued_queries_and_every_query_ends_once(server: Callable[..., Counting]) -> None:
    r = router({"a": [server(0.05)], "b": [server(0.05)]}, max_batch=1).start()
    futures = [r.submit(QUERY) for _ in range(20)]
    time.sleep(0.02)
    r.stop()
    answered, failed = ends(futures)
    assert answered + len(failed) == 20
    assert len(failed) >= 15 and all("the router stopped" in m for m in failed)


def test_scaling_a_stage_while_it_serves(server: Callable[..., Counting]) -> None:
    first, second, third = server(), server(), server()
    r = router({"a": [first, second], "b": [server()]}).start()
    try:
        assert ends([r.submit(QUERY) for _ in range(40)]) == (40, [])
        removed = r.remove_replica("a")
        assert removed is not None and removed.adapter in (first, second)  # both idle: the one idle longest
        if removed.adapter is first:
            first, second = second, first  # `second` is the one retired
        assert r.remove_replica("a") is None  # never the last one
        served_before = len(second.sizes)
        assert ends([r.submit(QUERY) for _ in range(40)]) == (40, [])
        assert len(second.sizes) == served_before  # retired: no batch since ...
        assert second.closed  # ... and its adapter closed
        assert not first.closed
        r.add_replica("a", Replica(third, "a", "a-2"))
        r.set_max_batch("a", 8)
        assert ends([r.submit(QUERY) for _ in range(120)]) == (120, [])
        replicas = r.snapshot()[0].replicas
    finally:
        r.stop()
    assert third.sizes  # the new replica took work
    assert max(first.sizes[-10:] + third.sizes) > 4  # the larger cap applies to the next batches
    assert replicas == 2


def test_thread_and_coroutine_replicas_share_one_stage_queue() -> None:
    thread, coroutine = Counting(0.005), AsyncCounting(0.005)
    r = router({"a": [thread, coroutine], "b": [AsyncCounting()]}).start()
    try:
        assert ends([r.submit(QUERY) for _ in range(100)]) == (100, [])
    finally:
        r.stop()
    assert thread.sizes and coroutine.sizes
    assert sum(thread.sizes) + sum(coroutine.sizes) == 100


def test_coroutine_replicas_can_run_on_the_callers_loop() -> None:
    a, b = AsyncCounting(), AsyncCounting()
    r = router({"a": [a], "b": [b]})

    async def serve(n: int) -> int:
        r.start(asyncio.get_running_loop())
        assert r.loop_thread is None  # no loop of the router's own
        try:
            done = await asyncio.gather(*(asyncio.wrap_future(r.submit(QUERY)) for _ in range(n)))
            return len(done)
        finally:
            r.stop()

    assert asyncio.run(serve(30)) == 30
    assert r.snapshot()[0].replicas == 0  # stopped
    assert a.closed and b.closed  # the router closed its replicas' adapters
    with pytest.raises(InferlineError, match="started already"):
        r.start()


def test_stop_on_the_routers_own_loop_cancels_calls_under_way_and_fails_their_queries() -> None:
    slow = AsyncCounting(5.0)
    r = router({"a": [slow], "b": [AsyncCounting()]}, max_batch=2)

    async def run() -> list[Future[QueryResult]]:
        r.start(asyncio.get_running_loop())
        futures = [r.submit(QUERY) for _ in range(5)]
        await asyncio.sleep(0.05)  # a batch of 2 is under way, 3 queries wait
        r.stop()
        await asyncio.sleep(0.05)  # the cancelled call ends its batch
        return futures

    started = time.perf_counter()
    answered, failed = ends(asyncio.run(run()))
    assert time.perf_counter() - started < 2.0  # nobody waited for the 5 s call
    assert slow.sizes == [2]
    assert (answered, len(failed)) == (0, 5)
    assert all("the router stopped" in m for m in failed)


class AsyncBurning(AsyncCounting):
    """Computes for 2 ms of CPU on the loop per call, then waits for its server."""

    async def infer_async(self, model: str, inputs: Mapping[str, NDArray[np.generic]]) -> Tensors:
        end = time.thread_time() + 0.002
        while time.thread_time() < end:
            pass
        await asyncio.sleep(0.005)
        return outputs(model, inputs)


def test_a_coroutine_replicas_cpu_is_its_own_not_the_loops_other_work() -> None:
    """While the replicas wait, another coroutine on the same loop computes 3 ms at a time: the router
    counts only what its replicas' own steps cost (each call's 2 ms and the work around it)."""
    r = router({"a": [AsyncBurning()], "b": [AsyncBurning()]}, max_batch=1)

    async def run() -> int:
        r.start(asyncio.get_running_loop())
        done = False

        async def other_work() -> None:
            while not done:
                end = time.thread_time() + 0.003
                while time.thread_time() < end:
                    pass
                await asyncio.sleep(0)

        burner = asyncio.create_task(other_work())
        try:
            for f in [r.submit(QUERY) for _ in range(30)]:
                await asyncio.wrap_future(f)
        finally:
            done = True
            await burner
            r.stop()
        return sum(sum(sizes.values()) for sizes in r.batch_sizes().values())

    calls = asyncio.run(run())
    cpu = replica_cpu_s(generate_latest(r.metrics_registry).decode())
    assert cpu is not None and calls == 60
    assert 0.002 * calls <= cpu < 0.0035 * calls  # counting the other work would add >= 3 ms a call


def test_frontends_on_the_routers_loop_stop_without_stopping_it() -> None:
    r = router({"a": [AsyncCounting()], "b": [AsyncCounting()]}).start()
    try:
        assert r.loop_thread is not None
        frontend = serve_http(r, loop=r.loop_thread)  # type: ignore[arg-type]
        body = {"inputs": [{"name": "INPUT", "shape": [1, 4], "datatype": "FP32", "data": [0.0] * 4}]}
        request = urllib.request.Request(
            f"{frontend.url}/v2/models/p/infer", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as reply:
            answer = json.load(reply)
        threads = {t.name for t in threading.enumerate()}
        frontend.stop()
        assert r.submit(QUERY).result(timeout=10).visited == ("a", "b")  # the router's loop still runs
    finally:
        r.stop()
    assert {o["name"] for o in answer["outputs"]} == {"a.FEAT", "b.OUT"}
    assert "inferline-http-frontend" not in threads  # it served on the router's loop thread
    assert r.loop_thread is None


def test_a_batch_that_ends_after_stop_fails_its_next_stage_instead_of_waiting_forever() -> None:
    """Stopped on its loop, the router does not wait for a thread replica's call: when that call
    ends, the query's next stage has no queue left to wait in, and the query fails."""
    r = router({"a": [Counting(0.3)], "b": [AsyncCounting()]})

    async def run() -> Future[QueryResult]:
        r.start(asyncio.get_running_loop())
        future = r.submit(QUERY)
        await asyncio.sleep(0.05)  # stage a's call is under way
        r.stop()
        with pytest.raises(InferlineError, match="stopping"):
            r.submit(QUERY)
        return future

    future = asyncio.run(run())
    exc = future.exception(timeout=5)
    assert isinstance(exc, QueryFailed) and "the router stopped" in str(exc)


def test_the_router_refuses_to_stop_from_its_own_loop() -> None:
    r = router({"a": [AsyncCounting()], "b": [AsyncCounting()]}).start()
    try:

        async def stop() -> None:
            r.stop()

        assert r.loop_thread is not None
        with pytest.raises(InferlineError, match="own event loop"):
            r.loop_thread.call(stop())
        assert r.submit(QUERY).result(timeout=10).visited == ("a", "b")  # still serving
    finally:
        r.stop()


class Variable(AsyncCounting):
    """A model whose INPUT has a variable length: queries of different lengths cannot share a batch."""

    def model_info(self, model: str) -> ModelInfo:
        info = super().model_info(model)
        if model != "a":
            return info
        return ModelInfo(model, True, info.config, (TensorSpec("INPUT", "float32", (-1,)),), info.outputs)


def test_queries_that_cannot_form_one_batch_fail_and_the_replica_serves_on() -> None:
    r = router({"a": [Variable(0.05)], "b": [AsyncCounting()]}, max_batch=2).start()
    try:
        first = r.submit({"INPUT": np.zeros((1, 4), np.float32)})  # alone in its batch
        time.sleep(0.01)
        odd = [r.submit({"INPUT": np.zeros((1, n), np.float32)}) for n in (3, 5)]  # one batch, two lengths
        answered, failed = ends([first, *odd])
        later = r.submit({"INPUT": np.zeros((1, 4), np.float32)}).result(timeout=10)
    finally:
        r.stop()
    assert answered == 1 and len(failed) == 2
    assert all("cannot form one batch" in m for m in failed)
    assert later.visited == ("a", "b")


def test_a_replica_woken_for_a_query_as_it_retires_leaves_the_query_to_the_others() -> None:
    """A query wakes the only idle replica, which a scale-down retires in the same instant (it is
    not busy yet): the query is still served, by the busy one once its call is done."""
    a1, a2 = AsyncCounting(0.2), AsyncCounting(0.2)
    r = router({"a": [a1, a2], "b": [AsyncCounting()]}, max_batch=1)

    async def run() -> list[QueryResult]:
        r.start(asyncio.get_running_loop())
        await asyncio.sleep(0.05)  # both idle
        try:
            first = r.submit(QUERY)  # the newest idle replica (a2) takes it
            await asyncio.sleep(0.05)
            second = r.submit(QUERY)  # wakes a1 ...
            removed = r.remove_replica("a")  # ... which retires before it runs
            assert removed is not None and removed.adapter is a1
            return [await asyncio.wait_for(asyncio.wrap_future(f), timeout=5) for f in (first, second)]
        finally:
            r.stop()

    assert [q.visited for q in asyncio.run(run())] == [("a", "b")] * 2
    assert a1.sizes == [] and a2.sizes == [1, 1]


def test_a_scale_down_retires_an_idle_replica_before_a_busy_one(server: Callable[..., Counting]) -> None:
    """As the simulators remove replicas: an idle one leaves at once, and the busy one keeps serving
    (the router used to retire its newest replica, busy or not)."""
    a1, a2 = server(0.3), server(0.3)
    r = router({"a": [a1, a2], "b": [server()]}, max_batch=1).start()
    try:
        time.sleep(0.05)
        query = r.submit(QUERY)
        deadline = time.monotonic() + 5.0
        while not a1.sizes and not a2.sizes:  # until one replica is busy with it
            assert time.monotonic() < deadline
            time.sleep(0.005)
        removed = r.remove_replica("a")
        assert removed is not None
        busy = a2 if removed.adapter is a1 else a1
        assert removed.adapter.sizes == [] and busy.sizes == [1]
        assert query.result(timeout=5).visited == ("a", "b")
        assert ends([r.submit(QUERY) for _ in range(3)]) == (3, [])
    finally:
        r.stop()
    assert busy.sizes == [1, 1, 1, 1] and removed.adapter.sizes == []


class Refusing(AsyncCounting):
    """Its server refuses calls while `refusing` (a ServerError: the replica stays healthy)."""

    refusing = False

    async def infer_async(self, model: str, inputs: Mapping[str, NDArray[np.generic]]) -> Tensors:
        if self.refusing:
            await asyncio.sleep(self.delay_s)
            raise ServerError("the model refused the batch")
        return await super().infer_async(model, inputs)


def test_a_replica_whose_last_call_failed_has_been_idle_only_since_then() -> None:
    """A failed call ends a replica's batch like an answer does: it is not taken for one never used."""
    a1, a2 = AsyncCounting(0.01), Refusing(0.05)
    r = router({"a": [a1, a2], "b": [AsyncCounting()]}, max_batch=1)

    async def run() -> Replica | None:
        r.start(asyncio.get_running_loop())
        await asyncio.sleep(0.05)
        try:
            for f in [r.submit(QUERY) for _ in range(2)]:  # the newest idle replica (a2) takes one, a1 the other
                await asyncio.wait_for(asyncio.wrap_future(f), timeout=5)
            a2.refusing = True  # a1 answered 40 ms before a2: a2, the newest idle, takes the next
            with pytest.raises(QueryFailed, match="refused"):
                await asyncio.wait_for(asyncio.wrap_future(r.submit(QUERY)), timeout=5)
            return r.remove_replica("a")
        finally:
            r.stop()

    removed = asyncio.run(run())
    assert a1.sizes == [1] and a2.sizes == [1]  # the refused call is not counted
    assert removed is not None and removed.adapter is a1


def test_which_replica_a_scale_down_retires_first() -> None:
    """One that cannot serve, then idle ones by how long they have been idle (never called first),
    then busy ones by when their batch was sent."""

    def worker(name: str, healthy: bool = True, busy_since: float | None = None, last_end: float | None = None) -> Any:
        return SimpleNamespace(name=name, healthy=healthy, busy_since=busy_since, free_since=last_end)

    workers = [
        worker("busy late", busy_since=9.0, last_end=None),
        worker("busy early", busy_since=5.0),
        worker("idle since 7", last_end=7.0),
        worker("idle since 3", last_end=3.0),
        worker("never called"),
        worker("unhealthy", healthy=False, last_end=8.0),
    ]
    order = [w.name for w in sorted(workers, key=_leaves_first)]
    assert order == ["unhealthy", "never called", "idle since 3", "idle since 7", "busy early", "busy late"]


def test_the_router_measures_how_late_its_event_loop_runs() -> None:
    """Work that holds the router's loop (here a blocking callback) delays everything else on it:
    the loop-lag histogram shows it."""
    r = router({"a": [AsyncCounting()], "b": [AsyncCounting()]}).start()
    try:
        time.sleep(0.3)  # a calm loop: its timers run about on time
        calm = r.metrics_registry.get_sample_value("inferline_router_loop_lag_seconds_bucket", {"le": "0.05"})
        assert r.loop_thread is not None
        r.loop_thread.loop.call_soon_threadsafe(time.sleep, 0.15)  # holds the loop for 150 ms
        time.sleep(0.4)
        read = r.metrics_registry.get_sample_value
        count = read("inferline_router_loop_lag_seconds_count")
        within_50ms = read("inferline_router_loop_lag_seconds_bucket", {"le": "0.05"})
    finally:
        r.stop()
    assert calm is not None and calm >= 3  # probed every 50 ms
    assert count is not None and within_50ms is not None
    assert count - within_50ms >= 1  # a timer ran 100+ ms late


def test_replicas_cancelled_with_their_loop_are_no_longer_ready() -> None:
    r = router({"a": [AsyncCounting()], "b": [AsyncCounting()]})

    async def run() -> None:
        r.start(asyncio.get_running_loop())
        await asyncio.wrap_future(r.submit(QUERY))
        assert r.ready()

    asyncio.run(run())  # ends without stopping the router: its loop cancels the replicas
    assert not r.ready()
    assert [s.ready_replicas for s in r.snapshot()] == [0, 0]
    r.stop()


class Recording(AsyncCounting):
    """Notes when each call is sent (its first step), for the order of sends and answers."""

    def __init__(self, events: list[str], delay_s: float) -> None:
        super().__init__(delay_s)
        self.events = events

    async def infer_async(self, model: str, inputs: Mapping[str, NDArray[np.generic]]) -> Tensors:
        self.events.append("sent")
        return await super().infer_async(model, inputs)


def test_a_coroutine_replica_sends_its_next_batch_before_passing_the_last_one_on() -> None:
    """Its server starts on the next batch first; the last batch's answers leave in the same loop turn."""
    events: list[str] = []
    r = router({"a": [AsyncCounting(0.0)], "b": [Recording(events, 0.05)]}, max_batch=1)

    async def serve() -> None:
        r.start(asyncio.get_running_loop())
        try:
            futures = [r.submit(QUERY) for _ in range(3)]
            for f in futures:  # a replica on this loop answers on its thread: the callback runs at once
                f.add_done_callback(lambda _: events.append("answered"))
            await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        finally:
            r.stop()

    asyncio.run(serve())
    assert events == ["sent", "sent", "answered", "sent", "answered", "answered"]
