"""The agent's Prometheus metrics: its own counters, plus the served models' figures read on scrape.

Everything lives on a dedicated `CollectorRegistry`, never the process-global one, so several
agents (or tests) in one process do not collide and nothing else leaks into the endpoint.
The model figures come from the adapter at scrape time (a custom collector), so they are never
stale and cost nothing between scrapes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from threading import Thread
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from inferline.adapters.base import Adapter, ModelInfo, ModelStats
from inferline.errors import InferlineError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AgentMetrics:
    """The agent's own counters, registered on `registry`."""

    registry: CollectorRegistry
    profiles: Counter
    """Profiles finished, by model and outcome ("complete" or "partial")."""
    configures: Counter
    """Configurations applied, by model."""
    errors: Counter
    """Calls that ended with an error status, by RPC and status code."""

    def error(self, rpc: str, code: str) -> None:
        self.errors.labels(rpc=rpc, code=code).inc()


def agent_metrics(adapter: Adapter) -> AgentMetrics:
    registry = CollectorRegistry()
    metrics = AgentMetrics(
        registry=registry,
        profiles=Counter(
            "inferline_agent_profiles", "Profiles finished by the agent.", ["model", "outcome"], registry=registry
        ),
        configures=Counter(
            "inferline_agent_configure", "Serving configurations applied by the agent.", ["model"], registry=registry
        ),
        errors=Counter(
            "inferline_agent_errors", "Agent calls that ended with an error status.", ["rpc", "code"], registry=registry
        ),
    )
    registry.register(ModelCollector(adapter))
    return metrics


@dataclass(frozen=True)
class ModelSnapshot:
    info: ModelInfo
    stats: ModelStats | None
    """None when the model is not loaded (a server has no statistics for it then)."""


class ModelCollector(Collector):
    """The served models' key figures, read from the adapter on every scrape.

    A scrape must not fail because the model server is down: it then reports
    `inferline_agent_server_up 0` and no model figures, which is what an alert wants to see.
    """

    def __init__(self, adapter: Adapter) -> None:
        self._adapter = adapter

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily("inferline_agent_server_up", "1 when the model server answers and is ready.")
        try:
            snapshots = [self._snapshot(model) for model in self._adapter.models()]
        except InferlineError as exc:
            log.warning("metrics scrape: %s", exc.one_line())
            up.add_metric([], 0)
            return [up]
        up.add_metric([], 1 if self._adapter.is_ready() else 0)
        return [up, *model_families(snapshots)]

    def _snapshot(self, model: str) -> ModelSnapshot:
        info = self._adapter.model_info(model)
        return ModelSnapshot(info, self._adapter.stats(model) if info.ready else None)


def model_families(snapshots: Iterable[ModelSnapshot]) -> Iterator[Metric]:
    labels = ["model"]
    ready = GaugeMetricFamily("inferline_model_ready", "1 when the model is loaded and ready.", labels=labels)
    batch = GaugeMetricFamily("inferline_model_max_batch_size", "Configured maximum batch size.", labels=labels)
    instances = GaugeMetricFamily("inferline_model_instance_count", "Configured in-server replicas.", labels=labels)
    delay = GaugeMetricFamily(
        "inferline_model_batching_delay_seconds", "How long the server may wait to fill a batch.", labels=labels
    )
    # Cumulative since the model was (re)loaded; Prometheus treats a reload as a counter reset.
    inferences = CounterMetricFamily("inferline_model_inferences", "Items inferred.", labels=labels)
    executions = CounterMetricFamily("inferline_model_executions", "Batches executed.", labels=labels)
    queue = CounterMetricFamily("inferline_model_queue_seconds", "Time requests spent queued.", labels=labels)
    compute = CounterMetricFamily("inferline_model_compute_seconds", "Time spent computing batches.", labels=labels)
    for snap in snapshots:
        name = [snap.info.name]
        ready.add_metric(name, 1 if snap.info.ready else 0)
        if snap.info.config is not None:
            batch.add_metric(name, snap.info.config.max_batch_size)
            instances.add_metric(name, snap.info.config.instance_count)
            delay.add_metric(name, snap.info.config.batching_delay_us / 1e6)
        if snap.stats is not None:
            inferences.add_metric(name, snap.stats.inferences)
            executions.add_metric(name, snap.stats.executions)
            queue.add_metric(name, snap.stats.queue_ms_total / 1000.0)
            compute.add_metric(name, snap.stats.compute_ms_total / 1000.0)
    yield from (ready, batch, instances, delay, inferences, executions, queue, compute)


@dataclass(frozen=True)
class MetricsServer:
    """The `/metrics` HTTP endpoint; `stop()` frees its port."""

    address: str
    _http: WSGIServer
    _thread: Thread

    def stop(self) -> None:
        self._http.shutdown()
        self._http.server_close()
        self._thread.join(timeout=5)


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> MetricsServer:
    """Serve `registry` on http://host:port/metrics (port 0: a free port)."""
    try:
        http, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise InferlineError(
            f"the agent cannot serve metrics on {host}:{port}: {exc.strerror or exc}",
            "choose another --metrics-port (0 picks a free one)",
        ) from exc
    return MetricsServer(f"{host}:{http.server_port}", http, thread)
