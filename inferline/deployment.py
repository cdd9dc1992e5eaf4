"""A plan made real on this machine: the embedded model server, an agent, the router and its endpoints.

Every stage gets its planned replicas and batch size: the stage's model is configured (through the
agent, which drives the adapter) with that many in-server instances and that maximum batch size,
and the router gets one replica slot per instance, so the router's greedy batching hands each
instance at most one batch at a time, as the estimator assumes. `scale` is the actuator the live
tuner uses: it changes a stage's instance count and the router's slots, and says how long the
new replicas took to become ready.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inferline.adapters.base import Adapter, ServingConfig
from inferline.adapters.registry import connect, embedded_server
from inferline.errors import PlanError
from inferline.plan import Plan
from inferline.process_cpu import available_cores
from inferline.router.core import PipelineRouter, Replica
from inferline.spec import PipelineSpec

LOCAL_HARDWARE = "cpu"


@dataclass(frozen=True)
class Endpoints:
    grpc: str
    http: str
    metrics: str
    """The router's Prometheus endpoint (the HTTP frontend's /metrics)."""


@dataclass(frozen=True)
class ScaleEvent:
    stage: str
    replicas: int
    startup_s: float
    """Seconds until the new configuration served (0 for a scale-down)."""


def check_plan(spec: PipelineSpec, plan: Plan) -> None:
    """The plan must be feasible, for this pipeline, and on hardware this machine has."""
    if not plan.feasible:
        raise PlanError(f"the plan is infeasible ({plan.reason}); there is nothing to deploy", "plan again")
    if plan.pipeline != spec.name:
        raise PlanError(f"the plan is for pipeline {plan.pipeline!r}, the spec is {spec.name!r}", "pass the right spec")
    missing = sorted(set(spec.names) - set(plan.stages))
    if missing:
        raise PlanError(f"the plan has no configuration for stage(s) {missing}", "plan this spec again")
    for name, stage in plan.stages.items():
        if stage.hardware != LOCAL_HARDWARE:
            raise PlanError(
                f"stage {name!r} is planned on {stage.hardware!r}; the local deployment has only {LOCAL_HARDWARE!r}",
                "plan with a catalog of local hardware, e.g. --hardware examples/catalog-local.yaml",
            )


def core_shortfall(plan: Plan, cores: int | None = None) -> str | None:
    """A one-line warning when the plan's replicas need more cores than this machine lets us use.

    A "cpu" replica is one core to the planner and its estimator; where the replicas are more than
    the cores, compute-bound replicas slow each other down exactly when a burst keeps them all busy,
    and measured latency exceeds the estimate (on this 2-core VM the cascade's largest model took
    10-16 ms per call during bursts against 6-7 ms alone). Replicas that only wait (the emulated
    models) are not affected, so this warns rather than refuses.
    """
    if cores is None:
        cores = available_cores()
    needed = sum(stage.replicas for stage in plan.stages.values() if stage.hardware == LOCAL_HARDWARE)
    if needed <= cores:
        return None
    return (
        f"the plan runs {needed} one-core replicas on {cores} cores: compute-bound replicas will share cores "
        "and measured latency can exceed the estimate"
    )


def _ladder_batches(plan: Plan, stage: str) -> list[int]:
    steps = plan.tuner.ladder if plan.tuner is not None else ()
    return [step.stages[stage].max_batch_size for step in steps if stage in step.stages]


class LocalDeployment:
    def __init__(
        self,
        spec: PipelineSpec,
        plan: Plan,
        repository: str | Path,
        framework: str = "triton",
        host: str = "127.0.0.1",
        grpc_port: int = 0,
        http_port: int = 0,
        max_queue: int = 2000,
        seed: int = 0,
    ) -> None:
        check_plan(spec, plan)
        self.spec, self.plan, self.framework = spec, plan, framework
        self.repository = Path(repository)
        self.host, self.grpc_port, self.http_port = host, grpc_port, http_port
        self.max_queue, self.seed = max_queue, seed
        self.replicas = {name: plan.stage(name).replicas for name in spec.names}
        self.batches = {name: plan.stage(name).max_batch_size for name in spec.names}
        """The router's batch cap per stage (the tuner's scale-ladder steps change it)."""
        self._served_batches = {name: max([b, *_ladder_batches(plan, name)]) for name, b in self.batches.items()}
        """What the server is configured to take per stage: never below the router's cap. Every batch
        size of the plan's scale ladder is taken up front, so a ladder step is a change of the
        router's cap, not a model reload in the middle of a burst."""
        self._address: str | None = None
        self._options: dict[str, str] = {}
        self._stack = contextlib.ExitStack()
        self._lock = threading.Lock()
        self.router: PipelineRouter | None = None
        self.endpoints: Endpoints | None = None
        self.server_startup_s = 0.0
        self.server_pid: int | None = None
        self._replicas_made = {name: 0 for name in spec.names}
        """Per stage, replicas connected so far: each gets a label of its own, whichever one leaves."""

    @property
    def models(self) -> list[str]:
        return sorted({s.model for s in self.spec.stages})

    def start(self) -> LocalDeployment:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        from inferline.agent.client import AgentClient
        from inferline.agent.server import serve
        from inferline.router.grpc_frontend import serve_grpc
        from inferline.router.http_frontend import serve_http

        handle = self._stack.enter_context(embedded_server(self.framework, self.repository, self.models))
        self.server_startup_s = handle.startup_s
        self.server_pid = handle.pid
        self._address, self._options = handle.address, dict(handle.options)
        control = self._connect()
        self._stack.callback(control.close)
        token = secrets.token_urlsafe(24)
        agent = serve(control, LOCAL_HARDWARE, token, self.host, 0, None)
        self._stack.callback(agent.stop, 2.0)
        self._agent = AgentClient(agent.address, token)
        self._stack.callback(self._agent.close)
        for model, config in self._model_configs().items():
            self._agent.configure(model, config)
        pools = {name: [self._replica(name) for _ in range(self.replicas[name])] for name in self.spec.names}
        self.router = PipelineRouter(
            self.spec, pools, self.batches, self.plan.slo_ms, self.max_queue, self.seed
        ).start()
        self._stack.callback(self.router.stop)
        grpc_frontend = serve_grpc(self.router, self.host, self.grpc_port, loop=self.router.loop_thread)
        self._stack.callback(grpc_frontend.stop)
        http_frontend = serve_http(self.router, self.host, self.http_port, loop=self.router.loop_thread)
        self._stack.callback(http_frontend.stop)
        self.endpoints = Endpoints(grpc_frontend.address, http_frontend.address, f"{http_frontend.url}/metrics")

    def _connect(self) -> Adapter:
        assert self._address is not None, "start() first"
        return connect(self.framework, self._address, **self._options)

    def _replica(self, stage: str) -> Replica:
        model = self.spec.stage(stage).model
        index = self._replicas_made[stage]
        self._replicas_made[stage] += 1
        return Replica(self._connect(), model, f"{stage}-{index}")

    def _model_configs(self) -> dict[str, ServingConfig]:
        """One config per model: stages sharing a model share its instances."""
        instances: dict[str, int] = defaultdict(int)
        batch: dict[str, int] = defaultdict(int)
        for stage in self.spec.stages:
            instances[stage.model] += self.replicas[stage.name]
            batch[stage.model] = max(batch[stage.model], self._served_batches[stage.name])
        return {m: ServingConfig(batch[m], instances[m], 0) for m in instances}

    def scale(self, stage: str, replicas: int, max_batch_size: int | None = None) -> ScaleEvent:
        """The actuator: give `stage` this many replicas (at least one), and optionally a new batch
        size; returns when the new configuration serves."""
        assert self.router is not None, "start() first"
        replicas = max(1, replicas)
        with self._lock:
            current = self.replicas[stage]
            batch = max_batch_size if max_batch_size is not None else self.batches[stage]
            if replicas == current and batch == self.batches[stage]:
                return ScaleEvent(stage, replicas, 0.0)
            started = time.perf_counter()
            reloaded = batch > self._served_batches[stage]
            if reloaded:
                # The server must take the bigger batches before the router sends them; replicas
                # that become unneeded leave only after that (no capacity dip while it reloads).
                self._served_batches[stage] = batch
                self.replicas[stage] = max(replicas, current)
                self._apply(stage)
            self.batches[stage] = batch
            self.router.set_max_batch(stage, batch)
            if replicas < current:
                for _ in range(current - replicas):
                    self.router.remove_replica(stage)
                self.replicas[stage] = replicas
                self._apply(stage)
            elif replicas > current:
                # Instances first, slots after: the router never sends more batches than can run.
                self.replicas[stage] = replicas
                self._apply(stage)
                for _ in range(current, replicas):
                    self.router.add_replica(stage, self._replica(stage))
            waited = replicas > current or reloaded
            return ScaleEvent(stage, replicas, time.perf_counter() - started if waited else 0.0)

    def _apply(self, stage: str) -> None:
        model = self.spec.stage(stage).model
        self._agent.configure(model, self._model_configs()[model])

    def describe(self) -> dict[str, Any]:
        return {
            "pipeline": self.spec.name,
            "endpoints": self.endpoints.__dict__ if self.endpoints else None,
            "replicas": dict(self.replicas),
            "server_startup_s": self.server_startup_s,
            "server_pid": self.server_pid,
            "server_address": self._address,
            "server_options": dict(self._options),
            "cores": available_cores(),
        }

    def stop(self) -> None:
        self._stack.close()
