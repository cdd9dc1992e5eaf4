"""The pipeline endpoint over HTTP/REST: the Open Inference Protocol (KServe v2), plus /metrics.

A whole pipeline is served as ONE model named after the pipeline:

    GET  /v2/health/live            200 (the process answers)
    GET  /v2/health/ready           200 ready, 400 not ready (the protocol's "4xx = not ready")
    GET  /v2                        server metadata
    GET  /v2/models/{name}          model metadata: the pipeline's inputs and outputs
    GET  /v2/models/{name}/ready    200 ready, 400 not ready, 404 unknown model
    POST /v2/models/{name}/infer    {"inputs": [{"name", "shape", "datatype", "data"}]} -> {"model_name", "outputs"}
    GET  /metrics                   Prometheus text of the router's registry
(`/v2/models/{name}/versions/{version}/...` work too.) Inference also accepts Triton's binary
tensor extension (the `Inference-Header-Content-Length` header, `binary_data_size`,
`binary_data` / `binary_data_output`), which tritonclient.http uses by default.

Errors answer `{"error": "<one line>"}`: bad input 400, unknown model or path 404, wrong method
405, body too large 413, router overloaded 503 (with Retry-After), query failed 502 (a bad
gateway: the router is up but the model servers behind it failed the query, which a client may
tell from overload), no answer in time 504, router not started 503.

The server (`http_server`) runs on an event loop thread: the router's own where it is given (its
replicas then answer on the thread the request came in on), else one of its own. A query's reply is
written when the router answers (on that thread, in the answer itself), so waiting never blocks the
loop and the number of queries in flight is bounded by the router's queues.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import socket
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from inferline.errors import InferlineError
from inferline.router.event_loop import LoopThread
from inferline.router.frontend_types import (
    DEFAULT_TIMEOUT_S,
    MODEL_VERSION,
    PLATFORM,
    SERVER_NAME,
    Array,
    ErrorKind,
    Pipeline,
    RequestError,
    answer_with,
    check_inputs,
    check_model,
    check_outputs,
    chosen_outputs,
    datatype_of,
    from_raw,
    from_values,
    invalid,
    request_shape,
    server_version,
    submit,
    to_raw,
    to_values,
    wait_budget,
)
from inferline.router.http_server import HttpServer, Later, Reply, Request

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from inferline.router.core import QueryResult

HTTP_STATUS = {
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.INVALID: 400,
    ErrorKind.OVERLOADED: 503,
    ErrorKind.FAILED: 502,
    ErrorKind.TIMEOUT: 504,
    ErrorKind.UNAVAILABLE: 503,
    ErrorKind.INTERNAL: 500,
}
HEADER_LENGTH = "Inference-Header-Content-Length"
"""Triton's binary extension: the JSON part's length; binary tensor data follows it in the body."""
MAX_REQUEST_BYTES = 256 * 2**20
"""Far above an image batch; still bounds a runaway request (413)."""


# -- request parsing and response encoding (pure) ------------------------------------------------
@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool | None
    """Per-output `binary_data` parameter; None: the request's `binary_data_output` decides."""


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    inputs: dict[str, Array]
    outputs: tuple[RequestedOutput, ...]
    binary_outputs: bool
    timeout_s: float | None
    """Triton's `timeout` request parameter (sent in microseconds), when given."""


def split_body(body: bytes, header_length: str | None) -> tuple[Any, bytes]:
    """The JSON document and the binary tail (empty without the binary extension)."""
    size = len(body)
    if header_length is not None:
        if not header_length.strip().isdecimal():  # int() would also take "1_0" and "+5"
            raise invalid(f"{HEADER_LENGTH} {header_length!r} is not a count of bytes")
        size = int(header_length)
        if size > len(body):
            raise invalid(f"{HEADER_LENGTH} {size} is outside the body's {len(body)} bytes")
    try:
        doc = json.loads(body[:size])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise invalid(f"request body is not JSON: {exc}") from None
    except RecursionError:
        raise invalid("request body nests its JSON too deeply") from None
    if not isinstance(doc, dict):
        raise invalid("request body must be a JSON object with an 'inputs' list")
    return doc, body[size:]


