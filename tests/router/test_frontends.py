"""The pipeline endpoint's KServe v2 frontends (gRPC, HTTP) and our client, against an in-process fake router.

Real existing clients (tritonclient.grpc / tritonclient.http) call the pipeline like a model;
overload, failure, bad input, unknown model and timeouts surface as distinct statuses and types.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException

from inferline.errors import InferlineError, ModelNotFoundError, ServerUnreachable
from inferline.protos import kserve_v2_pb2 as pb
from inferline.protos import kserve_v2_pb2_grpc as pb_grpc
from inferline.router import frontend_types as ft
from inferline.router.client import (
    AsyncKServeClient,
    InvalidRequest,
    KServeClient,
    QueryError,
    QueryTimeout,
    ServerOverloaded,
    infer_outputs,
)
from inferline.router.grpc_frontend import GrpcFrontend, serve_grpc
from inferline.router.http_frontend import HttpFrontend, parse_infer_request, serve_http
from tests.router.fake_router import FAKE_NAME, FakeRouter
from tests.router.fake_router import fake_query as query

NAME = FAKE_NAME


@pytest.fixture(autouse=True)
def fresh(fake: FakeRouter) -> None:
    fake.reset()


@pytest.fixture(scope="module")
def grpc_frontend(fake: FakeRouter) -> Iterator[GrpcFrontend]:
    frontend = serve_grpc(fake, "127.0.0.1", 0, max_wait_s=5.0)
    yield frontend
    frontend.stop()


@pytest.fixture(scope="module")
def client(grpc_frontend: GrpcFrontend) -> Iterator[KServeClient]:
    with KServeClient(grpc_frontend.address) as c:
        yield c


def http(method: str, url: str, body: Any = None) -> tuple[int, bytes, dict[str, str]]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def json_infer(inputs: dict[str, np.ndarray], **extra: Any) -> dict[str, Any]:
    tensors = [
        {"name": k, "shape": list(v.shape), "datatype": ft.datatype_of(v.dtype), "data": v.reshape(-1).tolist()}
        for k, v in inputs.items()
    ]
    return {"inputs": tensors, **extra}


# -- existing clients call the pipeline like a model ---------------------------------------------
def test_tritonclient_grpc_infers_and_reads_metadata(grpc_frontend: GrpcFrontend, fake: FakeRouter) -> None:
    q = query(1, tokens=5)
    c = tgrpc.InferenceServerClient(grpc_frontend.address)
    try:
        assert c.is_server_live() and c.is_server_ready() and c.is_model_ready(NAME)
        assert not c.is_model_ready("other-pipeline")
        meta = c.get_model_metadata(NAME, as_json=True)
        assert [(i["name"], i["datatype"], i["shape"]) for i in meta["inputs"]] == [
            ("INPUT", "FP32", ["1", "4"]),  # int64 fields print as strings in protobuf JSON
            ("TOKENS", "INT64", ["1", "-1"]),
        ]
        assert {o["name"] for o in meta["outputs"]} == {"double.OUTPUT", "echo.TOKENS"}
        inputs = []
        for name, array in q.items():
            tensor = tgrpc.InferInput(name, list(array.shape), ft.datatype_of(array.dtype))
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        result = c.infer(NAME, inputs, client_timeout=5.0)
        np.testing.assert_array_equal(result.as_numpy("double.OUTPUT"), q["INPUT"] * 2)
        np.testing.assert_array_equal(result.as_numpy("echo.TOKENS"), q["TOKENS"])
        assert result.get_response().parameters["inferline_visited"].string_param == "double,echo"
        only = c.infer(NAME, inputs, outputs=[tgrpc.InferRequestedOutput("echo.TOKENS")])
        assert only.as_numpy("double.OUTPUT") is None and only.as_numpy("echo.TOKENS") is not None
    finally:
        c.close()
    np.testing.assert_array_equal(fake.received[0]["TOKENS"], q["TOKENS"])  # what reached the router


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_http_infers_binary_and_json(http_frontend: HttpFrontend, binary: bool) -> None:
    q = query(2)
    c = thttp.InferenceServerClient(http_frontend.address)
    try:
        assert c.is_server_live() and c.is_server_ready() and c.is_model_ready(NAME)
        meta = c.get_model_metadata(NAME)
        assert [(i["name"], i["datatype"], i["shape"]) for i in meta["inputs"]] == [
            ("INPUT", "FP32", [1, 4]),
            ("TOKENS", "INT64", [1, -1]),
        ]
        inputs = []
        for name, array in q.items():
            tensor = thttp.InferInput(name, list(array.shape), ft.datatype_of(array.dtype))
            tensor.set_data_from_numpy(array, binary_data=binary)
            inputs.append(tensor)
        outputs = [thttp.InferRequestedOutput(n, binary_data=binary) for n in ("double.OUTPUT", "echo.TOKENS")]
        result = c.infer(NAME, inputs, outputs=outputs)
        np.testing.assert_array_equal(result.as_numpy("double.OUTPUT"), q["INPUT"] * 2)
        np.testing.assert_array_equal(result.as_numpy("echo.TOKENS"), q["TOKENS"])
        default = c.infer(NAME, inputs)  # no outputs named: tritonclient asks for all, in binary
        np.testing.assert_array_equal(default.as_numpy("double.OUTPUT"), q["INPUT"] * 2)
    finally:
        c.close()


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_tritonclient_http_may_compress_its_requests(http_frontend: HttpFrontend, algorithm: str) -> None:
    q = query(2)
    c = thttp.InferenceServerClient(http_frontend.address)
    try:
        inputs = []
        for name, array in q.items():
            tensor = thttp.InferInput(name, list(array.shape), ft.datatype_of(array.dtype))
            tensor.set_data_from_numpy(array, binary_data=True)
            inputs.append(tensor)
        result = c.infer(NAME, inputs, request_compression_algorithm=algorithm)
        np.testing.assert_array_equal(result.as_numpy("double.OUTPUT"), q["INPUT"] * 2)
    finally:
        c.close()


def test_a_compressed_body_is_inflated_no_further_than_the_limit() -> None:
    from inferline.router.http_frontend import decoded_body

    plain = b'{"inputs": []}'
    assert decoded_body(zlib.compress(plain), "deflate") == plain
    assert decoded_body(plain, None) == plain and decoded_body(plain, "identity") == plain
    gz = zlib.compressobj(wbits=zlib.MAX_WBITS | 16)
    bomb = gz.compress(b"\0" * 5000) + gz.flush()  # a few dozen bytes that expand 5000
    with pytest.raises(ft.RequestError, match="expands beyond the limit of 1000 bytes"):
        decoded_body(bomb, "gzip", limit=1000)
    with pytest.raises(ft.RequestError, match="ends inside its gzip stream"):
        decoded_body(bomb[:10], "gzip")
    with pytest.raises(ft.RequestError, match="not valid deflate"):
        decoded_body(b"plain text", "deflate")
    with pytest.raises(ft.RequestError, match="Content-Encoding 'br' is not supported"):
        decoded_body(plain, "br")


def test_plain_json_request_over_http(http_frontend: HttpFrontend) -> None:
    q = query(3)
    status, body, _ = http("POST", f"{http_frontend.url}/v2/models/{NAME}/infer", json_infer(q, id="q-7"))
    assert status == 200, body
    doc = json.loads(body)
    assert doc["model_name"] == NAME and doc["id"] == "q-7"
    out = {o["name"]: o for o in doc["outputs"]}
    assert out["double.OUTPUT"]["datatype"] == "FP32" and out["double.OUTPUT"]["shape"] == [1, 4]
    np.testing.assert_array_equal(np.array(out["double.OUTPUT"]["data"], np.float32), q["INPUT"].reshape(-1) * 2)


# -- our client ----------------------------------------------------------------------------------
def test_our_client_sync(client: KServeClient) -> None:
    q = query(4)
    assert client.ready() and client.ready(NAME) and not client.ready("nope")
    out = client.infer(NAME, q, timeout_s=5.0)
    assert set(out) == {"double.OUTPUT", "echo.TOKENS"}
    np.testing.assert_array_equal(out["double.OUTPUT"], q["INPUT"] * 2)
    assert out["echo.TOKENS"].dtype == np.int64
    meta = client.model_metadata(NAME)
    assert [(t.name, t.dtype, t.shape) for t in meta.inputs] == [
        ("INPUT", "float32", (1, 4)),
        ("TOKENS", "int64", (1, -1)),
    ]
    assert client.infer(NAME, q, outputs=["echo.TOKENS"]).keys() == {"echo.TOKENS"}


def test_our_client_async_many_in_flight(grpc_frontend: GrpcFrontend, fake: FakeRouter) -> None:
    fake.delay_s = 0.05  # 300 queries of 50 ms at once: finishes fast only if none waits for a thread

    async def run() -> list[dict[str, np.ndarray]]:
        async with AsyncKServeClient(grpc_frontend.address) as c:
            assert await c.ready(NAME)
            assert (await c.model_metadata(NAME)).name == NAME
            return await asyncio.gather(*(c.infer(NAME, query(i), timeout_s=5.0) for i in range(300)))

    try:
        results = asyncio.run(asyncio.wait_for(run(), 10.0))
    finally:
        fake.delay_s = 0.002
    for i, out in enumerate(results):
        np.testing.assert_array_equal(out["double.OUTPUT"], query(i)["INPUT"] * 2)


# -- overload, failure, timeouts: distinct statuses and types ------------------------------------
def test_overload_is_resource_exhausted_and_503(
    client: KServeClient, grpc_frontend: GrpcFrontend, http_frontend: HttpFrontend, fake: FakeRouter
) -> None:
    fake.overloaded = True
    with pytest.raises(ServerOverloaded, match="in flight"):
        client.infer(NAME, query())
    with pytest.raises(ServerOverloaded):
        asyncio.run(_async_infer(grpc_frontend.address, query()))
    c = tgrpc.InferenceServerClient(grpc_frontend.address)
    try:
        tensor = tgrpc.InferInput("INPUT", [1, 4], "FP32")
        tensor.set_data_from_numpy(query()["INPUT"])
        tokens = tgrpc.InferInput("TOKENS", [1, 3], "INT64")
        tokens.set_data_from_numpy(query()["TOKENS"])
        with pytest.raises(InferenceServerException) as info:
            c.infer(NAME, [tensor, tokens])
        assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    finally:
        c.close()
    status, body, headers = http("POST", f"{http_frontend.url}/v2/models/{NAME}/infer", json_infer(query()))
    assert status == 503 and "in flight" in json.loads(body)["error"] and headers.get("Retry-After") == "1"


async def _async_infer(address: str, inputs: dict[str, np.ndarray], timeout_s: float = 5.0) -> Any:
    async with AsyncKServeClient(address) as c:
        return await c.infer(NAME, inputs, timeout_s=timeout_s)


def test_failed_query_is_a_query_error_not_unreachable(
    client: KServeClient, grpc_frontend: GrpcFrontend, http_frontend: HttpFrontend, fake: FakeRouter
) -> None:
    fake.failing = True
    with pytest.raises(QueryError, match="no live replica") as info:
        client.infer(NAME, query())
    assert not isinstance(info.value, InvalidRequest | ServerUnreachable)
    with pytest.raises(QueryError, match="no live replica"):
        asyncio.run(_async_infer(grpc_frontend.address, query()))
    status, body, _ = http("POST", f"{http_frontend.url}/v2/models/{NAME}/infer", json_infer(query()))
    assert status == 502 and "no live replica" in json.loads(body)["error"]


def test_no_answer_in_time_is_a_timeout(client: KServeClient, http_frontend: HttpFrontend, fake: FakeRouter) -> None:
    fake.hanging = True
    with pytest.raises(QueryTimeout) as info:
        client.infer(NAME, query(), timeout_s=0.2)
    assert isinstance(info.value, TimeoutError)
    body = json_infer(query(), parameters={"timeout": 200_000})  # Triton's request timeout, microseconds
    status, raw, _ = http("POST", f"{http_frontend.url}/v2/models/{NAME}/infer", body)
    assert status == 504 and "no answer within 0.2 s" in json.loads(raw)["error"]


def test_unreachable_server(http_frontend: HttpFrontend) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: nothing answers there
        with KServeClient(f"127.0.0.1:{port}") as c:
            assert not c.ready()
            with pytest.raises(ServerUnreachable, match=f"127.0.0.1:{port}"):
                c.infer(NAME, query(), timeout_s=2.0)


# -- bad requests ----------------------------------------------------------------------------------
BAD_INPUTS = [
    ({"INPUTT": np.zeros((1, 4), np.float32), "TOKENS": np.zeros((1, 2), np.int64)}, "unknown input 'INPUTT'"),
    ({"INPUT": np.zeros((1, 4), np.float64), "TOKENS": np.zeros((1, 2), np.int64)}, "'INPUT' has datatype FP64"),
    ({"INPUT": np.zeros((1, 5), np.float32), "TOKENS": np.zeros((1, 2), np.int64)}, "'INPUT' has shape [1, 5]"),
    ({"INPUT": np.zeros((2, 4), np.float32), "TOKENS": np.zeros((2, 2), np.int64)}, "'INPUT' has shape [2, 4]"),
    ({"INPUT": np.zeros((1, 4), np.float32)}, "missing input(s) ['TOKENS']"),
]


@pytest.mark.parametrize(("inputs", "message"), BAD_INPUTS)
def test_bad_input_is_invalid_argument_and_400(
    client: KServeClient, http_frontend: HttpFrontend, fake: FakeRouter, inputs: dict[str, np.ndarray], message: str
) -> None:
    with pytest.raises(InvalidRequest) as info:
        client.infer(NAME, inputs)
    assert message in str(info.value) and "\n" not in str(info.value)
    status, body, _ = http("POST", f"{http_frontend.url}/v2/models/{NAME}/infer", json_infer(inputs))
    assert status == 400 and message in json.loads(body)["error"]
    assert fake.received == []  # refused before reaching the router


def test_raw_contents_must_match_the_shape(grpc_frontend: GrpcFrontend) -> None:
    request = pb.ModelInferRequest(model_name=NAME, raw_input_contents=[b"\0" * 12, b"\0" * 16])
    request.inputs.add(name="INPUT", datatype="FP32", shape=[1, 4])
    request.inputs.add(name="TOKENS", datatype="INT64", shape=[1, 2])
    with grpc.insecure_channel(grpc_frontend.address) as channel, pytest.raises(grpc.RpcError) as info:
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=5)
    err: Any = info.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'INPUT' has 12 bytes of data; shape [1, 4] of FP32 needs 16" in err.details()


def test_typed_contents_instead_of_raw(grpc_frontend: GrpcFrontend) -> None:
    request = pb.ModelInferRequest(model_name=NAME)
    x = request.inputs.add(name="INPUT", datatype="FP32", shape=[1, 4])
    x.contents.fp32_contents.extend([1.0, 2.0, 3.0, 4.5])
    t = request.inputs.add(name="TOKENS", datatype="INT64", shape=[1, 2])
    t.contents.int64_contents.extend([7, -8])
    with grpc.insecure_channel(grpc_frontend.address) as channel:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=5)
    outputs = {o.name: (i, o) for i, o in enumerate(response.outputs)}
    i, out = outputs["double.OUTPUT"]
    assert out.datatype == "FP32" and list(out.shape) == [1, 4]
    np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[i], np.float32), [2, 4, 6, 9])


def test_malformed_http_bodies_are_400(http_frontend: HttpFrontend) -> None:
    url = f"{http_frontend.url}/v2/models/{NAME}/infer"
    for body, message in [
        ({"inputs": []}, "non-empty 'inputs'"),
        ({"inputs": [{"name": "INPUT", "shape": [1, 4], "datatype": "FP32"}]}, "neither 'data'"),
        ({"inputs": [{"name": "INPUT", "shape": [1, 4], "datatype": "FP32", "data": [1, 2]}]}, "has 2 elements"),
        ({"inputs": [{"name": "INPUT", "shape": [1, 4], "datatype": "FP99", "data": [1]}]}, "unsupported datatype"),
    ]:
        status, raw, _ = http("POST", url, body)
        assert status == 400 and message in json.loads(raw)["error"], raw
    request = urllib.request.Request(url, data=b"{not json", method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=5)
    assert info.value.code == 400 and "not JSON" in json.loads(info.value.read())["error"]


def test_hostile_bodies_are_400_and_leave_the_endpoint_serving(http_frontend: HttpFrontend) -> None:
    url = f"{http_frontend.url}/v2/models/{NAME}/infer"
    nested = b"[" * 100_000 + b"]" * 100_000
    request = urllib.request.Request(url, data=nested, method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=5)
    assert info.value.code == 400 and "too deeply" in json.loads(info.value.read())["error"]
    head = json.dumps(
        {
            "inputs": [
                {"name": "INPUT", "shape": [1, 200_000_000], "datatype": "BYTES", "parameters": {"binary_data_size": 0}}
            ]
        }
    ).encode()
    request = urllib.request.Request(
        url, data=head, method="POST", headers={"Inference-Header-Content-Length": str(len(head))}
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=5)
    assert info.value.code == 400 and "4 each" in json.loads(info.value.read())["error"]
    bad_bytes = {"inputs": [{"name": "INPUT", "shape": [1, 1], "datatype": "BYTES", "data": [2**62]}]}
    status, raw, _ = http("POST", url, bad_bytes)
    assert status == 400 and "must be strings" in json.loads(raw)["error"]
    status, raw, _ = http(
        "POST", url, json_infer({"INPUT": np.ones((1, 4), np.float32), "TOKENS": np.ones((1, 2), np.int64)})
    )
    assert status == 200, raw


def test_a_huge_bytes_shape_over_grpc_is_invalid_argument(grpc_frontend: GrpcFrontend) -> None:
    request = pb.ModelInferRequest(model_name=NAME, raw_input_contents=[b""])
    request.inputs.add(name="INPUT", datatype="BYTES", shape=[1, 2**62])
    with grpc.insecure_channel(grpc_frontend.address) as channel, pytest.raises(grpc.RpcError) as info:
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=5)
    err: Any = info.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "4 each" in err.details()


def test_a_bug_is_an_internal_error_that_is_logged(
    grpc_frontend: GrpcFrontend, http_frontend: HttpFrontend, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    from inferline.router import grpc_frontend as grpc_module
    from inferline.router import http_frontend as http_module

    def boom(*_: Any) -> Any:
        raise ValueError("boom")

    monkeypatch.setattr(grpc_module, "decode_inputs", boom)
    monkeypatch.setattr(http_module, "parse_infer_request", boom)
    request = pb.ModelInferRequest(model_name=NAME)
    with grpc.insecure_channel(grpc_frontend.address) as channel, pytest.raises(grpc.RpcError) as info:
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=5)
    err: Any = info.value
    assert err.code() == grpc.StatusCode.INTERNAL and "ValueError: boom" in err.details()
    status, raw, _ = http("POST", f"{http_frontend.url}/v2/models/{NAME}/infer", {"inputs": []})
    assert status == 500 and "ValueError: boom" in json.loads(raw)["error"]
    logged = [r.getMessage() for r in caplog.records if r.exc_info]
    assert any("gRPC ModelInfer failed" in m for m in logged) and any("HTTP request POST" in m for m in logged)


def test_unknown_model_is_not_found_and_404(client: KServeClient, http_frontend: HttpFrontend) -> None:
    with pytest.raises(ModelNotFoundError, match=r"unknown model 'fake-pipelin'.*did you mean 'fake-pipeline'"):
        client.infer("fake-pipelin", query())
    with pytest.raises(ModelNotFoundError):
        client.model_metadata("other")
    for method, path in [
        ("POST", "/v2/models/other/infer"),
        ("GET", "/v2/models/other"),
        ("GET", "/v2/models/other/ready"),
    ]:
        status, body, _ = http(method, f"{http_frontend.url}{path}", json_infer(query()) if method == "POST" else None)
        assert status == 404 and "unknown model 'other'" in json.loads(body)["error"]
    status, body, _ = http("GET", f"{http_frontend.url}/v2/no/such/path")
    assert status == 404 and "error" in json.loads(body)


def test_a_wrong_method_is_405_with_a_json_error(http_frontend: HttpFrontend, fake: FakeRouter) -> None:
    for method, path in [("GET", f"/v2/models/{NAME}/infer"), ("POST", "/v2/health/ready"), ("DELETE", "/metrics")]:
        status, body, _ = http(method, f"{http_frontend.url}{path}", {} if method == "POST" else None)
        assert status == 405 and f"Method Not Allowed: {method} {path}" in json.loads(body)["error"]
    assert fake.received == []


def test_readiness_follows_the_router(client: KServeClient, http_frontend: HttpFrontend, fake: FakeRouter) -> None:
    fake.is_ready = False
    assert not client.ready() and not client.ready(NAME)
    assert http("GET", f"{http_frontend.url}/v2/health/ready")[0] == 400
    assert http("GET", f"{http_frontend.url}/v2/models/{NAME}/ready")[0] == 400
    assert http("GET", f"{http_frontend.url}/v2/health/live")[0] == 200
    fake.is_ready = True
    assert client.ready(NAME) and http("GET", f"{http_frontend.url}/v2/models/{NAME}/versions/1/ready")[0] == 200


def test_metrics_expose_the_routers_registry(client: KServeClient, http_frontend: HttpFrontend) -> None:
    client.infer(NAME, query())
    status, body, headers = http("GET", f"{http_frontend.url}/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    counts = [line for line in body.decode().splitlines() if line.startswith("fake_pipeline_queries_total ")]
    assert len(counts) == 1 and float(counts[0].split()[1]) >= 1


# -- codecs and lifecycle ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64"])
def test_raw_codec_round_trips(dtype: str) -> None:
    array = (np.arange(6).reshape(1, 2, 3) % 3).astype(dtype)
    datatype = ft.datatype_of(array.dtype)
    back = ft.from_raw(datatype, array.shape, ft.to_raw(array), "x")
    assert back.dtype == array.dtype
    np.testing.assert_array_equal(back, array)


def test_bytes_codec_round_trips() -> None:
    array = np.array([[b"ab", b"", "ünï".encode()]], dtype=object)
    raw = ft.to_raw(array)
    assert raw[:6] == b"\x02\x00\x00\x00ab"
    back = ft.from_raw("BYTES", (1, 3), raw, "x")
    assert back.tolist() == array.tolist()
    with pytest.raises(ft.RequestError, match="more than the 2 elements"):
        ft.from_raw("BYTES", (1, 2), raw, "x")


def test_bytes_are_checked_against_the_data_before_any_array_is_made() -> None:
    # A shape alone must not make the router allocate: 10**30 elements, or 2e8, from no data at all.
    for shape in ((1, 10**30), (1, 200_000_000), (1, 2**62)):
        with pytest.raises(ft.RequestError, match="4 each"):
            ft.from_raw("BYTES", shape, b"", "x")
    for value in (5, None, 1.5, -1, 2**62, 2**63):
        with pytest.raises(ft.RequestError, match="'x' is BYTES: its data must be strings"):
            ft.from_values("BYTES", (1, 1), [value], "x")
    assert ft.from_values("BYTES", (1, 2), ["ab", b"\xff"], "x").tolist() == [[b"ab", b"\xff"]]


def test_client_decodes_typed_output_contents() -> None:
    response = pb.ModelInferResponse(model_name=NAME)
    out = response.outputs.add(name="a.OUT", datatype="INT32", shape=[1, 3])
    out.contents.int_contents.extend([1, -2, 3])
    text = response.outputs.add(name="b.TEXT", datatype="BYTES", shape=[1, 1])
    text.contents.bytes_contents.append(b"hi")
    decoded = infer_outputs(response)
    assert decoded["a.OUT"].dtype == np.int32 and decoded["a.OUT"].tolist() == [[1, -2, 3]]
    assert decoded["b.TEXT"].tolist() == [[b"hi"]]


def test_http_binary_extension_parsing() -> None:
    head = json.dumps(
        {
            "inputs": [
                {"name": "INPUT", "shape": [1, 2], "datatype": "FP32", "parameters": {"binary_data_size": 8}},
                {"name": "TOKENS", "shape": [1, 1], "datatype": "INT64", "data": [5]},
            ],
            "outputs": [{"name": "echo.TOKENS", "parameters": {"binary_data": True}}],
        }
    ).encode()
    parsed = parse_infer_request(head + np.array([1.5, 2.5], np.float32).tobytes(), str(len(head)))
    np.testing.assert_array_equal(parsed.inputs["INPUT"], [[1.5, 2.5]])
    assert parsed.inputs["TOKENS"].tolist() == [[5]] and parsed.outputs[0].binary is True
    with pytest.raises(ft.RequestError, match="binary bytes that no input claims"):
        parse_infer_request(head + b"\0" * 12, str(len(head)))
    for length in (" 1_0 ", "+5", "-1", "ten"):
        with pytest.raises(ft.RequestError, match="is not a count of bytes"):
            parse_infer_request(head + b"\0" * 8, length)
    as_text = head.replace(b'"binary_data_size": 8', b'"binary_data_size": "8"')
    with pytest.raises(ft.RequestError, match="binary_data_size '8'; it must be a count of bytes"):
        parse_infer_request(as_text + b"\0" * 8, str(len(as_text)))


def test_stopped_frontends_release_their_ports(fake: FakeRouter) -> None:
    g, h = serve_grpc(fake), serve_http(fake)
    assert g.address.startswith("127.0.0.1:") and h.address.startswith("127.0.0.1:")
    with KServeClient(g.address) as c:
        assert c.ready()
    g.stop()
    h.stop()
    g.stop()  # idempotent
    for port in (g.port, h.port):
        with socket.socket() as s, pytest.raises(OSError):
            s.settimeout(1)
            s.connect(("127.0.0.1", port))


def test_errors_are_inferline_errors() -> None:
    for cls in (ServerOverloaded, QueryError, InvalidRequest, QueryTimeout):
        assert issubclass(cls, InferlineError)
    assert QueryTimeout("no answer").one_line() == "no answer."


def test_an_answer_that_cannot_be_encoded_is_an_internal_error_not_a_hang() -> None:
    from inferline.router.core import QueryResult

    async def go() -> list[str]:
        futures: list[Future[QueryResult]] = [Future(), Future()]

        def encode(result: QueryResult) -> str:
            if result.visited == ("bad",):
                raise TypeError("bytes(None)")
            return "ok"

        replies = [ft.answer_later(f, 5.0, encode, lambda e: f"{e.kind.value}: {e.message}") for f in futures]
        done = QueryResult({}, ("bad",), 1.0), QueryResult({}, ("good",), 1.0)
        threading.Thread(target=lambda: [f.set_result(r) for f, r in zip(futures, done, strict=True)]).start()
        return list(await asyncio.wait_for(asyncio.gather(*replies), 5))

    assert asyncio.run(go()) == ["internal: TypeError: bytes(None)", "ok"]


def test_an_answer_on_the_loops_own_thread_is_delivered_within_it_others_on_the_loop_once() -> None:
    from inferline.router.core import QueryResult

    def result(name: str) -> QueryResult:
        return QueryResult({}, (name,), 1.0)

    async def go() -> list[Any]:
        got: list[Any] = []
        here: Future[QueryResult] = Future()
        ft.answer_with(here, 5.0, lambda r: r.visited, lambda e: e.kind, got.append)
        here.set_result(result("here"))
        assert got == [("here",)]  # written in the answer itself: a replica on this loop answered

        there: Future[QueryResult] = Future()
        ft.answer_with(there, 5.0, lambda r: r.visited, lambda e: e.kind, got.append)
        answering = threading.Thread(target=there.set_result, args=(result("there"),))
        answering.start()
        answering.join()
        assert got == [("here",)]  # another thread answered: delivered on the loop, not on that thread
        late: Future[QueryResult] = Future()
        ft.answer_with(late, 0.01, lambda r: r.visited, lambda e: e.kind, got.append)
        await asyncio.sleep(0.1)
        late.set_result(result("late"))  # after its deadline: not delivered a second time
        await asyncio.sleep(0.05)
        return got

    assert asyncio.run(go()) == [("here",), ("there",), ft.ErrorKind.TIMEOUT]
