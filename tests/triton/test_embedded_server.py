"""Starting a real tritonserver: its three ports are distinct, and a refused start-up names the reason."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from inferline.adapters.triton import server as triton_server
from inferline.adapters.triton.server import EmbeddedTriton, free_ports
from inferline.errors import ServerError
from tests.model_repos import add_emulated


def test_free_ports_are_distinct_and_bindable() -> None:
    for _ in range(50):
        ports = free_ports(3)
        assert len(set(ports)) == 3
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))


def test_a_start_up_triton_refuses_names_its_reason_not_its_usage_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel may hand back a port just closed; sharing one makes Triton print its usage and exit."""
    add_emulated(tmp_path / "repo", "m", 1.0, 0.1)
    (port,) = free_ports(1)
    monkeypatch.setattr(triton_server, "free_ports", lambda count: (port,) * count)
    server = EmbeddedTriton(tmp_path / "repo", ["m"], workdir=tmp_path / "work")
    with pytest.raises(ServerError) as refused:
        server.start()
    assert "same address and port" in str(refused.value)
    assert "--load-model" not in str(refused.value)
    assert not server.alive()


def test_a_hung_server_is_an_error_within_the_timeout_not_a_wait_forever(tmp_path: Path) -> None:
    """A frozen Triton (here SIGSTOP) must not hold the agent's threads: over gRPC every control call
    gives up after the adapter's timeout, and readiness says not ready."""
    import os
    import signal
    import time

    from inferline.adapters.triton.adapter import TritonAdapter

    add_emulated(tmp_path / "repo", "m", 1.0, 0.1)
    with EmbeddedTriton(tmp_path / "repo", ["m"], workdir=tmp_path / "work") as server:
        assert server.process is not None
        adapter = TritonAdapter(server.grpc_address, timeout_s=1.0)
        try:
            assert adapter.models() == ["m"]
            os.kill(server.process.pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                with pytest.raises(ServerError):
                    adapter.models()
                assert adapter.is_ready() is False
                assert time.monotonic() - started < 10.0
            finally:
                os.kill(server.process.pid, signal.SIGCONT)
            assert adapter.models() == ["m"]  # and it answers again once it runs
        finally:
            adapter.close()