def decoded_body(body: bytes, encoding: str | None, limit: int | None = None) -> bytes:
    """The request body as sent before compression: Triton's clients may gzip or deflate it
    (`request_compression_algorithm`), and Inference-Header-Content-Length counts the plain bytes.
    Decompressed no further than the request size limit, so a small body cannot expand without bound."""
    if encoding is None:
        return body
    kind = encoding.strip().lower()
    if kind == "identity":
        return body
    if kind not in ("gzip", "deflate"):
        raise invalid(f"Content-Encoding {encoding!r} is not supported", "send gzip, deflate or identity")
    cap = MAX_REQUEST_BYTES if limit is None else limit
    inflater = zlib.decompressobj(zlib.MAX_WBITS | 16 if kind == "gzip" else zlib.MAX_WBITS)
    try:
        plain = inflater.decompress(body, cap + 1)
    except zlib.error as exc:
        raise invalid(f"request body is not valid {kind}: {exc}") from None
    if len(plain) > cap:
        raise invalid(f"request body expands beyond the limit of {cap} bytes")
    if not inflater.eof:
        raise invalid(f"request body ends inside its {kind} stream")
    return plain


def parse_infer_request(body: bytes, header_length: str | None = None) -> InferRequest:
    doc, binary = split_body(body, header_length)
    params = _object(doc.get("parameters", {}), "parameters")
    timeout_us = params.get("timeout")
    outputs = doc.get("outputs", [])
    if not isinstance(outputs, list):
        raise invalid("'outputs' must be a list")
    return InferRequest(
        id=str(doc["id"]) if "id" in doc else None,
        inputs=decode_inputs(doc.get("inputs"), binary),
        outputs=tuple(requested_output(o) for o in outputs),
        binary_outputs=bool(params.get("binary_data_output", False)),
        timeout_s=timeout_us / 1e6 if isinstance(timeout_us, int | float) and timeout_us > 0 else None,
    )


def decode_inputs(inputs: Any, binary: bytes) -> dict[str, Array]:
    """Each input from its JSON `data`, or from its `binary_data_size` bytes of the tail, in order."""
    if not isinstance(inputs, list) or not inputs:
        raise invalid("request needs a non-empty 'inputs' list")
    out: dict[str, Array] = {}
    offset = 0
    for i, tensor in enumerate(inputs):
        name, shape, datatype, params = _input_fields(tensor, i)
        if name in out:
            raise invalid(f"input {name!r} appears twice")
        size = params.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise invalid(f"input {name!r} has binary_data_size {size!r}; it must be a count of bytes")
            if offset + size > len(binary):
                raise invalid(f"input {name!r} claims binary_data_size {size!r} beyond the {len(binary)} binary bytes")
            out[name] = from_raw(datatype, shape, binary[offset : offset + size], name)
            offset += size
        elif "data" in tensor:
            data = tensor["data"]
            out[name] = from_values(datatype, shape, data if isinstance(data, list) else [data], name)
        else:
            raise invalid(f"input {name!r} has neither 'data' nor a binary_data_size parameter")
    if offset != len(binary):
        raise invalid(f"request has {len(binary) - offset} binary bytes that no input claims")
    return out


def _input_fields(tensor: Any, index: int) -> tuple[str, tuple[int, ...], str, dict[str, Any]]:
    if not isinstance(tensor, dict):
        raise invalid(f"inputs[{index}] must be an object with name, shape, datatype and data")
    name = tensor.get("name")
    if not isinstance(name, str):
        raise invalid(f"inputs[{index}] has no 'name'")
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise invalid(f"input {name!r} needs 'shape' as a list of integers")
    datatype = tensor.get("datatype")
    if not isinstance(datatype, str):
        raise invalid(f"input {name!r} needs a 'datatype' such as \"FP32\"")
    return name, tuple(shape), datatype, _object(tensor.get("parameters", {}), f"parameters of input {name!r}")


def requested_output(entry: Any) -> RequestedOutput:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise invalid("each of 'outputs' must be an object with a 'name'")
    binary = _object(entry.get("parameters", {}), f"parameters of output {entry['name']!r}").get("binary_data")
    return RequestedOutput(entry["name"], None if binary is None else bool(binary))


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise invalid(f"{what} must be a JSON object")
    return value


