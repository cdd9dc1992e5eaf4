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
