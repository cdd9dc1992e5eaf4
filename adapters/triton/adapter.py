"""The Triton adapter: inference, model control, statistics and metrics through tritonclient.

Control goes over gRPC by default, HTTP with `protocol="http"`. Inference goes over Triton's HTTP
endpoint when the adapter knows one (`http_address`, or `address` itself with `protocol="http"`),
on kept-alive connections (`http_inference`: one per calling thread for `infer`, a pool per event
loop for `infer_async`): cheaper per call than tritonclient's clients. Without one it goes through
tritonclient's gRPC client. Triton replaces a model's whole
configuration when `load_model` is given an override, so `configure` reads the full current config,
changes the three fields InferLine tunes, and sends all of it back.
"""

from __future__ import annotations

import asyncio
import http.client as http_client
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from numpy.typing import NDArray
from tritonclient.utils import InferenceServerException, np_to_triton_dtype, triton_to_np_dtype

from inferline.adapters.base import BatchStats, ModelInfo, ModelStats, ServingConfig, Tensors, TensorSpec
from inferline.adapters.triton.http_inference import HttpInference, InferenceFailed, NotConnected
from inferline.adapters.triton.metrics import fetch_metrics
from inferline.errors import ModelNotFoundError, ServerError, ServerUnreachable, did_you_mean

FRAMEWORK = "triton"
LOAD_TIMEOUT_S = 300.0
"""How long a model (re)load may take: Triton answers once every instance has started."""
READY_TIMEOUT_S = 5.0
"""How long a readiness check waits: a server that takes longer is not ready (health probes poll it)."""


def connect(address: str, **options: Any) -> TritonAdapter:
    """The entry point `inferline.adapters: triton`."""
    return TritonAdapter(address, **options)


