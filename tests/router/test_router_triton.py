"""The router's core against real tritonserver processes: DAG, batching, failures, overload."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from inferline.adapters.base import ServingConfig
from inferline.adapters.triton.adapter import TritonAdapter
from inferline.adapters.triton.server import EmbeddedTriton
from inferline.errors import InferlineError, ServerError
from inferline.router.core import InvalidQuery, Overloaded, PipelineRouter, QueryFailed, QueryResult, Replica
from inferline.spec import parse_spec
from tests.model_repos import add_emulated

ROUTED = parse_spec({
    "name": "routed",
    "stages": [
        {"name": "detect", "model": "det"},
        {"name": "classify", "model": "cls", "after": ["detect"], "probability": 0.5,
         "route": "tests.triton.routes_for_tests:first_above_half"},
    ],
})  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedTriton]:
    repo = tmp_path_factory.mktemp("repo")
    add_emulated(repo, "det", 4.0, 1.0, max_batch=8)
    add_emulated(repo, "cls", 2.0, 0.5, max_batch=8)
    with EmbeddedTriton(repo, ["det", "cls"]) as s:
        yield s


@pytest.fixture(params=["http", "grpc"])
def transport(request: pytest.FixtureRequest) -> str:
    """How the replicas call Triton: over HTTP as coroutines on the router's loop (as `inferline up`'s
    replicas do), or over gRPC only, each call in a thread of its own."""
    return str(request.param)


def replicas(server: EmbeddedTriton, model: str, n: int, transport: str = "http") -> list[Replica]:
    options = {"http_address": server.http_address} if transport == "http" else {}
    return [Replica(TritonAdapter(server.grpc_address, **options), model, f"{model}-{i}") for i in range(n)]


def router_for(server: EmbeddedTriton, transport: str, det: int = 2, cls: int = 1, **kw: object) -> PipelineRouter:
    control = TritonAdapter(server.grpc_address)
    control.configure("det", ServingConfig(8, det))
    control.configure("cls", ServingConfig(4, cls))
    pools = {"detect": replicas(server, "det", det, transport), "classify": replicas(server, "cls", cls, transport)}
    return PipelineRouter(ROUTED, pools, {"detect": 8, "classify": 4}, **kw).start()  # type: ignore[arg-type]


def query(value: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    x = rng.random((1, 16)).astype(np.float32)
    x[0, 0] = value
    return {"INPUT": x}


def test_conditional_edge_follows_the_route_on_real_outputs(server: EmbeddedTriton, transport: str) -> None:
    router = router_for(server, transport)
    rng = np.random.default_rng(0)
    try:
        for value in (0.9, 0.1, 0.7, 0.3):
            inputs = query(value, rng)
            result = router.submit(inputs).result(timeout=10)
            expect = ("detect", "classify") if value > 0.5 else ("detect",)
            assert result.visited == expect
            np.testing.assert_allclose(result.outputs["detect.OUTPUT"], inputs["INPUT"])
            if value > 0.5:  # the classifier got the detector's output and echoed it
                np.testing.assert_allclose(result.outputs["classify.OUTPUT"], inputs["INPUT"])
    finally:
        router.stop()


def test_a_routing_function_that_raises_fails_its_query_and_the_replica_keeps_serving(server: EmbeddedTriton) -> None:
    spec = ROUTED.model_copy(
        update={"stages": (ROUTED.stages[0], ROUTED.stages[1].model_copy(
            update={"route": "tests.triton.routes_for_tests:refuses_negatives"}))}
    )  # fmt: skip
    control = TritonAdapter(server.grpc_address)
    control.configure("det", ServingConfig(8, 1))
    control.configure("cls", ServingConfig(4, 1))
    pools = {"detect": replicas(server, "det", 1), "classify": replicas(server, "cls", 1)}
    router = PipelineRouter(spec, pools, {"detect": 8, "classify": 4}).start()  # type: ignore[arg-type]
    rng = np.random.default_rng(3)
    try:
        with pytest.raises(QueryFailed, match="routing failed: ValueError: negative score"):
            router.submit(query(-1.0, rng)).result(timeout=10)
        # The one detect replica survived the bug: later queries are still answered.
        for value in (0.9, 0.1):
            assert router.submit(query(value, rng)).result(timeout=10).visited[0] == "detect"
    finally:
        router.stop()


def test_batches_respect_the_planned_maximum_and_form_under_load(server: EmbeddedTriton, transport: str) -> None:
    router = router_for(server, transport, det=1, cls=1)
    rng = np.random.default_rng(1)
    try:
        futures = [router.submit(query(0.9, rng)) for _ in range(80)]
        results = [f.result(timeout=30) for f in futures]
    finally:
        router.stop()
    assert all(r.visited == ("detect", "classify") for r in results)
    sizes = router.batch_sizes()
    assert max(sizes["detect"]) <= 8 and max(sizes["classify"]) <= 4
    assert max(sizes["detect"]) > 1 and max(sizes["classify"]) > 1  # greedy batching under a backlog
    assert sum(n * c for n, c in sizes["detect"].items()) == 80
    # Live call times per batch size: at least the model's own a + b·n (det: 4 + 1·n ms), so
    # they can be set against the profiles.
    service = router.service_times_ms()
    assert set(service["detect"]) == set(sizes["detect"])
    assert all(ms >= 4.0 + 1.0 * n for n, ms in service["detect"].items())
    # The same calls on the Prometheus endpoint, by stage and batch size.
    text = generate_latest(router.metrics_registry).decode()
    for n, count in sizes["detect"].items():
        assert f'inferline_router_call_seconds_count{{batch_size="{n}",stage="detect"}} {float(count)}' in text
    # ... and their spread: no call below the model's own time, every call under +Inf.
    buckets = [
        (float(s.labels["le"]), int(s.value), int(s.labels["batch_size"]))
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "inferline_router_call_seconds_bucket" and s.labels["stage"] == "detect"
    ]
    assert {n for _, _, n in buckets} == set(sizes["detect"]) and len(buckets) > 20 * len(sizes["detect"])
    for le, calls, n in buckets:
        if le < (4.0 + 1.0 * n) / 1000.0:
            assert calls == 0
        if le == float("inf"):
            assert calls == sizes["detect"][n]
    # Each query's wait in each stage's queue: 80 at once on one replica of at most 8 per call, so
    # the last call's queries waited for at least 9 calls of at least 5 ms (det: 4 + 1·n ms).
    waits = {
        (s.labels["stage"], float(s.labels["le"])): int(s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "inferline_router_queue_wait_seconds_bucket"
    }
    assert waits[("detect", float("inf"))] == 80 and waits[("classify", float("inf"))] == 80
    below = max(le for stage, le in waits if stage == "detect" and le <= 0.045)
    assert waits[("detect", below)] < 80


def test_overload_is_refused_explicitly_and_every_query_is_accounted(server: EmbeddedTriton, transport: str) -> None:
    router = router_for(server, transport, det=1, cls=1, max_queue=10)
    rng = np.random.default_rng(2)
    futures: list[Future[QueryResult]] = []
    refused = 0
    try:
        for _ in range(60):
            try:
                futures.append(router.submit(query(0.9, rng)))
            except Overloaded as exc:
                refused += 1
                assert "limit 10" in exc.one_line()
        answered = sum(1 for f in futures if f.result(timeout=30))
    finally:
        router.stop()
    assert refused > 0 and answered + refused == 60


def test_bad_query_inputs_are_refused_with_a_reason(server: EmbeddedTriton) -> None:
    router = router_for(server, "http")
    try:
        with pytest.raises(InvalidQuery, match="missing"):
            router.submit({"WRONG": np.zeros((1, 16), np.float32)})
        with pytest.raises(InvalidQuery, match=r"shape \[1, 3\]"):
            router.submit({"INPUT": np.zeros((1, 3), np.float32)})
    finally:
        router.stop()


def test_unreachable_server_at_start_is_a_one_line_error() -> None:
    unreachable = [Replica(TritonAdapter("127.0.0.1:9", http_address="127.0.0.1:9"), "det", "det-0")]
    pools = {"detect": unreachable, "classify": unreachable}
    with pytest.raises(ServerError) as err:
        PipelineRouter(ROUTED, pools, {"detect": 8, "classify": 4})
    assert "unreachable" in err.value.one_line() and "\n" not in err.value.one_line()


def test_stage_inputs_that_no_parent_outputs_are_refused_at_start(server: EmbeddedTriton, tmp_path: Path) -> None:
    spec = parse_spec(
        {"name": "p", "stages": [{"name": "a", "model": "det"}, {"name": "b", "model": "det", "after": ["a"]}]}
    )
    pools = {"a": replicas(server, "det", 1), "b": replicas(server, "det", 1)}
    PipelineRouter(spec, pools, {"a": 8, "b": 8})  # same shapes: fine
    with pytest.raises(InferlineError, match="stage"):
        PipelineRouter(spec, {"a": pools["a"]}, {"a": 8, "b": 8})


def test_killing_a_replica_mid_load_loses_no_query(tmp_path: Path, transport: str) -> None:
    """Stage replicas on two servers; one server is killed while queries flow: all are answered."""
    repo = tmp_path / "repo"
    add_emulated(repo, "det", 3.0, 0.5, max_batch=8)
    add_emulated(repo, "cls", 2.0, 0.5, max_batch=8)
    spec = parse_spec({"name": "p", "stages": [{"name": "detect", "model": "det"}]})
    with EmbeddedTriton(repo, ["det"]) as first, EmbeddedTriton(repo, ["det"]) as second:
        pools = {"detect": replicas(first, "det", 2, transport) + replicas(second, "det", 2, transport)}
        for s in (first, second):
            TritonAdapter(s.grpc_address).configure("det", ServingConfig(8, 2))
        router = PipelineRouter(spec, pools, {"detect": 8}).start()
        rng = np.random.default_rng(3)
        futures: list[Future[QueryResult]] = []

        def kill_first() -> None:
            time.sleep(0.4)
            assert first.process is not None
            os.killpg(first.process.pid, signal.SIGKILL)

        killer = threading.Thread(target=kill_first)
        killer.start()
        started = time.perf_counter()
        for i in range(300):  # 300 queries at 250 qps, open loop
            while time.perf_counter() - started < i / 250:
                time.sleep(0.0005)
            futures.append(router.submit(query(0.5, rng)))
        killer.join()
        outcomes = []
        for f in futures:
            try:
                f.result(timeout=30)
                outcomes.append("answered")
            except QueryFailed:
                outcomes.append("failed")
        # A dead replica stands aside once a call to it fails; on a loaded machine one of the two
        # may not have been handed a call yet: a few more queries reach it.
        deadline = time.monotonic() + 10.0
        while router.snapshot()[0].ready_replicas != 2 and time.monotonic() < deadline:
            for f in [router.submit(query(0.5, rng)) for _ in range(8)]:
                f.result(timeout=30)
        after_kill = router.snapshot()[0]
        router.stop()
    assert len(outcomes) == 300
    assert outcomes.count("answered") == 300, outcomes.count("failed")
    assert (after_kill.replicas, after_kill.ready_replicas) == (4, 2)  # the dead server's slots stand aside


def test_a_stage_reads_an_ancestors_output_its_parent_consumed(tmp_path: Path) -> None:
    """local-cascade: the large classifier needs the preprocessed PIXELS, which its parent (small) only consumed."""
    from tests.model_repos import EXAMPLES, add_example

    repo = tmp_path / "repo"
    for model in ("preprocess", "classifier-small", "classifier-large"):
        add_example(repo, model)
    spec = parse_spec({
        "name": "cascade", "stages": [
            {"name": "pre", "model": "preprocess"},
            {"name": "small", "model": "classifier-small", "after": ["pre"]},
            {"name": "large", "model": "classifier-large", "after": ["small"],
             "route": "inferline.routes:low_confidence"},
        ],
    })  # fmt: skip
    assert EXAMPLES.is_dir()
    with EmbeddedTriton(repo, ["preprocess", "classifier-small", "classifier-large"]) as s:
        pools = {
            "pre": replicas(s, "preprocess", 1),
            "small": replicas(s, "classifier-small", 1),
            "large": replicas(s, "classifier-large", 1),
        }
        router = PipelineRouter(spec, pools, {"pre": 4, "small": 4, "large": 4}).start()
        try:
            image = np.random.default_rng(5).integers(0, 255, size=(1, 64, 64, 3)).astype(np.uint8)
            result = router.submit({"IMAGE": image}).result(timeout=30)
        finally:
            router.stop()
    assert result.visited == ("pre", "small", "large")  # random weights: never confident, always escalated
    assert result.outputs["large.PROBS"].shape == (1, 10)
    assert abs(float(result.outputs["large.PROBS"].sum()) - 1.0) < 1e-4
