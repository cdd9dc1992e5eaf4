"""The pipeline endpoint over gRPC: the Open Inference Protocol (KServe v2) as Triton speaks it.

A whole pipeline is served as ONE model named after the pipeline, so existing clients
(tritonclient.grpc, KServe clients, our `inferline.router.client`) call it like a model.

The server is `grpc.aio` on an event loop of its own thread: a query waits on the router's future
as an awaitable, not on a handler thread, so the number of queries in flight is bounded by the
router's queues (which refuse overload with RESOURCE_EXHAUSTED) rather than by a thread pool that
would queue requests where the router cannot see them (their wait would be missing from the
latency the tuner and the SLO accounting measure).

Status codes: unknown model or version -> NOT_FOUND; malformed input -> INVALID_ARGUMENT;
router overloaded -> RESOURCE_EXHAUSTED; query failed (replicas died) -> UNAVAILABLE; no answer
within the call's deadline (or `max_wait_s`) -> DEADLINE_EXCEEDED; router not ready -> UNAVAILABLE.
Every error carries the trailing metadata `inferline-error: <kind>` and a one-line message.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc

from inferline.errors import InferlineError
from inferline.protos import kserve_v2_pb2 as pb
from inferline.protos import kserve_v2_pb2_grpc as pb_grpc
from inferline.router.event_loop import LoopThread
from inferline.router.frontend_types import (
    DEFAULT_TIMEOUT_S,
    ERROR_KIND_KEY,
    MODEL_VERSION,
    PLATFORM,
    SERVER_NAME,
    Array,
    ErrorKind,
    Pipeline,
    RequestError,
    check_inputs,
    check_model,
    check_outputs,
    chosen_outputs,
    datatype_of,
    from_raw,
    from_values,
    invalid,
    request_shape,
    run_query,
    server_version,
    to_raw,
    wait_budget,
)

log = logging.getLogger(__name__)

STATUS: dict[ErrorKind, grpc.StatusCode] = {
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.OVERLOADED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.FAILED: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.TIMEOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}

CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
"""Which InferTensorContents field holds each datatype (FP16 has none: raw contents only)."""

MESSAGE_LIMIT = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
"""Tensors (images, batches of features) easily exceed gRPC's 4 MiB default."""

Context = grpc.aio.ServicerContext[Any, Any]


