"""The router's lean HTTP/1.1 server, spoken to over raw sockets: what clients rely on besides the happy path."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Awaitable, Callable, Iterator

import pytest

from inferline.router.event_loop import LoopThread
from inferline.router.http_frontend import bind
from inferline.router.http_server import MAX_PENDING_REPLIES, HttpServer, Later, Reply, Request

LIMIT = 1000


class App:
    """Echoes the request; /slow (a future) and /later (a Later) answer once `release` is called;
    /boom raises; /fail fails later."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.slow: list[Callable[[Reply], None]] = []

    def dispatch(self, request: Request) -> Reply | Later | Awaitable[Reply]:
        if request.path == "/boom":
            raise RuntimeError("a bug")
        if request.path == "/slow":
            future: asyncio.Future[Reply] = self.loop.create_future()
            self.slow.append(future.set_result)
            return future
        if request.path == "/later":
            return Later(self.slow.append)
        if request.path == "/fail":
            return self._fail()
        body = f"{request.method} {request.path} {len(request.body)} ".encode() + request.body
        return Reply(200, body, "text/plain", (("X-Seen", request.headers.get("x-tag", "-")),))

    async def _fail(self) -> Reply:
        raise ValueError("failed later")

    def wait_for(self, count: int = 1, timeout_s: float = 5.0) -> None:
        """Until `count` requests wait for `release` (the server has read and dispatched them)."""
        deadline = time.monotonic() + timeout_s
        while len(self.slow) < count:
            assert time.monotonic() < deadline, f"{len(self.slow)} of {count} requests dispatched"
            time.sleep(0.005)

    def release(self) -> None:
        """Answers the waiting requests, once the server has dispatched at least one (a slow machine's
        server may not have read it yet)."""
        self.wait_for(1)

        def go() -> None:
            for i, answer in enumerate(self.slow):
                answer(Reply(200, b"slow %d" % i, "text/plain"))

        self.loop.call_soon_threadsafe(go)


@contextlib.contextmanager
def serving(idle_timeout_s: float = 75.0) -> Iterator[tuple[int, App, HttpServer]]:
    loop = LoopThread("test-http-server")
    app = App(loop.loop)
    server = HttpServer(app.dispatch, LIMIT, idle_timeout_s)
    sock = bind("127.0.0.1", 0)
    loop.call(server.start(sock))
    try:
        yield sock.getsockname()[1], app, server
    finally:
        loop.call(server.close())
        loop.close()


@pytest.fixture
def served() -> Iterator[tuple[int, App, HttpServer]]:
    with serving() as started:
        yield started


