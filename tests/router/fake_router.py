"""An in-process stand-in for `inferline.router.core.PipelineRouter`'s frontend contract.

Two stages: "double" doubles INPUT (float32, 4 per item) into "double.OUTPUT"; "echo" returns
TOKENS (int64, any length) as "echo.TOKENS". Answers after `delay_s` from a timer thread, like the
real router's thread replicas (another thread than the frontend's). Switches make it refuse
(`overloaded`), fail (`failing`), never answer (`hanging`) or report not ready (`is_ready`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from typing import Any

import numpy as np
from numpy.typing import NDArray
from prometheus_client import CollectorRegistry, Counter

from inferline.adapters.base import TensorSpec
from inferline.router.core import Overloaded, QueryFailed, QueryResult

FAKE_NAME = "fake-pipeline"


def fake_query(seed: int = 0, tokens: int = 3) -> dict[str, NDArray[Any]]:
    """One query for the fake pipeline: INPUT (1, 4) float32 and TOKENS (1, tokens) int64."""
    rng = np.random.default_rng(seed)
    return {
        "INPUT": rng.random((1, 4)).astype(np.float32),
        "TOKENS": rng.integers(0, 1000, size=(1, tokens)).astype(np.int64),
    }


class FakeRouter:
    def __init__(self, name: str = "fake-pipeline", delay_s: float = 0.002) -> None:
        self.name = name
        self.delay_s = delay_s
        self.overloaded = False
        self.failing = False
        self.hanging = False
        self.is_ready = True
        self.received: list[dict[str, NDArray[Any]]] = []
        self.metrics_registry = CollectorRegistry()
        self._queries = Counter("fake_pipeline_queries", "Queries submitted", registry=self.metrics_registry)
        self._lock = threading.Lock()

    def reset(self) -> None:
        self.overloaded = self.failing = self.hanging = False
        self.is_ready = True
        with self._lock:
            self.received.clear()

    def ready(self) -> bool:
        return self.is_ready

    def input_specs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("INPUT", "float32", (4,)), TensorSpec("TOKENS", "int64", (-1,)))

    def output_specs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("double.OUTPUT", "float32", (4,)), TensorSpec("echo.TOKENS", "int64", (-1,)))

    def submit(self, inputs: Mapping[str, NDArray[Any]]) -> Future[QueryResult]:
        if self.overloaded:
            raise Overloaded(f"pipeline {self.name!r} has 2000 queries in flight (limit 2000)", "retry later")
        self._queries.inc()
        with self._lock:
            self.received.append(dict(inputs))
        future: Future[QueryResult] = Future()
        future.set_running_or_notify_cancel()  # as the router does: its queries cannot be cancelled
        if not self.hanging:
            timer = threading.Timer(self.delay_s, self._answer, (future, dict(inputs), time.perf_counter()))
            timer.daemon = True
            timer.start()
        return future

    def _answer(self, future: Future[QueryResult], inputs: dict[str, NDArray[Any]], started: float) -> None:
        if self.failing:
            future.set_exception(QueryFailed("stage 'double' has no live replica", "restart its model server"))
            return
        outputs = {"double.OUTPUT": inputs["INPUT"] * np.float32(2), "echo.TOKENS": inputs["TOKENS"].copy()}
        latency_ms = (time.perf_counter() - started) * 1e3
        future.set_result(QueryResult(outputs, ("double", "echo"), latency_ms))
