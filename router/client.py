"""A small KServe v2 (Open Inference Protocol) gRPC client, so the replay tool needs no framework library.

Works against InferLine's pipeline endpoint and any server speaking the protocol (e.g. Triton).
Failures raise one-line `InferlineError`s of distinct types, so load generators can count them apart:

    ServerOverloaded   RESOURCE_EXHAUSTED: the router refused the query (its queues are full)
    QueryTimeout       no answer within timeout_s (also a TimeoutError)
    InvalidRequest     INVALID_ARGUMENT: the inputs do not fit the model (a QueryError)
    QueryError         the query failed (e.g. the pipeline's replicas died), or any other error
    ModelNotFoundError NOT_FOUND: no such model (from inferline.errors)
    ServerUnreachable  nothing answers at the address (from inferline.errors)

Inputs are numpy arrays sent as raw_input_contents; outputs come back as arrays by name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol

import grpc
import numpy as np
from numpy.typing import NDArray

from inferline.errors import InferlineError, ModelNotFoundError, ServerUnreachable
from inferline.protos import kserve_v2_pb2 as pb
from inferline.protos import kserve_v2_pb2_grpc as pb_grpc
from inferline.router.frontend_types import (
    ERROR_KIND_KEY,
    ErrorKind,
    RequestError,
    datatype_of,
    from_raw,
    from_values,
    numpy_dtype,
    to_raw,
)

DEFAULT_TIMEOUT_S = 30.0
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
CONTENTS_FIELDS = ("bool", "int", "int64", "uint", "uint64", "fp32", "fp64", "bytes")

Tensors = dict[str, NDArray[Any]]


class ServerOverloaded(InferlineError):
    """The server refused the query because it is overloaded (RESOURCE_EXHAUSTED); retry later."""


class QueryError(InferlineError):
    """The server answered the query with an error (failed replicas, internal error, bad request)."""


class InvalidRequest(QueryError):
    """The request does not fit the model: unknown or missing input, wrong datatype or shape."""


class QueryTimeout(InferlineError, TimeoutError):
    """No answer within the timeout (a TimeoutError too, so generic timeout handling catches it)."""


@dataclass(frozen=True)
class TensorMetadata:
    name: str
    datatype: str
    """The protocol's datatype, e.g. "FP32"."""
    shape: tuple[int, ...]
    """As the server reports it; InferLine's pipelines report [1, *per-item shape]."""

    @property
    def dtype(self) -> str:
        """The numpy dtype name, e.g. "float32"."""
        return numpy_dtype(self.datatype).name


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorMetadata, ...]
    outputs: tuple[TensorMetadata, ...]


# -- messages (pure) -----------------------------------------------------------------------------
def infer_request(model: str, inputs: Mapping[str, NDArray[Any]], outputs: Sequence[str] = ()) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    for name, value in inputs.items():
        array = np.asarray(value)
        request.inputs.add(name=name, datatype=datatype_of(array.dtype), shape=array.shape)
        request.raw_input_contents.append(to_raw(array))
    for name in outputs:
        request.outputs.add(name=name)
    return request


def infer_outputs(response: pb.ModelInferResponse) -> Tensors:
    """Outputs by name, from raw_output_contents when sent (one per output), else from `contents`."""
    raw = response.raw_output_contents
    if raw and len(raw) != len(response.outputs):
        raise RequestError(ErrorKind.INVALID, f"{len(raw)} raw_output_contents for {len(response.outputs)} outputs")
    out: Tensors = {}
    for i, tensor in enumerate(response.outputs):
        shape = tuple(tensor.shape)
        if raw:
            out[tensor.name] = from_raw(tensor.datatype, shape, raw[i], tensor.name)
        else:
            out[tensor.name] = from_values(tensor.datatype, shape, contents_values(tensor), tensor.name)
    return out


def contents_values(tensor: pb.ModelInferResponse.InferOutputTensor) -> list[Any]:
    """The one typed field that holds values (all are empty for an empty tensor)."""
    for field in CONTENTS_FIELDS:
        values = getattr(tensor.contents, f"{field}_contents")
        if len(values):
            return list(values)
    return []


def model_metadata_of(response: pb.ModelMetadataResponse) -> ModelMetadata:
    def tensors(items: Any) -> tuple[TensorMetadata, ...]:
        return tuple(TensorMetadata(t.name, t.datatype, tuple(t.shape)) for t in items)

    return ModelMetadata(
        response.name, tuple(response.versions), response.platform, tensors(response.inputs), tensors(response.outputs)
    )


# -- errors --------------------------------------------------------------------------------------
class _Status(Protocol):
    """What a failed call tells (sync and aio errors have it under different base classes)."""

    def code(self) -> grpc.StatusCode: ...

    def details(self) -> str | None: ...


