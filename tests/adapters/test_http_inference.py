"""The Triton adapter's HTTP data path: errors a router can act on, kept-alive connections that
the server closed, and one connection per calling thread."""

from __future__ import annotations

import asyncio
import http.client as http_client
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import tritonclient.grpc

from inferline.adapters.triton.adapter import TritonAdapter
from inferline.adapters.triton.http_inference import HEADER_LENGTH, HttpInference, InferenceFailed, _closed_by_peer
from inferline.adapters.triton.server import EmbeddedTriton
from inferline.errors import ModelNotFoundError, ServerError, ServerUnreachable
from tests.model_repos import add_emulated


class _EchoHandler(BaseHTTPRequestHandler):
    """A KServe v2 binary-extension echo. With `drop` set it closes the connection after every answer
    without saying so (no `Connection: close`), as a server whose keep-alive timer ran out does.
    Model "vanish" reads the query and hangs up without answering, as a crashing server does."""

    protocol_version = "HTTP/1.1"
    drop = True
    connections: ClassVar[set[tuple[str, int]]] = set()
    queries: ClassVar[list[str]] = []

    def do_POST(self) -> None:
        self.connections.add(self.client_address)
        self.queries.append(self.path)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/v2/models/vanish/infer":
            self.close_connection = True
            return
        if self.path == "/v2/models/bad/infer":
            error = json.dumps({"error": "inference request for\n model 'bad' failed"}).encode()
            self.send_response(400)
            self.send_header("Content-Length", str(len(error)))
            self.end_headers()
            self.wfile.write(error)
            return
        head_length = int(self.headers[HEADER_LENGTH])
        request = json.loads(body[:head_length])
        tensor = request["inputs"][0]
        head = json.dumps({
            "model_name": "echo",
            "outputs": [{"name": "OUTPUT", "datatype": tensor["datatype"], "shape": tensor["shape"],
                         "parameters": {"binary_data_size": len(body) - head_length}}],
        }).encode()  # fmt: skip
        answer = head + body[head_length:]
        self.send_response(200)
        self.send_header("Content-Length", str(len(answer)))
        self.send_header(HEADER_LENGTH, str(len(head)))
        self.end_headers()
        self.wfile.write(answer)
        self.close_connection = self.drop

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def _echo(drop: bool) -> Iterator[str]:
    _EchoHandler.connections, _EchoHandler.queries, _EchoHandler.drop = set(), [], drop
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EchoHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _until_the_server_closed(http: HttpInference) -> None:
    """Where the server drops connections, wait until this thread's has reached the client as closed:
    a query sent in between would meet a connection reset, a race of keep-alive no client can avoid."""
    connection = http._local.connection
    deadline = time.monotonic() + 10.0
    while _EchoHandler.drop and not _closed_by_peer(connection.sock) and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.fixture(params=[True, False], ids=["drops", "keeps-alive"])
def echo_server(request: pytest.FixtureRequest) -> Iterator[str]:
    with _echo(drop=request.param) as address:
        yield address


@pytest.fixture
def keepalive_server() -> Iterator[str]:
    with _echo(drop=False) as address:
        yield address


def test_a_kept_alive_connection_is_reused_and_one_the_server_closed_is_replaced(echo_server: str) -> None:
    http = HttpInference(echo_server, timeout_s=5.0)
    x = np.arange(32, dtype=np.float32).reshape(2, 16)
    try:
        for _ in range(3):
            np.testing.assert_array_equal(http.infer("echo", {"INPUT": x}, ["OUTPUT"])["OUTPUT"], x)
            _until_the_server_closed(http)
    finally:
        http.close()
    assert len(_EchoHandler.connections) == (3 if _EchoHandler.drop else 1)
    assert len(_EchoHandler.queries) == 3  # none sent twice


def test_each_thread_has_its_own_connection(keepalive_server: str) -> None:
    http = HttpInference(keepalive_server, timeout_s=5.0)
    answers: dict[int, bool] = {}

    def call(i: int) -> None:
        x = np.full((1, 16), i, dtype=np.float32)
        answers[i] = all(np.array_equal(http.infer("echo", {"INPUT": x}, ["OUTPUT"])["OUTPUT"], x) for _ in range(5))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        http.close()
    assert answers == {i: True for i in range(6)}
    assert len(_EchoHandler.connections) == 6  # one per thread, each kept for its five queries


