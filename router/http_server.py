"""A lean HTTP/1.1 server for the router's endpoint: httptools' parser on asyncio's transports.

Every query of a pipeline crosses this hop, and on a machine shared with the model servers its CPU
is taken from them. A web framework builds a request object, a router match, a middleware chain, a
task and a response object per request; here a request is parsed by httptools (llhttp) inside
`data_received`, handed to one `dispatch` function, and its reply written with one
`transport.write`. A reply that needs waiting (a query in the pipeline) is an asyncio future, so no
task is created per query.

HTTP/1.1 as clients use it: keep-alive (HTTP/1.0 and `Connection: close` close after the reply),
pipelined requests answered in order, `Expect: 100-continue`, Content-Length and chunked request
bodies, a body limit (413), and 400 for what the parser rejects.
"""

from __future__ import annotations

import asyncio
import collections
import http
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

import httptools

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    """The target's path, without the query string."""
    headers: dict[str, str]
    """Header names in lower case."""
    body: bytes


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


Dispatch = Callable[[Request], "Reply | Awaitable[Reply]"]
"""Answers a request at once (a Reply) or later (an awaitable of one); must not raise."""

_REASONS = {status.value: status.phrase.encode() for status in http.HTTPStatus}


def encode_reply(reply: Reply, keep_alive: bool) -> bytes:
    head = [
        b"HTTP/1.1 %d %s\r\n" % (reply.status, _REASONS.get(reply.status, b"")),
        b"Content-Type: %s\r\nContent-Length: %d\r\n" % (reply.content_type.encode(), len(reply.body)),
    ]
    head.extend(f"{k}: {v}\r\n".encode("latin-1") for k, v in reply.headers)
    if not keep_alive:
        head.append(b"Connection: close\r\n")
    head.append(b"\r\n")
    return b"".join(head) + reply.body


def _error(status: int, message: str) -> Reply:
    return Reply(status, b'{"error": "%s"}' % message.replace('"', "'").encode())


class _TooLarge(Exception):
    """Raised inside the parser's callbacks: the body is over the server's limit."""


class _Slot:
    """One request's place in its connection's order of replies."""

    __slots__ = ("data", "keep_alive")

    def __init__(self, keep_alive: bool) -> None:
        self.keep_alive = keep_alive
        self.data: bytes | None = None


class _Connection(asyncio.Protocol):
    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.slots: collections.deque[_Slot] = collections.deque()
        self.closing = False
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._size = 0

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports only quack like one
        self.server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(_error(400, "protocol upgrades are not supported"))
        except httptools.HttpParserError as exc:
            too_large = exc.__context__ if isinstance(exc.__context__, _TooLarge) else None
            self._refuse(_error(413, str(too_large)) if too_large else _error(400, f"malformed HTTP request: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.slots.clear()
        self.server.connections.discard(self)

    # -- httptools callbacks
    def on_message_begin(self) -> None:
        self._url, self._headers, self._body, self._size = b"", {}, [], 0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        length = self._headers.get("content-length", "0")
        if length.isdigit() and int(length) > self.server.max_body_bytes:
            raise _TooLarge(f"the request body of {length} bytes exceeds the limit of {self.server.max_body_bytes}")
        if self._headers.get("expect", "").lower() == "100-continue" and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self.server.max_body_bytes:
            raise _TooLarge(f"the request body exceeds the limit of {self.server.max_body_bytes} bytes")
        self._body.append(body)

    def on_message_complete(self) -> None:
        path = httptools.parse_url(self._url).path.decode("latin-1") if self._url else "/"
        request = Request(self.parser.get_method().decode(), path, self._headers, b"".join(self._body))
        slot = _Slot(self.parser.should_keep_alive())
        self.slots.append(slot)
        try:
            reply = self.server.dispatch(request)
        except Exception as exc:  # dispatch must not raise; a bug still answers, never kills the connection
            log.exception("HTTP dispatch failed")
            reply = _error(500, f"{type(exc).__name__}: {exc}")
        if isinstance(reply, Reply):
            self._fill(slot, reply)
        else:
            asyncio.ensure_future(reply).add_done_callback(lambda done: self._fill(slot, _outcome(done)))

    # -- replies
    def _fill(self, slot: _Slot, reply: Reply) -> None:
        slot.data = encode_reply(reply, slot.keep_alive)
        while self.slots and self.slots[0].data is not None and self.transport is not None:
            done = self.slots.popleft()
            self.transport.write(done.data)  # type: ignore[arg-type]
            if not done.keep_alive:
                self._close()
                return

    def _refuse(self, reply: Reply) -> None:
        """Answer a request the parser rejected (after the replies before it), then close."""
        slot = _Slot(keep_alive=False)
        self.slots.append(slot)
        self._fill(slot, reply)
        self.closing = True

    def _close(self) -> None:
        self.closing = True
        self.slots.clear()
        if self.transport is not None:
            self.transport.close()


def _outcome(done: asyncio.Future[Reply]) -> Reply:
    if done.cancelled():
        return _error(503, "the server is stopping")
    exc = done.exception()
    if exc is not None:
        log.error("HTTP handler failed: %r", exc)
        return _error(500, f"{type(exc).__name__}: {exc}")
    return done.result()


class HttpServer:
    """Serves `dispatch` on a bound socket in the running loop; `close` stops listening and drops connections."""

    def __init__(self, dispatch: Dispatch, max_body_bytes: int) -> None:
        self.dispatch = dispatch
        self.max_body_bytes = max_body_bytes
        self.connections: set[_Connection] = set()
        self._server: asyncio.Server | None = None

    async def start(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), sock=sock)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection._close()
        if self._server is not None:
            await self._server.wait_closed()