def encode_response(
    model: str, request: InferRequest, outputs: dict[str, Array], visited: tuple[str, ...]
) -> tuple[bytes, int | None]:
    """The response body, and the JSON part's length when binary tensor data follows it."""
    binary_flags = {o.name: o.binary for o in request.outputs}
    entries, tail = [], []
    for name, array in outputs.items():
        entry: dict[str, Any] = {"name": name, "datatype": datatype_of(array.dtype), "shape": list(array.shape)}
        flag = binary_flags.get(name)
        if request.binary_outputs if flag is None else flag:
            raw = to_raw(array)
            entry["parameters"] = {"binary_data_size": len(raw)}
            tail.append(raw)
        else:
            entry["data"] = to_values(array)
        entries.append(entry)
    doc: dict[str, Any] = {"model_name": model, "model_version": MODEL_VERSION, "outputs": entries}
    doc["parameters"] = {"inferline_visited": ",".join(visited)}
    if request.id is not None:
        doc["id"] = request.id
    head = json.dumps(doc).encode()
    return (head + b"".join(tail), len(head)) if tail else (head, None)


def tensor_metadata(specs: Any) -> list[dict[str, Any]]:
    return [{"name": s.name, "datatype": datatype_of(s.dtype), "shape": request_shape(s)} for s in specs]


def error_reply(exc: RequestError) -> Reply:
    headers = (("Retry-After", "1"),) if exc.kind is ErrorKind.OVERLOADED else ()
    return Reply(HTTP_STATUS[exc.kind], _json({"error": exc.one_line()}), headers=headers)


def _json(doc: Any) -> bytes:
    return json.dumps(doc).encode()


# -- the handlers --------------------------------------------------------------------------------
class Routes:
    """`dispatch` answers every request: the protocol's paths, /metrics, and one-line JSON errors."""

    def __init__(self, pipeline: Pipeline, max_wait_s: float) -> None:
        self.pipeline = pipeline
        self.max_wait_s = max_wait_s
        self._fixed: dict[str, Callable[[], Reply | Awaitable[Reply]]] = {
            "/v2/health/live": self.live,
            "/v2/health/ready": self.ready,
            "/v2": self.server_metadata,
            "/metrics": self.metrics,
        }

    def dispatch(self, request: Request) -> Reply | Later | Awaitable[Reply]:
        try:
            return self._route(request)
        except RequestError as exc:
            return error_reply(exc)
        except _NotAllowed as exc:
            return Reply(405, _json({"error": str(exc)}))
        except Exception as exc:  # a bug must still answer one line, never a traceback; the log keeps it
            log.exception("HTTP request %s %s failed", request.method, request.path)
            return error_reply(RequestError(ErrorKind.INTERNAL, f"{type(exc).__name__}: {exc}"))

    def _route(self, request: Request) -> Reply | Later | Awaitable[Reply]:
        path, method = request.path, request.method
        fixed = self._fixed.get(path)
        if fixed is not None:
            _allow(request, "GET")
            return fixed()
        parts = path.split("/")
        # /v2/models/{name}[/versions/{version}][/ready | /infer]
        if len(parts) < 4 or parts[:3] != ["", "v2", "models"] or not parts[3]:
            raise RequestError(ErrorKind.NOT_FOUND, f"Not Found: {method} {path}")
        name, rest = parts[3], parts[4:]
        version = ""
        if len(rest) >= 2 and rest[0] == "versions":
            version, rest = rest[1], rest[2:]
        if rest == []:
            _allow(request, "GET")
            check_model(self.pipeline, name, version)
            return self.model_metadata()
        if rest == ["ready"]:
            _allow(request, "GET")
            check_model(self.pipeline, name, version)
            return self.ready()
        if rest == ["infer"]:
            _allow(request, "POST")
            check_model(self.pipeline, name, version)
            return self.infer(request)
        raise RequestError(ErrorKind.NOT_FOUND, f"Not Found: {method} {path}")

    def live(self) -> Reply:
        return Reply(200)

    def ready(self) -> Reply:
        if self.pipeline.ready():
            return Reply(200)
        return Reply(400, _json({"error": f"pipeline {self.pipeline.name!r} is not ready"}))

    def server_metadata(self) -> Reply:
        return Reply(
            200, _json({"name": SERVER_NAME, "version": server_version(), "extensions": ["binary_tensor_data"]})
        )

    def model_metadata(self) -> Reply:
        return Reply(
            200,
            _json(
                {
                    "name": self.pipeline.name,
                    "versions": [MODEL_VERSION],
                    "platform": PLATFORM,
                    "inputs": tensor_metadata(self.pipeline.input_specs()),
                    "outputs": tensor_metadata(self.pipeline.output_specs()),
                }
            ),
        )

    def infer(self, request: Request) -> Later:
        """Submit at once, inside the connection's read; the router's answer writes the reply, so a
        query costs the loop no task, future or turn of its own."""
        body = decoded_body(request.body, request.headers.get("content-encoding"))
        parsed = parse_infer_request(body, request.headers.get(HEADER_LENGTH.lower()))
        check_inputs(self.pipeline, parsed.inputs)
        check_outputs(self.pipeline, [o.name for o in parsed.outputs])
        timeout_s = wait_budget(parsed.timeout_s, self.max_wait_s)
        future = submit(self.pipeline, parsed.inputs)
        answer = functools.partial(self._answer, parsed)
        return Later(functools.partial(answer_with, future, timeout_s, answer, error_reply))

    def _answer(self, parsed: InferRequest, result: QueryResult) -> Reply:
        outputs = chosen_outputs(result, [o.name for o in parsed.outputs])
        body, header_length = encode_response(self.pipeline.name, parsed, outputs, result.visited)
        if header_length is None:
            return Reply(200, body)
        return Reply(200, body, "application/octet-stream", ((HEADER_LENGTH, str(header_length)),))

    async def metrics(self) -> Reply:
        # Collectors may take the router's locks: scrape off the loop so queries keep flowing.
        text = await asyncio.to_thread(generate_latest, self.pipeline.metrics_registry)
        return Reply(200, text, CONTENT_TYPE_LATEST)


