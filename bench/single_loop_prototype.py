"""PROTOTYPE, not the shipped router: what a router core without replica threads would gain.

`python -m bench.single_loop_prototype [ROUNDS]` (about 20 s a round on 2 cores). The shipped core
(`router/core.py`) runs each replica as a thread that blocks on its Triton call; its answers are
then handed to the endpoint's event loop. Here, for the local-emulated pipeline only, each replica is
a coroutine on the endpoint's own loop, calling Triton with the adapter's `infer_async`, with the
same reference semantics (one FIFO queue per stage, a free replica takes min(queue, max batch) at
once, the spec's edge probability). It lacks what the shipped core has (retries, probing, scaling,
metrics, routes, joins): it measures, and serves nothing else.

Three paths take turns for ROUNDS rounds of 5 s at 500 q/s on one `inferline up` deployment of the
plan: this core in the client's own process (no endpoint), this core behind the HTTP endpoint in a
process of its own, and the shipped router of `inferline up` behind its HTTP endpoint. It prints each
path's median per round and the overhead over the first path, round by round and overall.
"""

from __future__ import annotations

import asyncio
import collections
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np

from inferline.adapters.base import TensorSpec
from inferline.adapters.registry import connect
from inferline.router.core import QueryResult

RATE, ROUND_S = 500, 5


class _Stage:
    def __init__(self, name: str, model: str, replicas: int, max_batch: int, probability: float, child: str | None):
        self.name, self.model, self.replicas, self.max_batch = name, model, replicas, max_batch
        self.probability, self.child = probability, child
        self.queue: collections.deque[tuple[dict[str, Any], Any]] = collections.deque()
        self.idle: list[asyncio.Future[None]] = []


class SingleLoopCore:
    """The frontends' `Pipeline` contract for local-emulated; replicas start on the loop of the first submit."""

    name = "local-emulated"

    def __init__(self, up: dict[str, Any], plan: dict[str, Any]) -> None:
        from prometheus_client import CollectorRegistry

        self.metrics_registry = CollectorRegistry()
        self.adapter = connect("triton", up["server_address"], **up["server_options"])
        stages = plan["stages"]
        self.stages = {
            "detect": _Stage("detect", "emulated-detector", stages["detect"]["replicas"],
                             stages["detect"]["max_batch_size"], 1.0, "classify"),
            "classify": _Stage("classify", "emulated-classifier", stages["classify"]["replicas"],
                               stages["classify"]["max_batch_size"], 0.6, None),
        }  # fmt: skip
        self.rng = np.random.default_rng(1)
        self.started = False
        self.replicas: list[asyncio.Task[None]] = []

    def ready(self) -> bool:
        return True

    def input_specs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("INPUT", "float32", (16,)),)

    def output_specs(self) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(f"{s}.OUTPUT", "float32", (16,)) for s in self.stages)

    def submit(self, inputs: Any) -> Future[QueryResult]:
        if not self.started:
            self.started = True
            loop = asyncio.get_running_loop()
            for stage in self.stages.values():
                for _ in range(stage.replicas):
                    self.replicas.append(loop.create_task(self._replica(stage)))
        future: Future[QueryResult] = Future()
        future.set_running_or_notify_cancel()
        query = {"future": future, "arrived": time.perf_counter(), "outputs": {}}
        self._enqueue(self.stages["detect"], query, inputs["INPUT"])
        return future

    def _enqueue(self, stage: _Stage, query: dict[str, Any], x: Any) -> None:
        stage.queue.append((query, x))
        if stage.idle:
            stage.idle.pop().set_result(None)

    async def _replica(self, stage: _Stage) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not stage.queue:
                waiter = loop.create_future()
                stage.idle.append(waiter)
                await waiter
                continue
            batch = [stage.queue.popleft() for _ in range(min(len(stage.queue), stage.max_batch))]
            y = (await self.adapter.infer_async(stage.model, {"INPUT": np.concatenate([x for _, x in batch])}))[
                "OUTPUT"
            ]
            for i, (query, x) in enumerate(batch):
                query["outputs"][f"{stage.name}.OUTPUT"] = y[i : i + 1]
                child = self.stages[stage.child] if stage.child else None
                if child is not None and self.rng.random() < child.probability:
                    self._enqueue(child, query, x)
                else:
                    latency_ms = 1e3 * (time.perf_counter() - query["arrived"])
                    visited = tuple(name.split(".")[0] for name in query["outputs"])
                    query["future"].set_result(QueryResult(query["outputs"], visited, latency_ms))


