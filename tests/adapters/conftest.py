"""The adapter conformance kit's harness: one real server per adapter, with a model of known latency.

A new adapter joins the kit by adding a harness factory to `HARNESSES`; every test in
`test_conformance.py` then runs against it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from inferline.adapters.base import Adapter
from inferline.adapters.registry import connect, embedded_server
from inferline.adapters.triton.adapter import TritonAdapter
from inferline.adapters.triton.server import EmbeddedTriton
from tests.model_repos import add_emulated

ECHO_A_MS, ECHO_B_MS = 4.0, 0.5


@dataclass(frozen=True)
class Harness:
    adapter: Adapter
    model: str
    """An emulated echo model: OUTPUT == INPUT, batch latency a + b·n ms, max batch 8, one instance."""
    unreachable: Adapter
    """The same adapter pointed at a port where nothing listens."""


@contextmanager
def triton_harness(tmp: Path) -> Iterator[Harness]:
    """As deployments connect: control over gRPC, inference over HTTP."""
    add_emulated(tmp, "echo", ECHO_A_MS, ECHO_B_MS, max_batch=8)
    with embedded_server("triton", tmp, ["echo"]) as handle:
        adapter = connect("triton", handle.address, **handle.options)
        try:
            yield Harness(adapter, "echo", connect("triton", "127.0.0.1:9"))
        finally:
            adapter.close()


@contextmanager
def triton_grpc_harness(tmp: Path) -> Iterator[Harness]:
    """The adapter as it is for a server whose HTTP endpoint it is not told: inference over gRPC too."""
    add_emulated(tmp, "echo", ECHO_A_MS, ECHO_B_MS, max_batch=8)
    with EmbeddedTriton(tmp, ["echo"]) as server:
        adapter = TritonAdapter(server.grpc_address, metrics_address=server.metrics_address)
        try:
            yield Harness(adapter, "echo", TritonAdapter("127.0.0.1:9"))
        finally:
            adapter.close()


@contextmanager
def triton_http_harness(tmp: Path) -> Iterator[Harness]:
    """The same adapter over Triton's HTTP/REST protocol instead of gRPC."""
    add_emulated(tmp, "echo", ECHO_A_MS, ECHO_B_MS, max_batch=8)
    with EmbeddedTriton(tmp, ["echo"]) as server:
        adapter = TritonAdapter(server.http_address, protocol="http", metrics_address=server.metrics_address)
        try:
            yield Harness(adapter, "echo", TritonAdapter("127.0.0.1:9", protocol="http"))
        finally:
            adapter.close()


HARNESSES: dict[str, Callable[[Path], AbstractContextManager[Harness]]] = {
    "triton": triton_harness,
    "triton-grpc": triton_grpc_harness,
    "triton-http": triton_http_harness,
}


@pytest.fixture(scope="module", params=sorted(HARNESSES))
def harness(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    with HARNESSES[request.param](tmp_path_factory.mktemp(f"repo-{request.param}")) as h:
        yield h
