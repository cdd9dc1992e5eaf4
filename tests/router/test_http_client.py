"""Our asyncio KServe v2 HTTP client against the router's HTTP frontend (an in-process fake router behind it).

Every outcome the gRPC client tells apart, this one tells apart the same way, so `inferline replay`
counts errors alike over either protocol.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import numpy as np
import pytest

from inferline.errors import InferlineError, ModelNotFoundError, ServerUnreachable
from inferline.router.client import InvalidRequest, QueryError, QueryTimeout, ServerOverloaded
from inferline.router.http_client import AsyncKServeHttpClient, infer_body, infer_outputs
from inferline.router.http_frontend import HttpFrontend, parse_infer_request
from tests.router.fake_router import FAKE_NAME, FakeRouter
from tests.router.fake_router import fake_query as query

NAME = FAKE_NAME


@pytest.fixture(autouse=True)
def fresh(fake: FakeRouter) -> None:
    fake.reset()


def run(address: str, call: Any, timeout_s: float = 10.0) -> Any:
    async def go() -> Any:
        async with AsyncKServeHttpClient(address) as client:
            return await call(client)

    return asyncio.run(asyncio.wait_for(go(), timeout_s))


def test_infers_reads_metadata_and_readiness(http_frontend: HttpFrontend) -> None:
    q = query(3)
    out = run(http_frontend.url, lambda c: c.infer(NAME, q, timeout_s=5.0))
    assert set(out) == {"double.OUTPUT", "echo.TOKENS"}
    np.testing.assert_array_equal(out["double.OUTPUT"], q["INPUT"] * 2)
    np.testing.assert_array_equal(out["echo.TOKENS"], q["TOKENS"])
    assert out["echo.TOKENS"].dtype == np.int64
    only = run(http_frontend.url, lambda c: c.infer(NAME, q, outputs=["echo.TOKENS"]))
    assert set(only) == {"echo.TOKENS"}
    meta = run(http_frontend.url.removeprefix("http://"), lambda c: c.model_metadata(NAME))  # "host:port" works too
    assert meta.name == NAME
    assert [(t.name, t.dtype, t.shape) for t in meta.inputs] == [
        ("INPUT", "float32", (1, 4)),
        ("TOKENS", "int64", (1, -1)),
    ]
    assert run(http_frontend.url, lambda c: c.ready(NAME)) and not run(http_frontend.url, lambda c: c.ready("nope"))


def test_many_in_flight_on_one_session(http_frontend: HttpFrontend, fake: FakeRouter) -> None:
    fake.delay_s = 0.05  # 300 queries of 50 ms at once: fast only if no connection limit queues them

    async def many(c: AsyncKServeHttpClient) -> list[Any]:
        return await asyncio.gather(*(c.infer(NAME, query(i), timeout_s=5.0) for i in range(300)))

    results = run(http_frontend.url, many, timeout_s=10.0)
    for i, out in enumerate(results):
        np.testing.assert_array_equal(out["double.OUTPUT"], query(i)["INPUT"] * 2)


@pytest.mark.parametrize(
    ("flag", "error", "message"),
    [
        ("overloaded", ServerOverloaded, "in flight"),
        ("failing", QueryError, "no live replica"),
        ("hanging", QueryTimeout, "within 0.3 s"),
    ],
)
def test_outcomes_are_told_apart(
    http_frontend: HttpFrontend, fake: FakeRouter, flag: str, error: type[Exception], message: str
) -> None:
    setattr(fake, flag, True)
    # Only the hanging query needs the short timeout; the others answer at once, and a long one
    # keeps a loaded machine's slow connection from turning their answer into a timeout.
    timeout_s = 0.3 if flag == "hanging" else 10.0
    with pytest.raises(error, match=message) as info:
        run(http_frontend.url, lambda c: c.infer(NAME, query(), timeout_s=timeout_s))
    assert not isinstance(info.value, ServerUnreachable)


def test_bad_input_and_unknown_model(http_frontend: HttpFrontend, fake: FakeRouter) -> None:
    wrong = {"INPUT": np.zeros((1, 5), np.float32), "TOKENS": np.zeros((1, 2), np.int64)}
    with pytest.raises(InvalidRequest, match=r"'INPUT' has shape \[1, 5\]"):
        run(http_frontend.url, lambda c: c.infer(NAME, wrong))
    with pytest.raises(ModelNotFoundError, match="unknown model 'other'"):
        run(http_frontend.url, lambda c: c.infer("other", query()))
    assert fake.received == []


def test_a_router_not_serving_is_unreachable_not_overload(
    http_frontend: HttpFrontend, fake: FakeRouter, monkeypatch: pytest.MonkeyPatch
) -> None:
    def not_started(inputs: Any) -> Any:
        raise InferlineError("the router is not started", "start it first")

    monkeypatch.setattr(fake, "submit", not_started)
    with pytest.raises(ServerUnreachable, match=r"not serving.*not started"):
        run(http_frontend.url, lambda c: c.infer(NAME, query()))


def test_nothing_listening_is_unreachable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: nothing answers there
        with pytest.raises(ServerUnreachable, match=f"127.0.0.1:{port}"):
            run(f"127.0.0.1:{port}", lambda c: c.infer(NAME, query(), timeout_s=2.0))
        assert not run(f"127.0.0.1:{port}", lambda c: c.ready())


def test_request_body_is_what_the_frontend_parses() -> None:
    q = query(5)
    body, head = infer_body(q, ["double.OUTPUT"], timeout_s=0.25)
    parsed = parse_infer_request(body, str(head))
    for name, array in q.items():
        np.testing.assert_array_equal(parsed.inputs[name], array)
    assert parsed.timeout_s == pytest.approx(0.25)
    assert parsed.binary_outputs and [o.name for o in parsed.outputs] == ["double.OUTPUT"]


def test_response_in_json_data_or_binary_tail() -> None:
    plain = b'{"outputs": [{"name": "A", "datatype": "INT32", "shape": [1, 2], "data": [3, 4]}]}'
    np.testing.assert_array_equal(infer_outputs(plain, None)["A"], np.array([[3, 4]], np.int32))
    head = b'{"outputs": [{"name": "B", "datatype": "FP32", "shape": [1, 1], "parameters": {"binary_data_size": 4}}]}'
    tail = np.array([1.5], np.float32).tobytes()
    np.testing.assert_array_equal(infer_outputs(head + tail, str(len(head)))["B"], np.array([[1.5]], np.float32))