def serve(up_path: str, plan_path: str) -> None:
    from inferline.heap import freeze_long_lived
    from inferline.router.http_frontend import serve_http

    frontend = serve_http(
        SingleLoopCore(json.loads(Path(up_path).read_text()), json.loads(Path(plan_path).read_text()))
    )
    freeze_long_lived()
    print(frontend.address, flush=True)
    sys.stdin.readline()
    frontend.stop()


def main(rounds: int) -> None:
    from bench.live import ROOT, _plan
    from inferline.heap import freeze_long_lived
    from inferline.router.http_client import AsyncKServeHttpClient
    from inferline.router.replay import replay
    from inferline.traces import load_trace

    spec, plan = _plan("local-emulated", f"gamma:rate={RATE},cv=1,duration=30,seed=9")
    arrivals = load_trace(f"gamma:rate={RATE},cv=1,duration={ROUND_S},seed=9")
    x = np.random.default_rng(0).random((1, 16)).astype(np.float32)
    cli = [sys.executable, "-m", "inferline.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        plan_path, state = Path(tmp) / "plan.json", Path(tmp) / "state"
        plan_path.write_text(plan.to_json())
        subprocess.run([*cli, "up", str(plan_path), "--state-dir", str(state), "--tuner", "none"], cwd=ROOT, check=True)
        try:
            up = json.loads((state / "up.json").read_text())
            server = subprocess.Popen(
                [sys.executable, "-m", "bench.single_loop_prototype", "serve", str(state / "up.json"), str(plan_path)],
                cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            assert server.stdin is not None and server.stdout is not None
            endpoints = {
                "prototype, routed": server.stdout.readline().strip(),
                "shipped router": up["endpoints"]["http"],
            }

            async def run(path: str) -> float:
                if path == "prototype, in process":
                    core = SingleLoopCore(up, json.loads(plan_path.read_text()))

                    async def direct(i: int) -> None:
                        await asyncio.wrap_future(core.submit({"INPUT": x}))

                    try:
                        result = await replay(direct, arrivals, None, timeout_s=10.0)
                    finally:
                        core.adapter.close()
                else:
                    client = AsyncKServeHttpClient(endpoints[path])

                    async def routed(i: int) -> None:
                        await client.infer(spec.name, {"INPUT": x})

                    try:
                        result = await replay(routed, arrivals, None, timeout_s=10.0)
                    finally:
                        await client.close()
                return float(np.nanmedian(result.latencies_ms))

            freeze_long_lived()
            medians: dict[str, list[float]] = collections.defaultdict(list)
            for round_ in range(rounds):
                paths = ["prototype, in process", "prototype, routed", "shipped router"]
                for path in paths if round_ % 2 == 0 else reversed(paths):
                    medians[path].append(asyncio.run(run(path)))
                print(f"round {round_}: " + ", ".join(f"{p} {m[-1]:.2f} ms" for p, m in medians.items()), flush=True)
            base = medians["prototype, in process"]
            for path, values in medians.items():
                paired = [v - b for v, b in zip(values, base, strict=True)]
                by_round = ", ".join(f"{p:+.2f}" for p in paired)
                print(
                    f"{path}: median {np.median(values):.2f} ms, {np.median(values) - np.median(base):+.2f} ms over "
                    f"the core in process (round by round {np.median(paired):+.2f}: {by_round})"
                )
            server.stdin.close()
            server.wait(timeout=30)
        finally:
            subprocess.run([*cli, "down", "--state-dir", str(state)], cwd=ROOT)


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(sys.argv[2], sys.argv[3])
    else:
        main(int(sys.argv[1]) if len(sys.argv) > 1 else 6)
