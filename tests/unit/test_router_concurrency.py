"""The router's count of replica calls under way across the pipeline (`inferline_router_concurrent_calls`)."""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np
import pytest
from numpy.typing import NDArray
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from inferline.calibration import replica_cpu_s
from inferline.errors import ServerError
from inferline.router.core import PipelineRouter, Replica
from tests.unit.test_calibration import CALL_S, SPEC, SleepingServer, Tensors
from tests.unit.test_router_replicas import AsyncCounting

FAMILY = "inferline_router_concurrent_calls"


class FailingServer(SleepingServer):
    def infer(self, model: str, inputs: Mapping[str, NDArray[np.generic]]) -> dict[str, NDArray[np.generic]]:
        raise ServerError("the model failed")


class AsyncFailingServer(SleepingServer):
    async def infer_async(self, model: str, inputs: Mapping[str, NDArray[np.generic]]) -> Tensors:
        raise ServerError("the model failed")


KINDS = {"thread": (SleepingServer, FailingServer), "coroutine": (AsyncCounting, AsyncFailingServer)}


def _histogram(router: PipelineRouter) -> dict[str, dict[str, float]]:
    """Per stage: bucket upper bound ("le") -> cumulative count, plus "count"."""
    out: dict[str, dict[str, float]] = {}
    text = generate_latest(router.metrics_registry).decode()
    for family in text_string_to_metric_families(text):
        if family.name != FAMILY:
            continue
        for sample in family.samples:
            stage = out.setdefault(sample.labels["stage"], {})
            if sample.name.endswith("_bucket"):
                stage[sample.labels["le"]] = sample.value
            elif sample.name.endswith("_count"):
                stage["count"] = sample.value
    return out


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_calls_of_all_stages_are_counted_together_and_never_above_the_replicas(kind: str) -> None:
    sleeping = KINDS[kind][0]
    pools = {
        "a": [Replica(sleeping(), "a", "a-0"), Replica(sleeping(), "a", "a-1")],
        "b": [Replica(sleeping(), "b", "b-0")],
    }
    router = PipelineRouter(SPEC, pools, {"a": 2, "b": 2}).start()  # type: ignore[arg-type]
    try:
        for f in [router.submit({"INPUT": np.zeros((1, 4), np.float32)}) for _ in range(120)]:
            f.result(timeout=30)
        calls = {stage: sum(sizes.values()) for stage, sizes in router.batch_sizes().items()}
        seen = _histogram(router)
    finally:
        router.stop()
    for stage in ("a", "b"):
        assert seen[stage]["count"] == calls[stage]  # one observation per call
        assert seen[stage]["3.0"] == calls[stage]  # 3 replicas in all: never more calls at once
    # 120 queries queued at once: a's two replicas overlapped each other, and b overlapped a
    assert seen["a"]["1.0"] < calls["a"] and seen["b"]["1.0"] < calls["b"]
    assert router._crowding.under_way == 0


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_failed_call_is_no_longer_counted(kind: str) -> None:
    sleeping, failing = KINDS[kind]
    pools = {"a": [Replica(failing(), "a", "a-0")], "b": [Replica(sleeping(), "b", "b-0")]}
    router = PipelineRouter(SPEC, pools, {"a": 2, "b": 2}).start()  # type: ignore[arg-type]
    try:
        for f in [router.submit({"INPUT": np.zeros((1, 4), np.float32)}) for _ in range(10)]:
            assert f.exception(timeout=30) is not None
        assert router._crowding.under_way == 0
        assert _histogram(router)["a"]["1.0"] == _histogram(router)["a"]["count"] > 0
    finally:
        router.stop()


class BurningServer(SleepingServer):
    """Computes for 2 ms of its thread's CPU per call, as a model server's client side would."""

    def infer(self, model: str, inputs: Mapping[str, NDArray[np.generic]]) -> dict[str, NDArray[np.generic]]:
        end = time.thread_time() + 0.002
        while time.thread_time() < end:
            pass
        n = next(iter(inputs.values())).shape[0]
        name, width = ("FEAT", 4) if model == "a" else ("OUT", 2)
        return {name: np.zeros((n, width), np.float32)}


def test_the_router_counts_the_cpu_of_its_replica_threads() -> None:
    def replica_cpu(server: SleepingServer) -> tuple[float, int]:
        pools = {s: [Replica(server, s, f"{s}-0")] for s in ("a", "b")}
        router = PipelineRouter(SPEC, pools, {"a": 1, "b": 1}).start()  # type: ignore[arg-type]
        try:
            for f in [router.submit({"INPUT": np.zeros((1, 4), np.float32)}) for _ in range(60)]:
                f.result(timeout=30)
            cpu = replica_cpu_s(generate_latest(router.metrics_registry).decode())
            calls = sum(sum(sizes.values()) for sizes in router.batch_sizes().values())
        finally:
            router.stop()
        assert cpu is not None
        return cpu, calls

    pools = {s: [Replica(SleepingServer(), s, f"{s}-0")] for s in ("a", "b")}
    idle = PipelineRouter(SPEC, pools, {"a": 1, "b": 1})  # type: ignore[arg-type]
    assert replica_cpu_s(generate_latest(idle.metrics_registry).decode()) == 0.0  # no call yet: none spent
    assert replica_cpu_s("# TYPE other counter\nother_total 1.0\n") is None  # not a router's metrics
    burnt, calls = replica_cpu(BurningServer())
    assert burnt >= 0.002 * calls  # every call's 2 ms, and the threads' own work around it
    slept, calls = replica_cpu(SleepingServer())
    assert slept < 0.5 * CALL_S * calls  # waiting for a model server costs the thread little CPU


def test_arrival_history_is_bounded_without_a_reader() -> None:
    pools = {"a": [Replica(SleepingServer(), "a", "a-0")], "b": [Replica(SleepingServer(), "b", "b-0")]}
    router = PipelineRouter(SPEC, pools, {"a": 2, "b": 2}, arrivals_kept_s=0.2).start()  # type: ignore[arg-type]
    x = {"INPUT": np.zeros((1, 4), np.float32)}
    try:
        for f in [router.submit(x) for _ in range(30)]:
            f.result(timeout=30)
        time.sleep(0.3)
        router.submit(x).result(timeout=30)
        assert len(router._arrivals) == 1  # the 30 older ones went when the next query came
        assert router.arrivals_since(0.0).size == 1
    finally:
        router.stop()