def test_a_server_that_hangs_up_after_reading_the_query_is_not_sent_it_again(echo_server: str) -> None:
    http = HttpInference(echo_server, timeout_s=5.0)
    x = np.zeros((1, 16), np.float32)
    try:
        http.infer("echo", {"INPUT": x}, ["OUTPUT"])  # a connection to reuse, where the server keeps it
        _until_the_server_closed(http)
        with pytest.raises((OSError, http_client.HTTPException)):
            http.infer("vanish", {"INPUT": x}, ["OUTPUT"])
    finally:
        http.close()
    assert _EchoHandler.queries.count("/v2/models/vanish/infer") == 1


def test_close_closes_the_connections_of_every_thread(keepalive_server: str) -> None:
    http = HttpInference(keepalive_server, timeout_s=5.0)
    x = np.zeros((1, 16), np.float32)
    threads = [threading.Thread(target=http.infer, args=("echo", {"INPUT": x}, ["OUTPUT"])) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    connections = list(http._open)
    assert len(connections) == 3 and all(c.sock is not None for c in connections)
    http.close()  # from this thread, which never called
    assert all(c.sock is None for c in connections)


def test_an_error_answer_carries_its_status_and_one_line_message(echo_server: str) -> None:
    http = HttpInference(echo_server, timeout_s=5.0)
    try:
        with pytest.raises(InferenceFailed) as err:
            http.infer("bad", {"INPUT": np.zeros((1, 16), np.float32)}, ["OUTPUT"])
    finally:
        http.close()
    assert (err.value.status, err.value.text) == (400, "inference request for model 'bad' failed")


async def _until_the_server_closed_async(http: HttpInference) -> None:
    """`_until_the_server_closed` for the loop's pool: wait until the dropped connection reads as closed."""
    pool = http._pool()
    deadline = time.monotonic() + 10.0
    while _EchoHandler.drop and any(not c.closed for c in pool._idle) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


def test_on_an_event_loop_a_kept_alive_connection_is_reused_and_one_the_server_closed_is_replaced(
    echo_server: str,
) -> None:
    http = HttpInference(echo_server, timeout_s=5.0)
    x = np.arange(32, dtype=np.float32).reshape(2, 16)

    async def three() -> list[bool]:
        same = []
        try:
            for _ in range(3):
                same.append(np.array_equal((await http.infer_async("echo", {"INPUT": x}, ["OUTPUT"]))["OUTPUT"], x))
                await _until_the_server_closed_async(http)
        finally:
            http.close()  # on the loop, before it ends: its connections close there
        return same

    assert asyncio.run(three()) == [True] * 3
    assert len(_EchoHandler.connections) == (3 if _EchoHandler.drop else 1)
    assert len(_EchoHandler.queries) == 3  # none sent twice


def test_on_an_event_loop_concurrent_calls_each_have_a_connection_and_their_own_answer(keepalive_server: str) -> None:
    http = HttpInference(keepalive_server, timeout_s=5.0)

    async def call(i: int) -> bool:
        x = np.full((1, 16), i, dtype=np.float32)
        return np.array_equal((await http.infer_async("echo", {"INPUT": x}, ["OUTPUT"]))["OUTPUT"], x)

    async def together() -> list[bool]:
        try:
            return list(await asyncio.gather(*(call(i) for i in range(4))))
        finally:
            http.close()

    assert asyncio.run(together()) == [True] * 4
    assert len(_EchoHandler.connections) == 4


def test_on_an_event_loop_a_server_that_hangs_up_after_reading_the_query_is_not_sent_it_again(
    echo_server: str,
) -> None:
    http = HttpInference(echo_server, timeout_s=5.0)
    x = np.zeros((1, 16), np.float32)

    async def calls() -> None:
        try:
            await http.infer_async("echo", {"INPUT": x}, ["OUTPUT"])  # a connection to reuse where the server keeps it
            await _until_the_server_closed_async(http)
            await http.infer_async("vanish", {"INPUT": x}, ["OUTPUT"])
        finally:
            http.close()

    with pytest.raises(ConnectionError):
        asyncio.run(calls())
    assert _EchoHandler.queries.count("/v2/models/vanish/infer") == 1


def test_on_an_event_loop_an_error_answer_carries_its_status_and_one_line_message(echo_server: str) -> None:
    http = HttpInference(echo_server, timeout_s=5.0)

    async def bad() -> None:
        try:
            await http.infer_async("bad", {"INPUT": np.zeros((1, 16), np.float32)}, ["OUTPUT"])
        finally:
            http.close()

    with pytest.raises(InferenceFailed) as err:
        asyncio.run(bad())
    assert (err.value.status, err.value.text) == (400, "inference request for model 'bad' failed")


@pytest.mark.parametrize("address", ["localhost", "localhost:http", ":8000", "host:70000"])
def test_an_address_without_a_usable_port_is_a_one_line_error(address: str) -> None:
    with pytest.raises(ServerError, match="HOST:PORT") as err:
        TritonAdapter("127.0.0.1:9", http_address=address)
    assert "\n" not in err.value.one_line()


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedTriton]:
    repository = tmp_path_factory.mktemp("repo-http-inference")
    add_emulated(repository, "echo", 2.0, 0.0, max_batch=4)
    with EmbeddedTriton(repository, ["echo"]) as server:
        yield server