def error_kind(metadata: Any) -> str | None:
    """The `inferline-error` trailing metadata our frontend attaches (absent from other servers)."""
    for key, value in metadata or ():
        if key == ERROR_KIND_KEY:
            return str(value)
    return None


def error_for(status: _Status, kind: str | None, address: str, model: str, timeout_s: float) -> InferlineError:
    code = status.code()
    details = " ".join((status.details() or code.name).split())
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ServerOverloaded(f"{address} is overloaded: {details}", "retry later or scale the pipeline")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return QueryTimeout(f"no answer from {address} within {timeout_s:.3g} s")
    if code == grpc.StatusCode.NOT_FOUND:
        return ModelNotFoundError(details, f"check the model name {model!r} (a pipeline's name)")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequest(details)
    if code == grpc.StatusCode.UNAVAILABLE and kind != ErrorKind.FAILED.value:
        return ServerUnreachable(
            f"no KServe v2 server answers at {address}: {details}", "check that the pipeline is up and the address"
        )
    return QueryError(f"{model!r} at {address}: {details}")


def _decoded(decode: Any, *args: Any) -> Any:
    """Decode a response; a malformed one is the server's error, reported as a QueryError."""
    try:
        return decode(*args)
    except RequestError as exc:
        raise QueryError(f"malformed response: {exc.message}") from None


# -- clients -------------------------------------------------------------------------------------
class KServeClient:
    """Synchronous client; thread-safe (one channel, shared by the calls)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)

    def infer(
        self,
        model: str,
        inputs: Mapping[str, NDArray[Any]],
        timeout_s: float = DEFAULT_TIMEOUT_S,
        outputs: Sequence[str] = (),
    ) -> Tensors:
        """Run one request; returns the outputs by name (only `outputs` when named)."""
        response = self._call(self._stub.ModelInfer, infer_request(model, inputs, outputs), model, timeout_s)
        result: Tensors = _decoded(infer_outputs, response)
        return result

    def ready(self, model: str | None = None, timeout_s: float = 5.0) -> bool:
        """Server (and, when named, model) readiness; an unreachable server is simply not ready."""
        try:
            if not self._call(self._stub.ServerReady, pb.ServerReadyRequest(), "", timeout_s).ready:
                return False
            if model is None:
                return True
            return bool(self._call(self._stub.ModelReady, pb.ModelReadyRequest(name=model), model, timeout_s).ready)
        except (ServerUnreachable, QueryTimeout):
            return False

    def model_metadata(self, model: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> ModelMetadata:
        response = self._call(self._stub.ModelMetadata, pb.ModelMetadataRequest(name=model), model, timeout_s)
        return model_metadata_of(response)

    def _call(self, method: Any, request: Any, model: str, timeout_s: float) -> Any:
        try:
            return method(request, timeout=timeout_s)
        except grpc.RpcError as exc:
            status: Any = exc  # the raised error is also a grpc.Call (code, details, trailing_metadata)
            raise error_for(status, error_kind(status.trailing_metadata()), self.address, model, timeout_s) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> KServeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncKServeClient:
    """asyncio client (grpc.aio). The channel opens on first use, in the running event loop."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None

    def _connected(self) -> Any:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS)
            self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        return self._stub

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, NDArray[Any]],
        timeout_s: float = DEFAULT_TIMEOUT_S,
        outputs: Sequence[str] = (),
    ) -> Tensors:
        stub = self._connected()
        response = await self._call(stub.ModelInfer, infer_request(model, inputs, outputs), model, timeout_s)
        result: Tensors = _decoded(infer_outputs, response)
        return result

    async def ready(self, model: str | None = None, timeout_s: float = 5.0) -> bool:
        stub = self._connected()
        try:
            if not (await self._call(stub.ServerReady, pb.ServerReadyRequest(), "", timeout_s)).ready:
                return False
            if model is None:
                return True
            return bool((await self._call(stub.ModelReady, pb.ModelReadyRequest(name=model), model, timeout_s)).ready)
        except (ServerUnreachable, QueryTimeout):
            return False

    async def model_metadata(self, model: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> ModelMetadata:
        stub = self._connected()
        response = await self._call(stub.ModelMetadata, pb.ModelMetadataRequest(name=model), model, timeout_s)
        return model_metadata_of(response)

    async def _call(self, method: Any, request: Any, model: str, timeout_s: float) -> Any:
        try:
            return await method(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise error_for(exc, error_kind(exc.trailing_metadata()), self.address, model, timeout_s) from None

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close(None)
            self._channel = None

    async def __aenter__(self) -> AsyncKServeClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
