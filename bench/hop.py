"""The router's endpoint hop alone, without model servers (`make bench-hop`, about 30 s on 2 cores).

A null pipeline stands in for the router's core: it answers every query it holds at once every
BATCH_PERIOD_S, as a replica finishing a batch would, from a thread of its own. It is served over
HTTP and over gRPC in a subprocess (as `inferline up` serves a pipeline), and our own asyncio clients
send an open-loop Poisson trace to it through `inferline.router.replay`. Per protocol and rate it
prints the client's median latency, the hop (the client's mean latency minus the null pipeline's
own mean, submit to answer; of it, how late the load generator sent) and the CPU per query of the
serving process and of the client: the
frontend's and the client's cost per query, free of Triton's noise. Writes bench/results/hop.json.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from inferline.adapters.base import TensorSpec
from inferline.router.client import AsyncKServeClient
from inferline.router.core import QueryResult
from inferline.router.http_client import AsyncKServeHttpClient
from inferline.router.replay import replay
from inferline.traces import load_trace

OUT = Path(__file__).resolve().parent / "results"
NAME = "null"
BATCH_PERIOD_S = 0.008
RATES, DURATION_S, WARMUP_QUERIES = (250, 500), 8, 50
CLIENTS = {"http": AsyncKServeHttpClient, "grpc": AsyncKServeClient}


class NullPipeline:
    """The frontends' `Pipeline` contract with no model behind it: answers in bursts, like replicas."""

    name = NAME

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry

        self.metrics_registry = CollectorRegistry()
        self._lock = threading.Lock()
        self._held: list[tuple[Future[QueryResult], Any, float]] = []
        self.answered, self.own_s = 0, 0.0
        threading.Thread(target=self._answer_in_bursts, daemon=True).start()

    def ready(self) -> bool:
        return True

    def input_specs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("INPUT", "float32", (16,)),)

    def output_specs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("a.OUTPUT", "float32", (16,)), TensorSpec("b.OUTPUT", "float32", (16,)))

    def submit(self, inputs: Any) -> Future[QueryResult]:
        future: Future[QueryResult] = Future()
        future.set_running_or_notify_cancel()
        with self._lock:
            self._held.append((future, inputs["INPUT"], time.perf_counter()))
        return future

    def _answer_in_bursts(self) -> None:
        while True:
            time.sleep(BATCH_PERIOD_S)
            with self._lock:
                burst, self._held = self._held, []
            for future, x, submitted in burst:
                own_s = time.perf_counter() - submitted
                self.answered, self.own_s = self.answered + 1, self.own_s + own_s
                future.set_result(QueryResult({"a.OUTPUT": x, "b.OUTPUT": x}, ("a", "b"), own_s * 1e3))


def serve() -> None:
    """The serving process: both frontends on one null pipeline; answers `stats` lines on stdin."""
    from inferline.router.grpc_frontend import serve_grpc
    from inferline.router.http_frontend import serve_http

    pipeline = NullPipeline()
    http, grpc = serve_http(pipeline), serve_grpc(pipeline)
    print(json.dumps({"http": http.address, "grpc": grpc.address}), flush=True)
    for line in sys.stdin:
        if line.strip() != "stats":
            break
        cpu = os.times()
        stats = {"cpu_s": cpu.user + cpu.system, "answered": pipeline.answered, "own_s": pipeline.own_s}
        print(json.dumps(stats), flush=True)
    http.stop()
    grpc.stop()


def measure(server: subprocess.Popen[str], address: str, protocol: str, rate: int) -> dict[str, Any]:
    assert server.stdin is not None and server.stdout is not None
    stdin, stdout = server.stdin, server.stdout

    def stats() -> dict[str, float]:
        stdin.write("stats\n")
        stdin.flush()
        return dict(json.loads(stdout.readline()))

    arrivals = load_trace(f"gamma:rate={rate},cv=1,duration={DURATION_S},seed=9")
    x = np.random.default_rng(0).random((1, 16)).astype(np.float32)

    async def run() -> tuple[Any, dict[str, float], dict[str, float], float]:
        client = CLIENTS[protocol](address)

        async def send(i: int) -> None:
            await client.infer(NAME, {"INPUT": x})

        try:
            for _ in range(WARMUP_QUERIES):
                await send(0)
            before, cpu = stats(), time.process_time()
            result = await replay(send, arrivals, None, timeout_s=10.0)
            return result, before, stats(), time.process_time() - cpu
        finally:
            await client.close()

    result, before, after, client_cpu_s = asyncio.run(run())
    answered = after["answered"] - before["answered"]
    own_ms = 1e3 * (after["own_s"] - before["own_s"]) / answered
    n = arrivals.size
    return {
        "protocol": protocol, "rate_qps": rate, "queries": int(n), "errors": int(result.sent - result.answered),
        "median_ms": float(np.nanmedian(result.latencies_ms)),
        "hop_mean_ms": float(np.nanmean(result.latencies_ms)) - own_ms,
        # The load generator's own lateness in sending (its loop's timers), which the hop includes.
        "send_lag_mean_ms": float(np.mean(result.started_s - result.scheduled_s)) * 1e3,
        "server_cpu_ms_per_query": 1e3 * (after["cpu_s"] - before["cpu_s"]) / n,
        "client_cpu_ms_per_query": 1e3 * client_cpu_s / n,
    }  # fmt: skip


def main() -> None:
    console = Console()
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.hop", "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        addresses = json.loads(server.stdout.readline())
        rows = [measure(server, addresses[p], p, rate) for rate in RATES for p in CLIENTS]
    finally:
        if server.stdin is not None:
            server.stdin.close()
        server.wait(timeout=30)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "hop.json").write_text(json.dumps(rows, indent=2) + "\n")
    table = Table(title=f"endpoint hop, null pipeline answering every {1e3 * BATCH_PERIOD_S:.0f} ms")
    columns = ("protocol", "q/s", "median ms", "hop mean ms", "of it send lag", "server CPU ms/q", "client CPU ms/q")
    for column in (*columns, "errors"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(
            r["protocol"], str(r["rate_qps"]), f"{r['median_ms']:.2f}", f"{r['hop_mean_ms']:.2f}",
            f"{r['send_lag_mean_ms']:.2f}",
            f"{r['server_cpu_ms_per_query']:.3f}", f"{r['client_cpu_ms_per_query']:.3f}", str(r["errors"]),
        )  # fmt: skip
    console.print(table)


if __name__ == "__main__":
    serve() if sys.argv[1:] == ["serve"] else main()
