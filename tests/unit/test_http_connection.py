"""The clients' kept-alive HTTP connections against a scripted server: reuse, framing, and never a request twice."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from inferline import http_connection
from inferline.http_connection import ConnectionFailed, ConnectionPool

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "Scripted"], Awaitable[None]]


class Scripted:
    """A server that counts connections and requests and answers as its script says."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.script(reader, writer, self)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0
        )
        body = await reader.readexactly(length)
        self.requests.append(head.split(b"\r\n")[0] + b" " + body)
        return body


def serve(script: Script, test: Callable[[ConnectionPool, Scripted], Awaitable[Any]]) -> Any:
    async def go() -> Any:
        scripted = Scripted(script)
        server = await asyncio.start_server(scripted.handle, "127.0.0.1", 0)
        pool = ConnectionPool("127.0.0.1", server.sockets[0].getsockname()[1])
        try:
            return await asyncio.wait_for(test(pool, scripted), 10)
        finally:
            pool.close()
            server.close()
            await server.wait_closed()

    return asyncio.run(go())


async def keep_alive_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Scripted) -> None:
    while True:
        body = await s.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Kind: echo\r\n\r\n%s" % (len(body), body))
        await writer.drain()


def test_a_kept_alive_connection_carries_request_after_request() -> None:
    async def test(pool: ConnectionPool, s: Scripted) -> list[Any]:
        return [await pool.request("POST", "/p", b"q%d" % i, {"X-A": "1"}) for i in range(3)]

    responses = serve(keep_alive_echo, test)
    assert [(r.status, r.body, r.headers["x-kind"]) for r in responses] == [(200, b"q%d" % i, "echo") for i in range(3)]


def test_requests_in_flight_at_once_each_get_a_connection() -> None:
    async def test(pool: ConnectionPool, s: Scripted) -> tuple[list[bytes], int]:
        replies = await asyncio.gather(*(pool.request("POST", "/p", b"%d" % i) for i in range(5)))
        return [r.body for r in replies], s.connections

    bodies, connections = serve(keep_alive_echo, test)
    assert bodies == [b"%d" % i for i in range(5)] and connections == 5


def test_a_chunked_response_is_joined() -> None:
    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Scripted) -> None:
        await s.read_request(reader)
        writer.write(b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\nRetry-After: 1\r\n\r\n")
        writer.write(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
        await writer.drain()
        await reader.read()

    async def test(pool: ConnectionPool, s: Scripted) -> Any:
        return await pool.request("GET", "/")

    response = serve(chunked, test)
    assert (response.status, response.body, response.headers["retry-after"]) == (503, b"abcde", "1")


def test_an_idle_connection_the_server_closed_is_not_reused_and_nothing_is_sent_twice() -> None:
    async def one_per_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Scripted) -> None:
        body = await s.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()  # then close, although the reply said nothing of closing

    async def test(pool: ConnectionPool, s: Scripted) -> tuple[list[bytes], int, list[bytes]]:
        first = await pool.request("POST", "/p", b"one")
        await asyncio.sleep(0.1)  # the server's close reaches the idle connection
        second = await pool.request("POST", "/p", b"two")
        return [first.body, second.body], s.connections, s.requests

    bodies, connections, requests = serve(one_per_connection, test)
    assert bodies == [b"one", b"two"] and connections == 2
    assert requests == [b"POST /p HTTP/1.1 one", b"POST /p HTTP/1.1 two"]


def test_connection_close_in_the_reply_is_honoured() -> None:
    async def closing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Scripted) -> None:
        await s.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        await reader.read()  # keeps its side open: the client must not send here again

    async def test(pool: ConnectionPool, s: Scripted) -> int:
        for _ in range(2):
            assert (await pool.request("GET", "/")).body == b"ok"
        return s.connections

    assert serve(closing, test) == 2


def test_a_connection_lost_mid_request_fails_it_without_a_resend() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Scripted) -> None:
        await s.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\npart")  # then gone

    async def test(pool: ConnectionPool, s: Scripted) -> list[bytes]:
        with pytest.raises(ConnectionFailed, match="closed the connection"):
            await pool.request("POST", "/p", b"once")
        return s.requests

    assert serve(hang_up, test) == [b"POST /p HTTP/1.1 once"]


def test_nothing_listening_and_close_fail_requests() -> None:
    async def test(pool: ConnectionPool, s: Scripted) -> None:
        waiting = asyncio.ensure_future(pool.request("GET", "/"))
        await asyncio.sleep(0.2)  # under way: the script below never answers
        pool.close()
        with pytest.raises(ConnectionFailed):
            await waiting

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Scripted) -> None:
        await reader.read()

    serve(silent, test)

    async def nowhere() -> None:
        with pytest.raises(ConnectionFailed, match=r"cannot connect to 127\.0\.0\.1:1"):
            await ConnectionPool("127.0.0.1", 1).request("GET", "/")

    asyncio.run(nowhere())


def test_a_connection_idle_too_long_is_replaced_not_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_connection, "KEEP_IDLE_S", 0.1)

    async def test(pool: ConnectionPool, s: Scripted) -> list[int]:
        seen = []
        for pause_s in (0.0, 0.01, 0.3):
            await asyncio.sleep(pause_s)
            await pool.request("POST", "/p", b"x")
            seen.append(s.connections)
        return seen

    assert serve(keep_alive_echo, test) == [1, 1, 2]