class TritonAdapter:
    framework = FRAMEWORK

    def __init__(
        self,
        address: str,
        protocol: str = "grpc",
        metrics_address: str | None = None,
        timeout_s: float = 30.0,
        http_address: str | None = None,
    ) -> None:
        if protocol not in ("grpc", "http"):
            raise ServerError(f"unknown Triton protocol {protocol!r}", "use 'grpc' or 'http'")
        self.address = address
        self.protocol = protocol
        self.metrics_address = metrics_address
        self.timeout_s = timeout_s
        self._client: Any = (
            grpcclient.InferenceServerClient(address)
            if protocol == "grpc"
            else httpclient.InferenceServerClient(address, connection_timeout=timeout_s, network_timeout=timeout_s)
        )
        self._io: dict[str, tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]] = {}
        inference_address = http_address or (address if protocol == "http" else None)
        self._http: HttpInference | None = None
        if inference_address:
            try:
                self._http = HttpInference(inference_address, timeout_s)
            except ValueError as exc:
                raise ServerError(f"Triton's HTTP address: {exc}", "pass HOST:PORT, e.g. 127.0.0.1:8000") from None

    # -- server -------------------------------------------------------------------------------
    def is_ready(self) -> bool:
        try:
            if self.protocol == "grpc":
                return bool(self._client.is_server_ready(client_timeout=min(self.timeout_s, READY_TIMEOUT_S)))
            return bool(self._client.is_server_ready())
        except Exception:  # unreachable or mid-start: not ready, by contract never an error
            return False

    def models(self) -> list[str]:
        index = self._call("list models", self._client.get_model_repository_index, **self._json())
        entries = index.get("models", []) if isinstance(index, dict) else index
        return sorted({str(e["name"]) for e in entries})

    def server_metrics(self) -> dict[str, float]:
        if self.metrics_address is None:
            raise ServerError(
                f"no metrics address known for the Triton server at {self.address}",
                "pass metrics_address=HOST:PORT (Triton's --metrics-port, 8002 by default)",
            )
        return fetch_metrics(f"http://{self.metrics_address}/metrics")

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
        self._client.close()

    # -- models -------------------------------------------------------------------------------
    def model_info(self, model: str) -> ModelInfo:
        self._require_known(model)
        ready = self._model_ready(model)
        if not ready:
            return ModelInfo(name=model, ready=False, config=None)
        config = self._full_config(model)
        inputs, outputs = self._tensors(model, config)
        return ModelInfo(model, True, _serving_config(config), inputs, outputs)

    def infer(self, model: str, inputs: Tensors) -> dict[str, NDArray[np.generic]]:
        if self._http is not None:
            return self._infer_http(self._http, model, inputs)
        requests = []
        for name, array in inputs.items():
            tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(np.ascontiguousarray(array))
            requests.append(tensor)
        result = self._call(f"infer on model {model!r}", self._client.infer, model, requests, model_name=model)
        return {name: result.as_numpy(name) for name in self._output_names(model)}

    async def infer_async(self, model: str, inputs: Tensors) -> dict[str, NDArray[np.generic]]:
        """`infer` for a caller on an event loop: over HTTP on the loop itself, else (gRPC only) in a thread."""
        if self._http is None:
            return await asyncio.to_thread(self.infer, model, inputs)
        known = self._io.get(model)
        if known is None:  # the first call reads the model's config: a blocking RPC, kept off the loop
            outputs = await asyncio.to_thread(self._output_names, model)
        else:
            outputs = [spec.name for spec in known[1]]
        http = self._http
        try:
            return await http.infer_async(model, inputs, outputs)
        except Exception as exc:
            error = self._http_error(http, model, exc)
            if error is exc:
                raise
            raise error from exc

    def _infer_http(self, http: HttpInference, model: str, inputs: Tensors) -> dict[str, NDArray[np.generic]]:
        outputs = self._output_names(model)
        try:
            return http.infer(model, inputs, outputs)
        except Exception as exc:
            error = self._http_error(http, model, exc)
            if error is exc:
                raise
            raise error from exc

    def _http_error(self, http: HttpInference, model: str, exc: Exception) -> Exception:
        """What an HTTP inference failure means to a caller: an unreachable server (the router tries
        another replica) or an error of this query; anything unforeseen is passed on as it is."""
        what, where = f"infer on model {model!r}", http.address
        if isinstance(exc, InferenceFailed):
            if exc.status == 503:  # Triton's UNAVAILABLE: the router tries another replica, as over gRPC
                return _unreachable(what, where, exc.text)
            return _error_text(what, where, exc.text, model)
        if isinstance(exc, NotConnected):
            return _unreachable(what, where, str(exc))
        if isinstance(exc, TimeoutError):
            # Sent, and no answer in time: the model may have run, so this is not a server to avoid.
            return ServerError(f"{what}: no answer from the Triton server at {where} within {self.timeout_s:g} s")
        if isinstance(exc, OSError | http_client.HTTPException):
            return _unreachable(what, where, str(exc) or type(exc).__name__)
        return exc

    def configure(self, model: str, config: ServingConfig) -> ServingConfig:
        if config.max_batch_size < 1 or config.instance_count < 1 or config.batching_delay_us < 0:
            raise ServerError(
                f"invalid serving config for {model!r}: {config}",
                "max_batch_size and instance_count must be >= 1, batching_delay_us >= 0",
            )
        self._require_known(model)
        full = self._full_config(model) if self._model_ready(model) else {}
        if not full:
            # Not loaded: load it as it is first, so the override starts from the real config.
            self._call(f"load model {model!r}", self._client.load_model, model, model_name=model)
            full = self._full_config(model)
        groups = full.get("instance_group") or [{"kind": "KIND_CPU"}]
        full["max_batch_size"] = config.max_batch_size
        full["instance_group"] = [{**groups[0], "count": config.instance_count}]
        full["dynamic_batching"] = {
            **(full.get("dynamic_batching") or {}),
            "max_queue_delay_microseconds": config.batching_delay_us,
            "preferred_batch_size": [config.max_batch_size],
        }
        self._call(f"reconfigure model {model!r}", self._client.load_model, model, config=json.dumps(full))
        self._io.pop(model, None)
        return _serving_config(self._full_config(model))

    def stats(self, model: str) -> ModelStats:
        self._require_known(model)
        raw = self._call(
            f"read statistics of {model!r}",
            self._client.get_inference_statistics,
            model,
            model_name=model,
            **self._json(),
        )
        return _model_stats(model, raw.get("model_stats", []))

    # -- helpers ------------------------------------------------------------------------------
    def _json(self) -> dict[str, Any]:
        return {"as_json": True} if self.protocol == "grpc" else {}

    def _model_ready(self, model: str) -> bool:
        return bool(self._call(f"check model {model!r}", self._client.is_model_ready, model))

    def _output_names(self, model: str) -> list[str]:
        """The model's outputs, read from its config once and kept (`configure` forgets them)."""
        _, outputs = self._io.get(model) or self._tensors(model, self._full_config(model))
        return [spec.name for spec in outputs]

    def _full_config(self, model: str) -> dict[str, Any]:
        raw = self._call(
            f"read config of {model!r}", self._client.get_model_config, model, model_name=model, **self._json()
        )
        config: dict[str, Any] = raw.get("config", raw) if self.protocol == "grpc" else raw
        return config

    def _tensors(self, model: str, config: Mapping[str, Any]) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
        def specs(key: str) -> tuple[TensorSpec, ...]:
            return tuple(
                TensorSpec(
                    name=str(t["name"]),
                    dtype=np.dtype(triton_to_np_dtype(str(t["data_type"]).removeprefix("TYPE_"))).name,
                    shape=tuple(int(d) for d in t.get("dims", [])),
                )
                for t in config.get(key, [])
            )

        io = (specs("input"), specs("output"))
        self._io[model] = io
        return io

    def _require_known(self, model: str) -> None:
        known = self.models()
        if model not in known:
            raise ModelNotFoundError(
                f"model {model!r} is not in the repository of the Triton server at {self.address}"
                f"{did_you_mean(model, known)}; it has {known}",
                "check the model name or add the model to the server's model repository",
            )

    def _call(self, what: str, fn: Any, *args: Any, model_name: str | None = None, **kwargs: Any) -> Any:
        if self.protocol == "grpc":  # tritonclient's gRPC calls wait forever on a hung server unless told
            loading = fn == self._client.load_model
            kwargs.setdefault("client_timeout", max(self.timeout_s, LOAD_TIMEOUT_S) if loading else self.timeout_s)
        try:
            return fn(*args, **kwargs)
        except InferenceServerException as exc:
            raise _server_error(what, self.address, exc, model_name) from exc
        except (ConnectionError, OSError) as exc:
            raise _unreachable(what, self.address, str(exc)) from exc


