"""Run the agent: its gRPC API (token required, TLS optional), gRPC health, and Prometheus metrics.

`serve` starts everything in the background and returns at once (tests, embedding); `run` is
what `inferline agent` calls: connect the adapter, serve, and block until SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Mapping
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from inferline.adapters.base import Adapter
from inferline.agent.auth import TokenAuth
from inferline.agent.metrics import AgentMetrics, MetricsServer, agent_metrics, serve_metrics
from inferline.agent.service import AgentService
from inferline.errors import InferlineError
from inferline.protos import agent_pb2, agent_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = agent_pb2.DESCRIPTOR.services_by_name["Agent"].full_name
MAX_WORKERS = 16
"""Concurrent calls; a Profile holds one worker for its whole stream."""


class LiveHealth(health.HealthServicer):
    """gRPC health that asks the model server on every Check, so a probe never sees a stale answer.

    The agent is only useful while its model server is ready, so that is what "SERVING" means.
    """

    def __init__(self, adapter: Adapter) -> None:
        super().__init__()
        self._adapter = adapter
        self.refresh()

    def refresh(self) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if self._adapter.is_ready()
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", SERVICE_NAME):
            self.set(service, status)

    def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        self.refresh()
        return super().Check(request, context)


@dataclass(frozen=True)
class AgentServer:
    """A running agent. `stop()` ends it (the adapter stays open: whoever made it closes it)."""

    address: str
    metrics_address: str | None
    metrics: AgentMetrics
    _grpc: grpc.Server
    _health: LiveHealth
    _metrics_http: MetricsServer | None

    def stop(self, grace: float | None = 5.0) -> None:
        """Refuse new calls, let running ones finish for `grace` seconds, then cancel them."""
        self._health.enter_graceful_shutdown()
        self._grpc.stop(grace).wait()
        if self._metrics_http is not None:
            self._metrics_http.stop()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stops (True) or `timeout` seconds pass (False)."""
        return self._grpc.wait_for_termination(timeout)


_AGENT = agent_pb2.DESCRIPTOR.services_by_name["Agent"]
AGENT_METHODS = {f"/{_AGENT.full_name}/{name}": name for name in _AGENT.methods_by_name}


def refused_rpc(method: str) -> str:
    """The error counter's label for a refused call: its RPC, or "unknown" for a method the agent
    does not have (a caller without a token must not add a metric series per name it makes up)."""
    return AGENT_METHODS.get(method, "unknown")


def serve(
    adapter: Adapter,
    hardware: str,
    token: str,
    host: str = "127.0.0.1",
    port: int = 0,
    metrics_port: int | None = 0,
    tls_cert: str | None = None,
    tls_key: str | None = None,
) -> AgentServer:
    """Start an agent for `adapter`'s model server; port 0 picks a free port, metrics_port None: no metrics."""
    metrics = agent_metrics(adapter)
    auth = TokenAuth(token, on_refused=lambda method: metrics.error(refused_rpc(method), "UNAUTHENTICATED"))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=MAX_WORKERS), interceptors=[auth])
    agent_pb2_grpc.add_AgentServicer_to_server(AgentService(adapter, hardware, metrics), server)
    live = LiveHealth(adapter)
    health_pb2_grpc.add_HealthServicer_to_server(live, server)
    bound = _bind(server, host, port, _credentials(tls_cert, tls_key))
    try:
        metrics_http = serve_metrics(metrics.registry, host, metrics_port) if metrics_port is not None else None
    except InferlineError:
        server.stop(None)  # frees the port bound above
        raise
    server.start()
    address = f"{_host_for_address(host)}:{bound}"
    log.info("agent for %s at %s listening on %s", adapter.framework, adapter.address, address)
    return AgentServer(address, metrics_http.address if metrics_http else None, metrics, server, live, metrics_http)


def _credentials(tls_cert: str | None, tls_key: str | None) -> grpc.ServerCredentials | None:
    if tls_cert is None and tls_key is None:
        return None
    if tls_cert is None or tls_key is None:
        raise InferlineError("TLS needs both a certificate and its key", "pass both --tls-cert and --tls-key")
    return grpc.ssl_server_credentials([(_read(tls_key, "TLS key"), _read(tls_cert, "TLS certificate"))])


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InferlineError(f"cannot read the {what} {path!r}: {exc.strerror or exc}", "check the path") from None


def _bind(server: grpc.Server, host: str, port: int, credentials: grpc.ServerCredentials | None) -> int:
    target = f"{_host_for_address(host)}:{port}"
    try:
        bound = (
            server.add_secure_port(target, credentials) if credentials is not None else server.add_insecure_port(target)
        )
    except RuntimeError:  # grpcio raises on a failed bind; older versions return 0 instead
        bound = 0
    if bound == 0:
        raise InferlineError(f"the agent cannot listen on {target}", "choose another --port (0 picks a free one)")
    return bound


def _host_for_address(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def run(
    framework: str,
    server_address: str,
    hardware: str,
    token: str,
    *,
    adapter_options: Mapping[str, Any] | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    metrics_port: int | None = 0,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    on_ready: Callable[[AgentServer], None] | None = None,
) -> None:
    """Serve an agent for the `framework` server at `server_address` until SIGTERM or Ctrl-C.

    A model server that is not up yet is no error (sidecars start together): Describe and the
    health check report it until it is. `on_ready` gets the running server, e.g. to print its address.
    """
    from inferline.adapters.registry import connect

    adapter = connect(framework, server_address, **dict(adapter_options or {}))
    try:
        agent = serve(adapter, hardware, token, host, port, metrics_port, tls_cert, tls_key)
        try:
            if not adapter.is_ready():
                log.warning("the %s server at %s is not ready yet", framework, server_address)
            if on_ready is not None:
                on_ready(agent)
            _block_until_signalled()
        finally:
            agent.stop()
    finally:
        adapter.close()


def _block_until_signalled() -> None:
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        # A timed wait keeps the main thread responsive to Ctrl-C (KeyboardInterrupt).
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
