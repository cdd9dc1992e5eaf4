"""The profiler: batch latency of one model on one replica, per batch size, through an adapter.

For each batch size it sends batches of exactly that size one at a time (closed loop: the next
is sent when the previous has answered), after a warm-up, until it has `samples` latencies or
its time budget is spent. The latency is what a client sees through the serving framework,
which is what the design's profile format and the estimator mean by service time. The server's
own compute time for the same batches (from its statistics) is recorded next to it, and, where
the caller can read the server's CPU clock (a local server), the CPU time the server spent per
batch: how much of a call needs a core, which decides how replicas sharing cores slow each other.

Back-to-back calls find the server's threads awake. Live, a replica often sits idle between calls,
and a call after a gap takes longer while they wake up (on a 2-core VM, 0.5-1.2 ms more for calls
of 1-11 ms). So after the batch sizes the profiler also times calls at the smallest batch size
after idle gaps of a few lengths, interleaved with back-to-back calls so that a drift of the
machine's speed hits both alike, and fits the profile's `after_idle` term: a call after a gap of
g ms takes extra * (1 - exp(-g / tau)) longer. Where the extra is within the noise, it records none.

Where the server runs on this machine, it then times calls alone and beside a busy neighbour per
core and records the model's interference: how much calls computing beside it slow it down before
the cores are full (`agent/interference_probe.py`, the sharing rule's g).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from inferline.adapters.base import Adapter, ModelStats, ServingConfig, example_inputs
from inferline.agent.interference_probe import measure_interference
from inferline.errors import InferlineError, ModelNotFoundError, ProfileError, ServerError, did_you_mean
from inferline.process_cpu import available_cores
from inferline.profiles import MAX_BATCH_SIZE, AfterIdle, BatchPoint, LatencyStats, ModelProfile, write_profile

IDLE_GAPS_S = (0.001, 0.003, 0.010, 0.050)
"""The idle gaps before the timed calls of an after-idle round: short ones for the time constant,
the longest past where the extra latency still grows."""
TAU_GRID_MS = np.geomspace(0.05, 200.0, 400)

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
    idle_rounds: int = 20
    """Rounds of calls after idle gaps (module doc); 0: do not measure the after-idle latency."""
    interference_rounds: int = 15
    """Rounds of calls alone and beside a busy neighbour per core (`agent/interference_probe.py`),
    where the server runs on this machine (its CPU clock is read); 0: do not measure interference."""


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
        shown = list(sizes[:8]) + (["..."] if len(sizes) > 8 else [])
        raise ProfileError(f"batch sizes must be positive and increasing, got {shown}", "e.g. 1,2,4,8,16,32")
    if sizes[-1] > MAX_BATCH_SIZE:
        raise ProfileError(f"batch size {sizes[-1]} is over the limit of {MAX_BATCH_SIZE}", "e.g. 1,2,4,8,16,32")
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
    client_before = time.thread_time()
    deadline = time.perf_counter() + settings.budget_s
    while len(latencies) < settings.samples and (not latencies or time.perf_counter() < deadline):
        started = time.perf_counter()
        adapter.infer(model, inputs)  # type: ignore[arg-type]
        latencies.append((time.perf_counter() - started) * 1000.0)
    client_ms = (time.thread_time() - client_before) * 1000.0 / len(latencies)
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
        client_cpu_ms=round(client_ms, 4),
        **extra,
    )
    return BatchPoint(batch_size=batch_size, latency_ms=stats)


def measure_after_idle(
    adapter: Adapter,
    model: str,
    inputs: object,
    rounds: int,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.perf_counter,
) -> AfterIdle | None:
    """The after-idle term of one model (module doc); None where the extra latency is within the noise.

    Each round: two untimed calls (the first after an idle gap is slow, the second still a little:
    0.3 ms of 1 ms on the preprocess model), a timed call right after them, then a timed call after
    each gap of IDLE_GAPS_S. The gaps used are the measured ones (a sleep overshoots).
    """
    warm: list[float] = []
    gaps: list[list[float]] = [[] for _ in IDLE_GAPS_S]
    after: list[list[float]] = [[] for _ in IDLE_GAPS_S]
    for _ in range(rounds):
        for _ in range(2):
            adapter.infer(model, inputs)  # type: ignore[arg-type]
        started = clock()
        adapter.infer(model, inputs)  # type: ignore[arg-type]
        ended = clock()
        warm.append(ended - started)
        for k, gap in enumerate(IDLE_GAPS_S):
            sleep(gap)
            started = clock()
            adapter.infer(model, inputs)  # type: ignore[arg-type]
            gaps[k].append(started - ended)
            ended = clock()
            after[k].append(ended - started)
    return fit_after_idle(
        np.asarray(warm) * 1000.0, [np.asarray(g) * 1000.0 for g in gaps], [np.asarray(a) * 1000.0 for a in after]
    )


def fit_after_idle(
    warm_ms: NDArray[np.float64], gaps_ms: Sequence[NDArray[np.float64]], after_ms: Sequence[NDArray[np.float64]]
) -> AfterIdle | None:
    """extra * (1 - exp(-gap / tau)) fitted to the mean latency over the warm mean at each gap class,
    the longest gap's class deciding the extra; None where that extra is under three standard errors
    of the difference (noise) or there are too few rounds to tell."""
    if warm_ms.size < 2:
        return None
    longest = after_ms[-1]
    extra = float(longest.mean() - warm_ms.mean())
    noise = math.sqrt(float(warm_ms.var(ddof=1)) / warm_ms.size + float(longest.var(ddof=1)) / longest.size)
    if not extra > 3.0 * noise:
        return None
    gap = np.array([g.mean() for g in gaps_ms])
    rise = np.array([a.mean() for a in after_ms]) - warm_ms.mean()
    errors = [float(np.sum((rise - extra * (1.0 - np.exp(-gap / tau))) ** 2)) for tau in TAU_GRID_MS]
    tau = float(TAU_GRID_MS[int(np.argmin(errors))])
    return AfterIdle(extra_ms=round(extra, 4), time_constant_ms=round(tau, 4), rounds=int(warm_ms.size))


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
        after_idle = measure_after_idle(adapter, model, example_inputs(info, sizes[0]), settings.idle_rounds)
        interference = _interference(adapter, model, example_inputs(info, sizes[0]), points[0], settings, server_cpu)
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
    return _profile(model, hardware, points, settings.drop_flat, after_idle, interference)


def _interference(
    adapter: Adapter,
    model: str,
    inputs: object,
    smallest: BatchPoint,
    settings: ProfileSettings,
    server_cpu: CpuClock | None,
) -> float | None:
    """The model's interference at its smallest batch size, where the server shares this machine's
    cores (its CPU clock is read) and its calls' CPU share is known."""
    cpu_ms = smallest.latency_ms.server_cpu_ms
    if server_cpu is None or cpu_ms is None:
        return None
    share = min(cpu_ms / smallest.latency_ms.mean, 1.0)
    return measure_interference(adapter, model, inputs, share, available_cores(), settings.interference_rounds)


def _profile(
    model: str,
    hardware: str,
    points: list[BatchPoint],
    drop_flat: bool,
    after_idle: AfterIdle | None = None,
    interference: float | None = None,
) -> ModelProfile:
    kept = drop_flat_points(points) if drop_flat else tuple(points)
    return ModelProfile(
        model=model,
        profiles={hardware: kept},
        after_idle={hardware: after_idle} if after_idle is not None else {},
        interference={hardware: interference} if interference is not None else {},
    )


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
