"""The profiler: batch latency of one model on one replica, per batch size, through an adapter.

For each batch size it sends batches of exactly that size one at a time (closed loop: the next
is sent when the previous has answered), after a warm-up, until it has `samples` latencies or
its time budget is spent. The latency is what a client sees through the serving framework,
which is what the design's profile format and the estimator mean by service time. The server's
own compute time for the same batches (from its statistics) is recorded next to it, and, where
the caller can read the server's CPU clock (a local server), the CPU time the server spent per
batch: how much of a call needs a core, which decides how replicas sharing cores slow each other.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inferline.adapters.base import Adapter, ModelStats, ServingConfig, example_inputs
from inferline.errors import InferlineError, ModelNotFoundError, ProfileError, ServerError, did_you_mean
from inferline.profiles import BatchPoint, LatencyStats, ModelProfile, write_profile

FLAT_THROUGHPUT_GAIN = 0.05
"""A batch size must raise throughput by this fraction over the last kept one, or `drop_flat` drops it."""


@dataclass(frozen=True)
class ProfileSettings:
    batch_sizes: tuple[int, ...]
    warmup: int = 3
    samples: int = 30
    budget_s: float = 10.0
    """Time budget per batch size; at least one sample is always taken."""
    drop_flat: bool = False


@dataclass(frozen=True)
class ProfileProgress:
    model: str
    batch_size: int
    done: int
    """Batch sizes finished so far."""
    total: int


class ProfileInterrupted(InferlineError):
    """Profiling stopped early; `partial` holds the batch sizes measured before it stopped."""

    def __init__(self, message: str, fix: str | None, partial: ModelProfile | None) -> None:
        super().__init__(message, fix)
        self.partial = partial


def validate_batch_sizes(batch_sizes: Sequence[int]) -> tuple[int, ...]:
    sizes = tuple(batch_sizes)
    if not sizes:
        raise ProfileError("no batch sizes to profile", "pass --batch-sizes, e.g. 1,2,4,8")
    if any(b < 1 for b in sizes) or any(b <= a for a, b in itertools.pairwise(sizes)):
        raise ProfileError(f"batch sizes must be positive and increasing, got {list(sizes)}", "e.g. 1,2,4,8,16,32")
    return sizes


CpuClock = Callable[[], float | None]
"""Seconds of CPU the model server has used so far (None where it cannot tell)."""


def measure_batch(
    adapter: Adapter,
    model: str,
    batch_size: int,
    settings: ProfileSettings,
    inputs_for: Callable[[int], object],
    server_cpu: CpuClock | None = None,
) -> BatchPoint:
    inputs = inputs_for(batch_size)
    for _ in range(settings.warmup):
        adapter.infer(model, inputs)  # type: ignore[arg-type]
    before = adapter.stats(model)
    cpu_before = server_cpu() if server_cpu is not None else None
    latencies: list[float] = []
    deadline = time.perf_counter() + settings.budget_s
    while len(latencies) < settings.samples and (not latencies or time.perf_counter() < deadline):
        started = time.perf_counter()
        adapter.infer(model, inputs)  # type: ignore[arg-type]
        latencies.append((time.perf_counter() - started) * 1000.0)
    cpu_after = server_cpu() if server_cpu is not None else None
    server_ms = _server_compute_ms(before, adapter.stats(model), batch_size)
    ms = np.asarray(latencies)
    extra = {"samples": len(latencies)} | ({"server_compute_ms": round(server_ms, 4)} if server_ms else {})
    cpu_ms = None
    if cpu_before is not None and cpu_after is not None:
        cpu_ms = round(max(cpu_after - cpu_before, 0.0) * 1000.0 / len(latencies), 4)
    stats = LatencyStats(
        mean=float(ms.mean()),
        p50=float(np.percentile(ms, 50)),
        p99=float(np.percentile(ms, 99)),
        server_cpu_ms=cpu_ms,
        **extra,
    )
    return BatchPoint(batch_size=batch_size, latency_ms=stats)


def _server_compute_ms(before: ModelStats, after: ModelStats, batch_size: int) -> float | None:
    runs = after.executions_at(batch_size) - before.executions_at(batch_size)
    if runs <= 0:
        return None
    total = sum(b.compute_ms_total for b in after.batches if b.batch_size == batch_size) - sum(
        b.compute_ms_total for b in before.batches if b.batch_size == batch_size
    )
    return total / runs


def drop_flat_points(points: Sequence[BatchPoint]) -> tuple[BatchPoint, ...]:
    """Keep a batch size only if it raises throughput over the last kept one (batch 1 always stays)."""
    kept: list[BatchPoint] = []
    for p in points:
        rate = p.batch_size / p.latency_ms.mean
        if not kept or rate > (kept[-1].batch_size / kept[-1].latency_ms.mean) * (1 + FLAT_THROUGHPUT_GAIN):
            kept.append(p)
    return tuple(kept)


def profile_model(
    adapter: Adapter,
    model: str,
    hardware: str,
    settings: ProfileSettings,
    progress: Callable[[ProfileProgress], None] | None = None,
    server_cpu: CpuClock | None = None,
) -> ModelProfile:
    """Profile `model` on one replica; the model's serving config is restored afterwards.

    Raises `ProfileInterrupted` (with what was measured) if the server fails or the user
    interrupts midway; errors before the first measurement (unknown model, unreachable server)
    raise as they are.
    """
    sizes = validate_batch_sizes(settings.batch_sizes)
    info = adapter.model_info(model)
    original = info.config
    # One replica, a maximum batch that admits every size, never waiting to fill a batch.
    adapter.configure(model, ServingConfig(max_batch_size=sizes[-1], instance_count=1, batching_delay_us=0))
    info = adapter.model_info(model)
    points: list[BatchPoint] = []
    try:
        for i, batch in enumerate(sizes):
            if progress is not None:
                progress(ProfileProgress(model, batch, i, len(sizes)))
            points.append(measure_batch(adapter, model, batch, settings, lambda n: example_inputs(info, n), server_cpu))
        if progress is not None:
            progress(ProfileProgress(model, sizes[-1], len(sizes), len(sizes)))
    except (ServerError, KeyboardInterrupt) as exc:
        partial = _profile(model, hardware, points, settings.drop_flat) if points else None
        reason = exc.message if isinstance(exc, InferlineError) else "interrupted"
        raise ProfileInterrupted(
            f"profiling {model!r} stopped after {len(points)} of {len(sizes)} batch sizes: {reason}",
            "the batch sizes measured so far are kept; fix the cause and profile the rest",
            partial,
        ) from exc
    finally:
        if original is not None:
            with contextlib.suppress(InferlineError):
                adapter.configure(model, original)
    return _profile(model, hardware, points, settings.drop_flat)


def _profile(model: str, hardware: str, points: list[BatchPoint], drop_flat: bool) -> ModelProfile:
    kept = drop_flat_points(points) if drop_flat else tuple(points)
    return ModelProfile(model=model, profiles={hardware: kept})


@dataclass(frozen=True)
class ProfileWritten:
    model: str
    path: Path
    batch_sizes: tuple[int, ...]
    wall_s: float


def profile_to_directory(
    adapter: Adapter,
    models: Sequence[str],
    hardware: str,
    settings: ProfileSettings,
    out_dir: str | Path,
    progress: Callable[[ProfileProgress], None] | None = None,
    written: Callable[[ProfileWritten], None] | None = None,
    server_cpu: CpuClock | None = None,
) -> list[ProfileWritten]:
    """Profile each model and write its profile as soon as it is done.

    On an interruption the partial profile of the model at hand is written too, then the
    `ProfileInterrupted` error goes on to the caller: nothing measured is lost.
    """
    validate_batch_sizes(settings.batch_sizes)
    known = adapter.models()
    missing = [m for m in models if m not in known]
    if missing:
        raise ModelNotFoundError(
            f"model(s) {missing} are not on the {adapter.framework} server at {adapter.address}"
            f"{did_you_mean(missing[0], known)}; it has {known}",
            "check --models",
        )
    done: list[ProfileWritten] = []
    for model in models:
        started = time.perf_counter()
        try:
            profile = profile_model(adapter, model, hardware, settings, progress, server_cpu)
        except ProfileInterrupted as exc:
            if exc.partial is not None:
                path = write_profile(exc.partial, out_dir)
                exc.message += f"; partial profile kept in {path}"
            raise
        item = ProfileWritten(
            model, write_profile(profile, out_dir), profile.batch_sizes(hardware), time.perf_counter() - started
        )
        done.append(item)
        if written is not None:
            written(item)
    return done