@pytest.fixture(params=[False, True], ids=["thread", "event-loop"])
def on_loop(request: pytest.FixtureRequest) -> Iterator[asyncio.AbstractEventLoop | None]:
    """Who calls the adapter: a thread (`infer`), or one event loop for the whole test (`infer_async`)."""
    if not request.param:
        yield None
        return
    loop = asyncio.new_event_loop()
    try:
        yield loop
    finally:
        loop.run_until_complete(asyncio.sleep(0.01))  # the adapter's close, closing its connections, runs here
        loop.close()


def _infer(
    adapter: TritonAdapter, on_loop: asyncio.AbstractEventLoop | None, model: str, inputs: dict[str, Any]
) -> dict[str, Any]:
    """The same call, and the same answers and errors, whether from a thread or on an event loop."""
    if on_loop is not None:
        return on_loop.run_until_complete(adapter.infer_async(model, inputs))
    return adapter.infer(model, inputs)


def test_triton_refusing_a_batch_is_a_query_error_not_an_unreachable_server(
    triton: EmbeddedTriton, on_loop: asyncio.AbstractEventLoop | None
) -> None:
    adapter = TritonAdapter(triton.grpc_address, http_address=triton.http_address)
    try:
        with pytest.raises(ServerError) as err:
            _infer(adapter, on_loop, "echo", {"INPUT": np.zeros((5, 16), np.float32)})  # over max_batch_size 4
        assert not isinstance(err.value, ServerUnreachable)
        assert "\n" not in err.value.one_line() and "echo" in err.value.one_line()
        out = _infer(adapter, on_loop, "echo", {"INPUT": np.ones((4, 16), np.float32)})  # the connection still serves
        np.testing.assert_array_equal(out["OUTPUT"], np.ones((4, 16), np.float32))
    finally:
        adapter.close()


def test_a_model_unloaded_while_serving_is_not_found(tmp_path: Path, on_loop: asyncio.AbstractEventLoop | None) -> None:
    add_emulated(tmp_path, "echo", 1.0, 0.0, max_batch=4)
    with EmbeddedTriton(tmp_path, ["echo"]) as server:
        adapter = TritonAdapter(server.grpc_address, http_address=server.http_address)
        try:
            _infer(adapter, on_loop, "echo", {"INPUT": np.zeros((1, 16), np.float32)})  # tensors known: HTTP only now
            tritonclient.grpc.InferenceServerClient(server.grpc_address).unload_model("echo")
            with pytest.raises(ModelNotFoundError) as err:
                _infer(adapter, on_loop, "echo", {"INPUT": np.zeros((1, 16), np.float32)})
            assert server.http_address in err.value.one_line()  # the address the query went to
        finally:
            adapter.close()


def test_nothing_listening_at_the_http_address_is_an_unreachable_server(
    tmp_path: Path, on_loop: asyncio.AbstractEventLoop | None
) -> None:
    add_emulated(tmp_path, "echo", 1.0, 0.0, max_batch=4)
    with EmbeddedTriton(tmp_path, ["echo"]) as server:
        adapter = TritonAdapter(server.grpc_address, http_address=server.http_address)
        _infer(adapter, on_loop, "echo", {"INPUT": np.zeros((1, 16), np.float32)})
    try:
        with pytest.raises(ServerUnreachable) as err:  # the server is gone: the router retries elsewhere
            _infer(adapter, on_loop, "echo", {"INPUT": np.zeros((1, 16), np.float32)})
        assert "unreachable" in err.value.one_line()
    finally:
        adapter.close()
