"""A lean HTTP/1.1 server for the router's endpoint: httptools' parser on asyncio's transports.

Every query of a pipeline crosses this hop, and on a machine shared with the model servers its CPU
is taken from them. A web framework builds a request object, a router match, a middleware chain, a
task and a response object per request; here a request is parsed by httptools (llhttp) inside
`data_received`, handed to one `dispatch` function, and its reply written with one
`transport.write`. A reply that needs waiting (a query in the pipeline) is a `Later`, written from
the router's answer itself, so no task or future is created per query.

HTTP/1.1 as clients use it: keep-alive (HTTP/1.0 and `Connection: close` close after the reply;
idle connections close after a while), pipelined requests answered in order (reading pauses while
too many wait, or while the peer reads no replies), HEAD, `Expect: 100-continue`, Content-Length
and chunked request bodies, a body limit (413), 400 for what the parser rejects, and 503 for
requests still waiting when the server stops.
"""

from __future__ import annotations

import asyncio
import collections
import http
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import NoReturn, cast

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


@dataclass(frozen=True)
class Later:
    """A reply that comes later with no future in between: `start(write)` arranges for `write(reply)`
    to be called once, on the server's loop. The reply is written in that call, not a loop turn later."""

    start: Callable[[Callable[[Reply], None]], None]


Dispatch = Callable[[Request], "Reply | Later | Awaitable[Reply]"]
"""Answers a request at once (a Reply) or later (a Later, or an awaitable of a Reply); must not raise."""

_REASONS = {status.value: status.phrase.encode() for status in http.HTTPStatus}


def encode_reply(reply: Reply, keep_alive: bool, with_body: bool = True) -> bytes:
    head = [
        b"HTTP/1.1 %d %s\r\n" % (reply.status, _REASONS.get(reply.status, b"")),
        b"Content-Type: %s\r\nContent-Length: %d\r\n" % (reply.content_type.encode(), len(reply.body)),
    ]
    head.extend(f"{k}: {v}\r\n".encode("latin-1") for k, v in reply.headers)
    if not keep_alive:
        head.append(b"Connection: close\r\n")
    head.append(b"\r\n")
    return b"".join(head) + (reply.body if with_body else b"")


def _error(status: int, message: str) -> Reply:
    return Reply(status, json.dumps({"error": message}).encode())


MAX_URL_BYTES = 8192
"""The longest request target taken (the protocol's paths are short; a longer one is refused, 414)."""
MAX_PENDING_REPLIES = 32
"""Pipelined requests a connection may have waiting for replies before the server stops reading it
(after the read under way, whose requests are all taken)."""


class _Slot:
    """One request's place in its connection's order of replies."""

    __slots__ = ("data", "head_only", "keep_alive")

    def __init__(self, keep_alive: bool, head_only: bool = False) -> None:
        self.keep_alive = keep_alive
        self.head_only = head_only
        self.data: bytes | None = None


