"""The one interface every serving framework is driven through, and the plain data it returns."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

Tensors = Mapping[str, NDArray[np.generic]]
"""Named tensors whose first axis is the batch."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    """numpy dtype name, e.g. "float32"."""
    shape: tuple[int, ...]
    """Per-item shape (without the batch axis); -1 for a variable dimension."""


@dataclass(frozen=True)
class ServingConfig:
    """What InferLine tunes on a model: the planner's batch size and in-server replicas."""

    max_batch_size: int
    instance_count: int
    batching_delay_us: int = 0
    """How long the server may wait to fill a batch; InferLine's semantics want 0 (never wait)."""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    ready: bool
    config: ServingConfig | None
    """None when the model is not loaded."""
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()


@dataclass(frozen=True)
class BatchStats:
    batch_size: int
    executions: int
    compute_ms_total: float
    """Sum over executions of the server's compute time (input + infer + output)."""


@dataclass(frozen=True)
class ModelStats:
    """Cumulative counters since the model was loaded, as the server reports them."""

    model: str
    inferences: int
    """Items inferred (a batch of 8 counts 8)."""
    executions: int
    """Batches executed."""
    queue_ms_total: float
    compute_ms_total: float
    batches: tuple[BatchStats, ...] = field(default=())

    def executions_at(self, batch_size: int) -> int:
        return sum(b.executions for b in self.batches if b.batch_size == batch_size)


@runtime_checkable
class Adapter(Protocol):
    """A connection to one model server. Errors a user can cause raise `ServerError` subclasses."""

    framework: str
    address: str

    def is_ready(self) -> bool:
        """Whether the server answers and is ready; never raises for an unreachable server."""
        ...

    def models(self) -> list[str]:
        """Names of the models the server can serve (loaded or not)."""
        ...

    def model_info(self, model: str) -> ModelInfo: ...

    def infer(self, model: str, inputs: Tensors) -> dict[str, NDArray[np.generic]]:
        """Send one batch; returns the named outputs, batch axis first."""
        ...

    def configure(self, model: str, config: ServingConfig) -> ServingConfig:
        """Apply a serving configuration and return the one now in effect."""
        ...

    def stats(self, model: str) -> ModelStats: ...

    def server_metrics(self) -> dict[str, float]:
        """The server's own metrics as flat numbers, e.g. {'nv_inference_count{model="x"}': 25}."""
        ...

    def close(self) -> None: ...


def example_inputs(info: ModelInfo, batch_size: int, seed: int = 0) -> dict[str, NDArray[np.generic]]:
    """Random inputs of the model's declared shapes, for profiling (variable dims become 1)."""
    return random_inputs(info.inputs, batch_size, np.random.default_rng(seed))


def random_inputs(
    specs: Sequence[TensorSpec], batch_size: int, rng: np.random.Generator
) -> dict[str, NDArray[np.generic]]:
    """Random tensors of these declared shapes and dtypes, batch axis first (variable dims become 1)."""
    out: dict[str, NDArray[np.generic]] = {}
    for spec in specs:
        shape = (batch_size, *(d if d > 0 else 1 for d in spec.shape))
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            out[spec.name] = rng.random(shape).astype(dtype)
        elif dtype.kind in "iu":
            out[spec.name] = rng.integers(0, 255, size=shape).astype(dtype)
        elif dtype.kind == "b":
            out[spec.name] = rng.random(shape) < 0.5
        else:
            out[spec.name] = np.full(shape, b"x", dtype=object)
    return out


@dataclass(frozen=True)
class ServerHandle:
    """A model server an adapter started itself (the embedded default): how to connect to it."""

    address: str
    options: Mapping[str, str]
    """Keyword options for the adapter's `connect` (e.g. the metrics address)."""
    startup_s: float
    pid: int | None = None
    """The server's process (the leader of its own process group), so a supervisor can always stop it."""


def feed_inputs(
    info: ModelInfo, available: Mapping[str, NDArray[np.generic]], fallback: Mapping[str, NDArray[np.generic]]
) -> dict[str, NDArray[np.generic]]:
    """A child model's inputs from its parents' outputs: by name, else the one output of that item shape.

    An input neither rule finds keeps its value from `fallback` (e.g. random example inputs).
    """
    fed = dict(fallback)
    for spec in info.inputs:
        if spec.name in available:
            fed[spec.name] = available[spec.name]
            continue
        same_shape = [v for v in available.values() if _fits(v.shape[1:], spec.shape)]
        if len(same_shape) == 1:
            fed[spec.name] = same_shape[0].astype(np.dtype(spec.dtype))
    return fed


def _fits(shape: tuple[int, ...], declared: tuple[int, ...]) -> bool:
    return len(shape) == len(declared) and all(d in (-1, s) for s, d in zip(shape, declared, strict=True))
