"""HTTP/1.1 keep-alive connections for asyncio clients (the router's KServe client, the Triton adapter's
async inference): httptools' parser on asyncio's transports.

A load generator on the same machine as the pipeline takes its CPU from the pipeline, so a
client's cost per query is part of what a replay measures. aiohttp's client session spends most
of its time on machinery a KServe v2 caller never needs (cookies, redirects, tracing, per-request
timer objects, multidicts); measured on 2 cores at 500 q/s, it took 0.6 ms of CPU per query. Here
a request is one `transport.write` of a prebuilt head and body, and the response is parsed by
httptools (llhttp's bindings, which uvicorn uses), which handles Content-Length and chunked
bodies alike.

A connection carries one request at a time (no pipelining). A request is never sent twice: a
connection the server closed while idle is noticed before reuse (the loop has already delivered
its EOF), and a connection lost mid-request fails that request.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from dataclasses import dataclass
from typing import cast

import httptools

KEEP_IDLE_S = 30.0
"""A connection unused this long is closed rather than reused: servers close idle ones (the router's
after 75 s), and a request sent just as the server closes would fail without having been served."""


class ConnectionFailed(Exception):
    """The connection could not open, or closed before the whole response arrived."""


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]
    """Header names in lower case."""
    body: bytes


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[Response] | None = None
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._keep_alive = True
        self.idle_since = 0.0

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports only quack like one

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionFailed(f"malformed HTTP response: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(ConnectionFailed("the server closed the connection" + (f": {exc}" if exc else "")))

    # -- httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._keep_alive = self._parser.should_keep_alive()
        response = Response(self._parser.get_status_code(), self._headers, b"".join(self._body))
        self._headers, self._body = {}, []
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(response)

    # -- use
    def send(self, data: bytes) -> asyncio.Future[Response]:
        assert self.transport is not None and self._waiter is None
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self._waiter

    @property
    def reusable(self) -> bool:
        return not self.closed and self._keep_alive and self._waiter is None

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _fail(self, exc: Exception) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)


class ConnectionPool:
    """Kept-alive connections to one host:port, opened as needed: an open-loop caller has as many
    requests in flight as it must, one connection each."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._idle: collections.deque[_Connection] = collections.deque()
        """Most recently used last; each with the time it was put back."""
        self._open: set[_Connection] = set()
        """Every connection not yet closed, idle or carrying a request."""
        self._host_header = f"Host: {host}:{port}\r\n".encode()

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> Response:
        """One request and its whole response; cancel it (e.g. with asyncio.timeout) to give up."""
        head = [f"{method} {path} HTTP/1.1\r\n".encode(), self._host_header]
        if headers:
            head.extend(f"{k}: {v}\r\n".encode("latin-1") for k, v in headers.items())
        head.append(b"Content-Length: %d\r\n\r\n" % len(body))
        connection = await self._acquire()
        try:
            response = await connection.send(b"".join(head) + body)
        except BaseException:
            self._discard(connection)  # a half-read response would poison the next request on it
            raise
        if connection.reusable:
            connection.idle_since = time.monotonic()
            self._idle.append(connection)
        else:
            self._discard(connection)
        return response

    async def _acquire(self) -> _Connection:
        stale = time.monotonic() - KEEP_IDLE_S
        while self._idle and self._idle[0].idle_since < stale:
            self._discard(self._idle.popleft())
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed:
                return connection
            self._discard(connection)
        loop = asyncio.get_running_loop()
        try:
            _, connection = await loop.create_connection(_Connection, self.host, self.port)
        except OSError as exc:
            raise ConnectionFailed(f"cannot connect to {self.host}:{self.port}: {exc.strerror or exc}") from None
        self._open.add(connection)
        return connection

    def _discard(self, connection: _Connection) -> None:
        connection.close()
        self._open.discard(connection)

    def close(self) -> None:
        """Close every connection; requests still under way fail with ConnectionFailed."""
        for connection in list(self._open):
            with contextlib.suppress(Exception):
                connection.close()
        self._open.clear()
        self._idle.clear()