class _Connection(asyncio.Protocol):
    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.slots: collections.deque[_Slot] = collections.deque()
        self.closing = False
        self.last_active = 0.0
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._size = 0
        self._refusal: Reply | None = None
        """Why a callback stopped the parser, answered in its place (else a plain 400)."""
        self._paused = {"replies": False, "writes": False}

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports only quack like one
        self.last_active = self.server.now()
        self.server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.last_active = self.server.now()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # The request itself was complete and is answered as plain HTTP/1.1 (declining the
            # upgrade); what follows it is another protocol, so the connection ends after the replies.
            self._end_after_replies()
        except httptools.HttpParserError as exc:
            if self._refusal is not None:
                self._refuse(self._refusal)
            else:
                self._refuse(_error(400, f"malformed HTTP request: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.slots.clear()
        self.server.connections.discard(self)

    def pause_writing(self) -> None:
        self._pause("writes", True)

    def resume_writing(self) -> None:
        self._pause("writes", False)

    # -- httptools callbacks
    def on_message_begin(self) -> None:
        self._url, self._headers, self._body, self._size = b"", {}, [], 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > MAX_URL_BYTES:
            self._stop(_error(414, f"the request target exceeds {MAX_URL_BYTES} bytes"))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        length = self._headers.get("content-length", "0")
        if length.isdigit() and int(length) > self.server.max_body_bytes:
            self._stop(
                _error(413, f"the request body of {length} bytes exceeds the limit of {self.server.max_body_bytes}")
            )
        expects = self._headers.get("expect", "").lower() == "100-continue"
        if expects and not self.slots and self.parser.get_http_version() == "1.1" and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self.server.max_body_bytes:
            self._stop(_error(413, f"the request body exceeds the limit of {self.server.max_body_bytes} bytes"))
        self._body.append(body)

    def on_message_complete(self) -> None:
        try:
            path = httptools.parse_url(self._url).path.decode("latin-1") if self._url else "/"
        except httptools.HttpParserInvalidURLError:
            self._stop(_error(400, f"the request target {self._url[:80].decode('latin-1')!r} is not a path"))
        method = self.parser.get_method().decode()
        # HEAD is GET without the body (its Content-Length still says how long the body would be).
        head_only = method == "HEAD"
        request = Request("GET" if head_only else method, path, self._headers, b"".join(self._body))
        slot = _Slot(self.parser.should_keep_alive(), head_only)
        self.slots.append(slot)
        if len(self.slots) >= MAX_PENDING_REPLIES:
            self._pause("replies", True)
        try:
            reply = self.server.dispatch(request)
        except Exception as exc:  # dispatch must not raise; a bug still answers, never kills the connection
            log.exception("HTTP dispatch failed")
            reply = _error(500, f"{type(exc).__name__}: {exc}")
        if isinstance(reply, Reply):
            self._fill(slot, reply)
        elif isinstance(reply, Later):
            reply.start(lambda answer: self._fill(slot, answer))
        else:
            asyncio.ensure_future(reply).add_done_callback(lambda done: self._fill(slot, _outcome(done)))

    # -- replies
    @property
    def idle(self) -> bool:
        return not self.slots

    def _fill(self, slot: _Slot, reply: Reply) -> None:
        if slot.data is not None:  # already answered (the server stopping)
            return
        self.last_active = self.server.now()
        slot.data = encode_reply(reply, slot.keep_alive, with_body=not slot.head_only)
        while self.slots and self.slots[0].data is not None and self.transport is not None:
            done = self.slots.popleft()
            self.transport.write(done.data)  # type: ignore[arg-type]
            if not done.keep_alive:
                self._close()
                return
        if self._paused["replies"] and len(self.slots) < MAX_PENDING_REPLIES // 2:
            self._pause("replies", False)

    def _pause(self, why: str, paused: bool) -> None:
        """Stop reading while replies pile up or the peer does not read them (pipelining without bound)."""
        was = any(self._paused.values())
        self._paused[why] = paused
        now = any(self._paused.values())
        if self.transport is None or self.closing or was == now:
            return
        if now:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    def _stop(self, refusal: Reply) -> NoReturn:
        """Stop the parser from one of its callbacks; data_received answers `refusal`, then closes."""
        self._refusal = refusal
        raise ValueError(refusal.body.decode())

    def _refuse(self, reply: Reply) -> None:
        """Answer a request the parser rejected (after the replies before it), then close."""
        slot = _Slot(keep_alive=False)
        self.slots.append(slot)
        self._fill(slot, reply)
        self.closing = True

    def _end_after_replies(self) -> None:
        self.closing = True  # read nothing more
        if self.slots:
            self.slots[-1].keep_alive = False  # its reply is not encoded yet unless all are written
            if self.slots[-1].data is None:
                return
        self._close()

    def stop(self) -> None:
        """The server is stopping: requests still waiting are answered 503, in order, and the connection closes."""
        for slot in list(self.slots):
            if slot.data is None:
                slot.keep_alive = False
                self._fill(slot, _error(503, "the server is stopping"))
        self._close()

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
    """Serves `dispatch` on a bound socket in the running loop; `close` stops listening and drops connections.

    A kept-alive connection idle for `idle_timeout_s` (no request under way, nothing received) is
    closed, so clients that vanish do not hold sockets for ever; a sweep checks every few seconds
    instead of a timer per request.
    """

    def __init__(self, dispatch: Dispatch, max_body_bytes: int, idle_timeout_s: float = 75.0) -> None:
        self.dispatch = dispatch
        self.max_body_bytes = max_body_bytes
        self.idle_timeout_s = idle_timeout_s
        self.connections: set[_Connection] = set()
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self.now = time.monotonic

    async def start(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), sock=sock)
        self._sweep()

    def _sweep(self) -> None:
        cutoff = self.now() - self.idle_timeout_s
        for connection in [c for c in self.connections if c.idle and c.last_active < cutoff]:
            connection._close()
            if connection.transport is not None:
                connection.transport.abort()  # a peer gone for good: its unread replies need not wait
        period_s = min(5.0, self.idle_timeout_s / 4)
        self._sweeper = asyncio.get_running_loop().call_later(period_s, self._sweep)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection.stop()
        await asyncio.sleep(0.05)  # the replies just written reach their peers, unless they stopped reading
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()