class _NotAllowed(Exception):
    """HTTP's own 405, which no other protocol of the router has."""


def _allow(request: Request, method: str) -> None:
    if request.method != method:
        raise _NotAllowed(f"Method Not Allowed: {request.method} {request.path}")


# -- lifecycle -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class HttpFrontend:
    """A running HTTP endpoint; `address` is "host:port" (as tritonclient.http takes it), `url` the base URL."""

    address: str
    port: int
    _server: HttpServer
    _loop: LoopThread
    _owns_loop: bool

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def stop(self) -> None:
        """Close the listening socket and connections, then end the loop thread if it is the frontend's own."""
        if self._loop.loop.is_closed():
            return
        self._loop.call(self._server.close(), timeout_s=30.0)
        if self._owns_loop:
            self._loop.close()


def serve_http(
    router: Pipeline,
    host: str = "127.0.0.1",
    port: int = 0,
    max_wait_s: float = DEFAULT_TIMEOUT_S,
    loop: LoopThread | None = None,
) -> HttpFrontend:
    """Serve `router` as the model `router.name` over KServe v2 HTTP/REST; port 0 picks a free port.

    `max_wait_s` caps how long a query waits (also when the request's `timeout` asks for longer).
    `loop`: serve on this loop thread (the router's own, `PipelineRouter.loop_thread`, so that a query
    and its answer stay on one thread) instead of one of the frontend's own; it stays running at `stop`,
    which must come before the router's.
    """
    sock = bind(host, port)
    owns_loop = loop is None
    thread = LoopThread("inferline-http-frontend") if loop is None else loop
    server = HttpServer(Routes(router, max_wait_s).dispatch, MAX_REQUEST_BYTES)
    try:
        thread.call(server.start(sock))
    except BaseException:
        sock.close()
        if owns_loop:
            thread.close()
        raise
    bound = sock.getsockname()[1]
    return HttpFrontend(f"{host}:{bound}", bound, server, thread, owns_loop)


def bind(host: str, port: int) -> socket.socket:
    """Bind before serving, so a port of 0 is known without reaching into the server's internals."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise InferlineError(f"cannot listen on {host}:{port} for HTTP: {exc.strerror}", "choose a free port") from None
    return sock