class Conn:
    """A raw client socket that reads Content-Length framed replies (as the server always sends)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.buffer = b""

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _more(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {self.buffer!r}")
        self.buffer += chunk

    def reply(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buffer:
            self._more()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(self.buffer) < length:
            self._more()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return int(lines[0].split()[1]), headers, body

    def closed_by_peer(self) -> bool:
        self.sock.settimeout(5)
        return self.buffer == b"" and self.sock.recv(1) == b""


def test_keep_alive_serves_many_requests_on_one_connection(served: tuple[int, App, HttpServer]) -> None:
    port, _, _ = served
    with Conn(port) as s:
        for i in range(3):
            body = b"x" * i
            s.send(b"POST /echo HTTP/1.1\r\nHost: h\r\nX-Tag: t%d\r\nContent-Length: %d\r\n\r\n%s" % (i, i, body))
            status, headers, reply = s.reply()
            assert (status, reply, headers["x-seen"]) == (200, b"POST /echo %d " % i + body, f"t{i}")
            assert "connection" not in headers


LATER = pytest.mark.parametrize("waits", [b"/slow", b"/later"], ids=["future", "later"])


@LATER
def test_pipelined_requests_are_answered_in_order(served: tuple[int, App, HttpServer], waits: bytes) -> None:
    port, app, _ = served
    with Conn(port) as s:
        s.send(b"GET %s HTTP/1.1\r\nHost: h\r\n\r\nGET /fast?q=1 HTTP/1.1\r\nHost: h\r\n\r\n" % waits)
        s.sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            s.sock.recv(1)  # the fast reply waits behind the slow one
        app.release()
        s.sock.settimeout(5)
        assert s.reply()[2] == b"slow 0"
        assert s.reply()[2] == b"GET /fast 0 "  # the query string is not part of the path


@pytest.mark.parametrize(
    "request_head",
    [b"GET /a HTTP/1.0\r\n\r\n", b"GET /a HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"],
    ids=["http-1.0", "connection-close"],
)
def test_a_client_that_does_not_keep_alive_is_closed_after_its_reply(
    served: tuple[int, App, HttpServer], request_head: bytes
) -> None:
    port, _, _ = served
    with Conn(port) as s:
        s.send(request_head)
        status, headers, body = s.reply()
        assert status == 200 and body == b"GET /a 0 " and headers["connection"] == "close"
        assert s.closed_by_peer()


def test_expect_100_continue_and_a_chunked_body(served: tuple[int, App, HttpServer]) -> None:
    port, _, _ = served
    with Conn(port) as s:
        s.send(b"POST /e HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
        assert s.sock.recv(64) == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.send(b"abc")
        assert s.reply()[2] == b"POST /e 3 abc"
        s.send(b"POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n")
        assert s.reply()[2] == b"POST /c 5 abcde"


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST /big HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % (LIMIT + 1),
        b"POST /big HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n"
        % (LIMIT + 1, b"y" * (LIMIT + 1)),
    ],
    ids=["declared", "chunked"],
)
def test_a_body_over_the_limit_is_413_and_closes(served: tuple[int, App, HttpServer], request_bytes: bytes) -> None:
    port, _, _ = served
    with Conn(port) as s:
        s.send(request_bytes)
        status, _, body = s.reply()
        assert status == 413 and b"exceeds the limit of 1000" in body
        assert s.closed_by_peer()


def test_a_malformed_request_is_400_and_closes(served: tuple[int, App, HttpServer]) -> None:
    port, _, _ = served
    with Conn(port) as s:
        s.send(b"GET /ok HTTP/1.1\r\nHost: h\r\n\r\nNOT HTTP AT ALL\r\n\r\n")
        assert s.reply()[0] == 200  # the good request before it is still answered
        status, _, body = s.reply()
        assert status == 400 and b"malformed HTTP request" in body
        assert s.closed_by_peer()


@pytest.mark.parametrize(
    ("request_bytes", "status", "message"),
    [
        (b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: h\r\n\r\n", 414, b"the request target exceeds 8192 bytes"),
        (b"CONNECT x:80 HTTP/1.1\r\nHost: h\r\n\r\n", 400, b"the request target 'x:80' is not a path"),
    ],
    ids=["long target", "not a path"],
)
def test_a_target_that_is_no_path_says_so_and_closes(
    served: tuple[int, App, HttpServer], request_bytes: bytes, status: int, message: bytes
) -> None:
    port, _, _ = served
    with Conn(port) as s:
        s.send(request_bytes)
        got, _, body = s.reply()
        assert got == status and message in body, body
        assert s.closed_by_peer()


def test_a_handler_bug_answers_500_and_keeps_the_connection(served: tuple[int, App, HttpServer]) -> None:
    port, _, _ = served
    with Conn(port) as s:
        for path in (b"/boom", b"/fail"):
            s.send(b"GET %s HTTP/1.1\r\nHost: h\r\n\r\n" % path)
            status, _, body = s.reply()
            assert status == 500 and b"Error" in body
        s.send(b"GET /after HTTP/1.1\r\nHost: h\r\n\r\n")
        assert s.reply()[:1] == (200,)


def test_an_idle_connection_is_closed_a_busy_one_is_not() -> None:
    with serving(idle_timeout_s=0.2) as (port, app, _), Conn(port) as idle, Conn(port) as busy:
        busy.send(b"GET /slow HTTP/1.1\r\nHost: h\r\n\r\n")
        assert idle.closed_by_peer()  # within the socket's 5 s timeout
        app.release()  # the busy one was kept: its reply still comes
        assert busy.reply()[2] == b"slow 0"


def test_head_is_get_without_the_body(served: tuple[int, App, HttpServer]) -> None:
    port, _, _ = served
    with Conn(port) as s:
        s.send(b"HEAD /h HTTP/1.1\r\nHost: h\r\n\r\nGET /g HTTP/1.1\r\nHost: h\r\n\r\n")
        while b"GET /g" not in s.buffer:
            s._more()
        first, second = s.buffer.split(b"\r\n\r\n", 1)
        assert first.startswith(b"HTTP/1.1 200 OK\r\n") and b"Content-Length: 9" in first  # as GET's "GET /h 0 "
        assert second.startswith(b"HTTP/1.1 200 OK\r\n") and second.endswith(b"GET /g 0 ")  # no body between


def test_an_upgrade_request_is_answered_then_the_connection_ends(served: tuple[int, App, HttpServer]) -> None:
    port, _, _ = served
    with Conn(port) as s:
        s.send(b"GET /u HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\nPRI * HTTP/2.0\r\n")
        status, _, body = s.reply()
        assert (status, body) == (200, b"GET /u 0 ")
        assert s.closed_by_peer()  # and nothing after the reply: no stray 400


@LATER
def test_reading_pauses_while_pipelined_replies_pile_up(served: tuple[int, App, HttpServer], waits: bytes) -> None:
    port, app, _ = served
    request = b"GET %s HTTP/1.1\r\nHost: h\r\n\r\n" % waits
    with Conn(port) as s:
        s.send(request * MAX_PENDING_REPLIES)  # one read: all are taken, then reading pauses
        app.wait_for(MAX_PENDING_REPLIES)
        s.send(request * 8)
        time.sleep(0.3)
        assert len(app.slow) == MAX_PENDING_REPLIES  # the later ones wait unread in the socket
        app.release()
        for i in range(MAX_PENDING_REPLIES):
            assert s.reply()[2] == b"slow %d" % i
        time.sleep(0.3)
        assert len(app.slow) == MAX_PENDING_REPLIES + 8  # reading resumed


@LATER
def test_close_answers_waiting_requests_503_and_drops_connections(
    served: tuple[int, App, HttpServer], waits: bytes
) -> None:
    port, app, server = served
    with Conn(port) as s:
        s.send(b"GET %s HTTP/1.1\r\nHost: h\r\n\r\n" % waits)
        app.wait_for(1)
        asyncio.run_coroutine_threadsafe(server.close(), app.loop).result(5)
        status, headers, body = s.reply()
        assert status == 503 and b"stopping" in body and headers["connection"] == "close"
        app.release()  # an answer coming after all is dropped, not written to a closed connection
        assert s.closed_by_peer()
    with pytest.raises(OSError):
        Conn(port)
