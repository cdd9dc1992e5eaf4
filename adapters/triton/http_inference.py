"""Inference over Triton's HTTP endpoint: one kept-alive connection per calling thread.

The data path of the router's replicas and of the profiler (KServe v2 over HTTP/1.1 with Triton's
binary tensor extension). tritonclient encodes and decodes the bodies; the standard library's
http.client carries them, because every extra thread hand-off and wake-up of a client stack is
paid on each call. Measured on the 2-core VM through the adapter, per call of an emulated model at
batch 4 (about 15.5 ms), two rounds each:

    tritonclient gRPC              0.92-0.96 ms client CPU, 0.73-0.80 ms Triton CPU
    this                           0.69-0.85 ms client CPU, 0.53-0.60 ms Triton CPU, 0.1-0.3 ms sooner

Connections are per thread because an HTTPConnection serves one request at a time and a caller
such as the profiler calls from threads of its own. `infer_async` is the same call for a caller on
an event loop (the router's replicas): kept-alive connections of `inferline.http_connection`, a
pool per loop.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import select
import socket
import threading
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

import numpy as np
import tritonclient.http as httpclient
from numpy.typing import NDArray
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from inferline.http_connection import ConnectionFailed, ConnectionPool

HEADER_LENGTH = "Inference-Header-Content-Length"


class InferenceFailed(Exception):
    """Triton answered with an error: `status` is the HTTP status, `text` its message."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status, self.text = status, text


class NotConnected(ConnectionError):
    """No connection could be opened (refused, or no answer to the connect in time): nothing ran."""


def parse_address(address: str) -> tuple[str, int]:
    """(host, port) from "HOST:PORT"; ValueError naming the address otherwise."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


class HttpInference:
    def __init__(self, address: str, timeout_s: float) -> None:
        self.address = address
        self.host, self.port = parse_address(address)
        self.timeout_s = timeout_s
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: set[http.client.HTTPConnection] = set()
        self._pools: dict[asyncio.AbstractEventLoop, ConnectionPool] = {}

    def infer(
        self, model: str, inputs: Mapping[str, NDArray[np.generic]], outputs: Sequence[str]
    ) -> dict[str, NDArray[np.generic]]:
        """Outputs by name. Raises InferenceFailed for an error answer, NotConnected when no
        connection opens, and other OSErrors (TimeoutError: no answer in time) and
        http.client.HTTPExceptions when the connection fails mid-call.

        Never sends a query twice: a kept-alive connection the server has closed meanwhile is
        noticed before the query goes out on it (as urllib3 does), not by resending after a failure,
        since a failure after sending cannot tell whether the model ran.
        """
        body, headers = request(inputs, outputs)
        connection = self._connection()
        try:
            connection.request("POST", f"/v2/models/{quote(model, safe='')}/infer", body=body, headers=headers)
            response = connection.getresponse()
            data = response.read()
        except BaseException:
            # Half a request or answer may be on the wire: this connection is no longer usable.
            self._drop(connection)
            raise
        return parse_answer(response.status, data, response.getheader(HEADER_LENGTH), outputs)

    async def infer_async(
        self, model: str, inputs: Mapping[str, NDArray[np.generic]], outputs: Sequence[str]
    ) -> dict[str, NDArray[np.generic]]:
        """`infer` on the running event loop. Raises InferenceFailed for an error answer, ConnectionError
        when no connection opens or one fails mid-call (the query is never sent twice), and TimeoutError
        when no answer comes within `timeout_s`."""
        body, headers = request(inputs, outputs)
        pool = self._pool()
        try:
            async with asyncio.timeout(self.timeout_s):
                response = await pool.request("POST", f"/v2/models/{quote(model, safe='')}/infer", body, headers)
        except ConnectionFailed as exc:
            raise ConnectionError(str(exc)) from exc
        return parse_answer(response.status, response.body, response.headers.get(HEADER_LENGTH.lower()), outputs)

    def close(self) -> None:
        """Close every thread's connection (a thread that calls again opens a new one)."""
        with self._lock:
            connections, self._open = self._open, set()
            pools, self._pools = self._pools, {}
        for connection in connections:
            connection.close()
        for loop, pool in pools.items():
            # A pool's transports belong to its loop: close them there while it runs.
            if loop.is_running():
                loop.call_soon_threadsafe(pool.close)
            elif not loop.is_closed():
                pool.close()

    def _pool(self) -> ConnectionPool:
        loop = asyncio.get_running_loop()
        pool = self._pools.get(loop)
        if pool is None:
            with self._lock:
                for closed in [old for old in self._pools if old.is_closed()]:
                    del self._pools[closed]
                pool = self._pools.setdefault(loop, ConnectionPool(self.host, self.port))
        return pool

    def _connection(self) -> http.client.HTTPConnection:
        connection: http.client.HTTPConnection | None = getattr(self._local, "connection", None)
        if connection is not None and connection.sock is not None and not _closed_by_peer(connection.sock):
            return connection
        if connection is not None:
            self._drop(connection)
        connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
        try:
            connection.connect()
        except OSError as exc:
            connection.close()
            raise NotConnected(str(exc) or type(exc).__name__) from exc
        self._local.connection = connection
        with self._lock:
            self._open.add(connection)
        return connection

    def _drop(self, connection: http.client.HTTPConnection) -> None:
        connection.close()
        self._local.connection = None
        with self._lock:
            self._open.discard(connection)


def _closed_by_peer(sock: socket.socket) -> bool:
    """An idle kept-alive socket that is readable has been closed by the server (or holds bytes
    nobody asked for): either way it must not carry the next query."""
    if not hasattr(select, "poll"):  # Windows: select() has no descriptor limit there
        return bool(select.select([sock], [], [], 0)[0])
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def request(inputs: Mapping[str, NDArray[np.generic]], outputs: Sequence[str]) -> tuple[bytes, dict[str, str]]:
    """An infer request's body and headers (the binary extension's head length among them)."""
    body, head = request_body(inputs, outputs)
    headers = {"Content-Type": "application/octet-stream"}
    if head is not None:
        headers[HEADER_LENGTH] = str(head)
    return body, headers


def request_body(inputs: Mapping[str, NDArray[np.generic]], outputs: Sequence[str]) -> tuple[bytes, int | None]:
    tensors = []
    for name, array in inputs.items():
        tensor = httpclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(np.ascontiguousarray(array), binary_data=True)
        tensors.append(tensor)
    requested = [httpclient.InferRequestedOutput(name, binary_data=True) for name in outputs]
    body, head = httpclient.InferenceServerClient.generate_request_body(tensors, outputs=requested)
    return (body.encode() if isinstance(body, str) else body), head


def parse_answer(
    status: int, data: bytes, header_length: str | None, outputs: Sequence[str]
) -> dict[str, NDArray[np.generic]]:
    if status != 200:
        raise InferenceFailed(status, error_text(data, status))
    try:
        result = httpclient.InferenceServerClient.parse_response_body(
            data, header_length=int(header_length) if header_length is not None else None
        )
    except (InferenceServerException, ValueError) as exc:
        raise InferenceFailed(status, f"unreadable answer: {exc}") from exc
    return {name: result.as_numpy(name) for name in outputs}


def error_text(data: bytes, status: int) -> str:
    try:
        text: Any = json.loads(data).get("error")
    except (ValueError, AttributeError):
        text = None
    return " ".join(str(text).split()) if text else f"HTTP {status}"