def _server_error(what: str, address: str, exc: InferenceServerException, model: str | None) -> ServerError:
    status = str(exc.status() or "")
    text = (exc.message() or str(exc)).strip().splitlines()[0] if (exc.message() or str(exc)) else "no message"
    if "UNAVAILABLE" in status:
        return _unreachable(what, address, text)
    return _error_text(what, address, text, model)


def _error_text(what: str, address: str, text: str, model: str | None) -> ServerError:
    if "failed to connect" in text.lower() or "connection refused" in text.lower():
        return _unreachable(what, address, text)
    if model is not None and ("unknown model" in text.lower() or "not found" in text.lower()):
        return ModelNotFoundError(f"{what}: the Triton server at {address} has no model {model!r} ({text})")
    return ServerError(f"{what} failed on the Triton server at {address}: {text}")


def _unreachable(what: str, address: str, text: str) -> ServerError:
    first = text.splitlines()[0] if text else "no reply"
    return ServerUnreachable(
        f"cannot {what}: the Triton server at {address} is unreachable ({first})",
        "check that tritonserver is running and the address and port are right",
    )


def _serving_config(config: Mapping[str, Any]) -> ServingConfig:
    groups = config.get("instance_group") or [{}]
    batching = config.get("dynamic_batching") or {}
    return ServingConfig(
        max_batch_size=int(config.get("max_batch_size", 0)),
        instance_count=sum(int(g.get("count", 1)) for g in groups),
        batching_delay_us=int(batching.get("max_queue_delay_microseconds", 0)),
    )


def _model_stats(model: str, entries: list[Mapping[str, Any]]) -> ModelStats:
    def ns(block: Mapping[str, Any] | None) -> float:
        return float((block or {}).get("ns", 0)) / 1e6

    inferences = executions = 0
    queue_ms = compute_ms = 0.0
    batches: dict[int, list[float]] = {}
    for entry in entries:
        inferences += int(entry.get("inference_count", 0))
        executions += int(entry.get("execution_count", 0))
        stats = entry.get("inference_stats", {})
        queue_ms += ns(stats.get("queue"))
        compute_ms += ns(stats.get("compute_input")) + ns(stats.get("compute_infer")) + ns(stats.get("compute_output"))
        for b in entry.get("batch_stats", []):
            size = int(b["batch_size"])
            slot = batches.setdefault(size, [0.0, 0.0])
            slot[0] += int(b.get("compute_infer", {}).get("count", 0))
            slot[1] += ns(b.get("compute_input")) + ns(b.get("compute_infer")) + ns(b.get("compute_output"))
    return ModelStats(
        model=model,
        inferences=inferences,
        executions=executions,
        queue_ms_total=queue_ms,
        compute_ms_total=compute_ms,
        batches=tuple(BatchStats(size, int(v[0]), v[1]) for size, v in sorted(batches.items())),
    )