# -- request decoding and response encoding (pure) -----------------------------------------------
def decode_inputs(request: pb.ModelInferRequest) -> dict[str, Array]:
    """The request's inputs as arrays: from raw_input_contents when sent (all or none), else `contents`."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise invalid(
            f"request has {len(raw)} raw_input_contents for {len(request.inputs)} inputs",
            "send raw contents for every input or for none",
        )
    out: dict[str, Array] = {}
    for i, tensor in enumerate(request.inputs):
        if tensor.name in out:
            raise invalid(f"input {tensor.name!r} appears twice")
        shape = tuple(tensor.shape)
        out[tensor.name] = from_raw(tensor.datatype, shape, raw[i], tensor.name) if raw else from_contents(tensor)
    return out


def from_contents(tensor: pb.ModelInferRequest.InferInputTensor) -> Array:
    field = CONTENTS_FIELD.get(tensor.datatype)
    if field is None and tensor.datatype == "FP16":
        raise invalid(f"FP16 input {tensor.name!r} has no typed contents field", "send it in raw_input_contents")
    values = getattr(tensor.contents, field) if field else []
    return from_values(tensor.datatype, tuple(tensor.shape), values, tensor.name)


def infer_response(
    request: pb.ModelInferRequest, pipeline: Pipeline, outputs: dict[str, Array], visited: tuple[str, ...]
) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=pipeline.name, model_version=MODEL_VERSION, id=request.id)
    response.parameters["inferline_visited"].string_param = ",".join(visited)
    for name, array in outputs.items():
        response.outputs.add(name=name, datatype=datatype_of(array.dtype), shape=array.shape)
        response.raw_output_contents.append(to_raw(array))
    return response


def client_timeout_s(request: pb.ModelInferRequest, context: Context) -> float | None:
    """The tighter of the call's deadline and Triton's `timeout` request parameter (microseconds)."""
    limits = [t for t in (context.time_remaining(),) if t is not None]
    if "timeout" in request.parameters:
        param = request.parameters["timeout"]
        micros = param.int64_param if param.WhichOneof("parameter_choice") == "int64_param" else param.uint64_param
        if micros > 0:
            limits.append(micros / 1e6)
    return min(limits) if limits else None


def tensor_metadata(specs: Any) -> list[pb.ModelMetadataResponse.TensorMetadata]:
    return [
        pb.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=datatype_of(s.dtype), shape=request_shape(s))
        for s in specs
    ]


# -- the service ---------------------------------------------------------------------------------
class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, pipeline: Pipeline, max_wait_s: float) -> None:
        self.pipeline = pipeline
        self.max_wait_s = max_wait_s

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.pipeline.ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:
        # An unknown model is "not ready" (as Triton answers), so readiness probes never see an error.
        known = request.name == self.pipeline.name and request.version in ("", MODEL_VERSION)
        return pb.ModelReadyResponse(ready=known and self.pipeline.ready())

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=server_version(), extensions=[])

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Context) -> pb.ModelMetadataResponse:
        try:
            check_model(self.pipeline, request.name, request.version)
        except RequestError as exc:
            await abort(context, exc)
        return pb.ModelMetadataResponse(
            name=self.pipeline.name,
            versions=[MODEL_VERSION],
            platform=PLATFORM,
            inputs=tensor_metadata(self.pipeline.input_specs()),
            outputs=tensor_metadata(self.pipeline.output_specs()),
        )

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:
        try:
            return await self._infer(request, context)
        except RequestError as exc:
            await abort(context, exc)
        except Exception as exc:  # a bug must still answer with its kind, not UNKNOWN; the log keeps it
            log.exception("gRPC ModelInfer failed")
            await abort(context, RequestError(ErrorKind.INTERNAL, f"{type(exc).__name__}: {exc}"))

    async def _infer(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:
        check_model(self.pipeline, request.model_name, request.model_version)
        inputs = decode_inputs(request)
        check_inputs(self.pipeline, inputs)
        requested = [o.name for o in request.outputs]
        check_outputs(self.pipeline, requested)
        timeout_s = wait_budget(client_timeout_s(request, context), self.max_wait_s)
        result = await run_query(self.pipeline, inputs, timeout_s)
        return infer_response(request, self.pipeline, chosen_outputs(result, requested), result.visited)


async def abort(context: Context, exc: RequestError) -> NoReturn:
    await context.abort(STATUS[exc.kind], exc.one_line(), trailing_metadata=((ERROR_KIND_KEY, exc.kind.value),))


# -- lifecycle -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class GrpcFrontend:
    """A running gRPC endpoint; `address` is "host:port" as gRPC clients take it."""

    address: str
    port: int
    _server: grpc.aio.Server
    _loop: LoopThread
    _owns_loop: bool

    def stop(self, grace_s: float = 1.0) -> None:
        """Stop accepting calls, give calls in flight `grace_s` to finish, and end the loop thread if
        it is the frontend's own."""
        if self._loop.loop.is_closed():
            return
        self._loop.call(self._server.stop(grace_s), timeout_s=grace_s + 10.0)
        if self._owns_loop:
            self._loop.close()


def serve_grpc(
    router: Pipeline,
    host: str = "127.0.0.1",
    port: int = 0,
    max_wait_s: float = DEFAULT_TIMEOUT_S,
    loop: LoopThread | None = None,
) -> GrpcFrontend:
    """Serve `router` as the model `router.name` over KServe v2 gRPC; port 0 picks a free port.

    `max_wait_s` caps how long a query waits when its call sets no (or a longer) deadline. `loop`:
    serve on this loop thread (the router's own, `PipelineRouter.loop_thread`) instead of one of the
    frontend's own; it stays running at `stop`, which must come before the router's.
    """
    owns_loop = loop is None
    thread = LoopThread("inferline-grpc-frontend") if loop is None else loop
    try:
        server, bound = thread.call(_start(router, host, port, max_wait_s))
    except BaseException:
        if owns_loop:
            thread.close()
        raise
    return GrpcFrontend(f"{host}:{bound}", bound, server, thread, owns_loop)


async def _start(router: Pipeline, host: str, port: int, max_wait_s: float) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(options=MESSAGE_LIMIT)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(router, max_wait_s), server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:  # newer grpcio raises where older ones returned 0
        bound = 0
    if bound == 0:
        raise InferlineError(f"cannot listen on {host}:{port} for gRPC", "choose a free port (0 picks one)")
    await server.start()
    return server, bound
