"""Open-loop replay of a trace against a pipeline: every query leaves at its trace time.

A closed-loop client waits for answers before sending more, so when the pipeline slows down it
also sends less and the queueing delay never shows up in the numbers ("coordinated omission").
Here one scheduler launches each query as its own task at `start + arrivals[i] - arrivals[0]` on
the event loop's clock and never waits for earlier queries; a query's latency runs from its
SCHEDULED send time, so a late start (the loop itself lagging) counts against the pipeline, and
the lag is recorded separately so a report can say when the generator fell behind.

Percentiles are nearest-rank, exactly as the estimator's (`inferline.planner.estimator.p99`), so
the measured P99 and the estimator's prediction for the same trace are the same statistic.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from inferline.planner.estimator import p99

OK = "ok"
ERROR_KINDS = ("overloaded", "failed", "timeout")
"""Error outcomes always present in `ReplayResult.errors` (a classifier may add more kinds)."""
PROGRESS_EVERY_S = 0.5
LAG_WARN_MS = 10.0
"""Send lag (P99) above which the generator itself fell behind and the report says so."""

Send = Callable[[int], Awaitable[None]]
Classify = Callable[[BaseException], str]


def default_classify(exc: BaseException) -> str:
    """`asyncio.timeout`'s TimeoutError (builtin since 3.11) is "timeout"; anything else "failed"."""
    return "timeout" if isinstance(exc, TimeoutError) else "failed"


@dataclass(frozen=True)
class ReplayProgress:
    sent: int
    answered: int
    errors: int
    elapsed_s: float
    total: int


@dataclass(frozen=True, eq=False)
class ReplayResult:
    """What one replay measured. Build it with `ReplayResult.of`; the summary fields follow from the arrays.

    Times are seconds from the run's start (the first query's scheduled send). `p99_ms` is the
    nearest-rank P99 over ALL sent queries where an error counts as infinitely late, so it is inf
    when more than 1% of queries errored; `p99_answered_ms` is the same over answered queries only.
    """

    scheduled_s: NDArray[np.float64]
    """When each query was due to be sent."""
    started_s: NDArray[np.float64]
    """When each query's task actually started; minus `scheduled_s`, the send lag (the generator's own delay)."""
    finished_s: NDArray[np.float64]
    """When each query was answered or gave up."""
    latencies_ms: NDArray[np.float64]
    """From scheduled send to answer; NaN for errors."""
    outcomes: tuple[str, ...]
    """"ok" or the error kind, per query."""
    slo_ms: float | None
    duration_s: float
    """From the run's start to the last query's answer or error."""
    sent: int = field(init=False)
    answered: int = field(init=False)
    errors: dict[str, int] = field(init=False)
    p99_ms: float = field(init=False)
    p99_answered_ms: float = field(init=False)
    slo_miss_rate: float | None = field(init=False)
    """Fraction of sent queries that errored or exceeded the SLO; None without an SLO."""
    throughput_qps: float = field(init=False)
    send_lag_p99_ms: float = field(init=False)
    send_lag_max_ms: float = field(init=False)

    def __post_init__(self) -> None:
        n = self.scheduled_s.size
        assert self.started_s.size == self.finished_s.size == self.latencies_ms.size == len(self.outcomes) == n
        counts = Counter(self.outcomes)
        errors = {kind: counts.get(kind, 0) for kind in ERROR_KINDS}
        errors |= {kind: c for kind, c in counts.items() if kind != OK}
        lag_ms = (self.started_s - self.scheduled_s) * 1000.0
        derived: dict[str, Any] = {
            "sent": n,
            "answered": counts.get(OK, 0),
            "errors": errors,
            "p99_ms": nearest_rank_p99(misses_as_inf(self.latencies_ms)),
            "p99_answered_ms": nearest_rank_p99(self.latencies_ms[~np.isnan(self.latencies_ms)]),
            "slo_miss_rate": miss_rate(self.latencies_ms, self.slo_ms),
            "throughput_qps": counts.get(OK, 0) / self.duration_s if self.duration_s > 0 else 0.0,
            "send_lag_p99_ms": nearest_rank_p99(lag_ms),
            "send_lag_max_ms": float(lag_ms.max()) if n else math.nan,
        }
        for name, value in derived.items():
            object.__setattr__(self, name, value)  # frozen: derived once, here
        assert self.sent == self.answered + sum(self.errors.values()), "every sent query is answered or an error"
        assert np.isnan(self.latencies_ms).sum() == self.sent - self.answered, "NaN latency exactly for errors"

    @classmethod
    def of(
        cls,
        scheduled_s: NDArray[np.float64],
        started_s: NDArray[np.float64],
        finished_s: NDArray[np.float64],
        outcomes: tuple[str, ...],
        slo_ms: float | None,
    ) -> ReplayResult:
        ok = np.array([o == OK for o in outcomes], dtype=np.bool_)
        latencies_ms = np.where(ok, (finished_s - scheduled_s) * 1000.0, math.nan)
        duration_s = float(finished_s.max()) if finished_s.size else 0.0
        return cls(scheduled_s, started_s, finished_s, latencies_ms, outcomes, slo_ms, duration_s)


def misses_as_inf(latencies_ms: NDArray[np.float64]) -> NDArray[np.float64]:
    """Errors (NaN) as infinitely late: they then count as SLO misses and sort last."""
    return np.where(np.isnan(latencies_ms), math.inf, latencies_ms)


def nearest_rank_p99(values: NDArray[np.float64]) -> float:
    """The estimator's nearest-rank P99; NaN for no values (the estimator's p99 needs at least one)."""
    return p99(values) if values.size else math.nan


def miss_rate(latencies_ms: NDArray[np.float64], slo_ms: float | None) -> float | None:
    if slo_ms is None:
        return None
    if latencies_ms.size == 0:
        return 0.0
    return float(np.count_nonzero(misses_as_inf(latencies_ms) > slo_ms)) / latencies_ms.size


class _Run:
    """The mutable bookkeeping of one replay; each query's task writes only its own slots."""

    def __init__(self, n: int, started_at: float) -> None:
        self.t0 = started_at
        self.started_s = np.full(n, math.nan)
        self.finished_s = np.full(n, math.nan)
        self.outcomes: list[str] = [""] * n
        self.launched = 0
        self.answered = 0
        self.errors = 0

    def progress(self, now: float) -> ReplayProgress:
        return ReplayProgress(self.launched, self.answered, self.errors, now - self.t0, len(self.outcomes))


async def _one(
    run: _Run, i: int, send: Send, timeout_s: float, classify: Classify, loop: asyncio.AbstractEventLoop
) -> None:
    run.started_s[i] = loop.time() - run.t0
    try:
        async with asyncio.timeout(timeout_s):  # not wait_for: that runs the query in a task of its own
            await send(i)
    except Exception as exc:  # not BaseException: a cancelled replay must stay cancelled
        kind = classify(exc)
        run.outcomes[i] = kind if kind != OK else "failed"  # a raised query is never "ok"
        run.errors += 1
    else:
        run.outcomes[i] = OK
        run.answered += 1
    run.finished_s[i] = loop.time() - run.t0


async def _report(run: _Run, on_progress: Callable[[ReplayProgress], None], loop: asyncio.AbstractEventLoop) -> None:
    while True:
        await asyncio.sleep(PROGRESS_EVERY_S)
        on_progress(run.progress(loop.time()))


def _check_arrivals(arrivals_s: NDArray[np.float64]) -> NDArray[np.float64]:
    a = np.asarray(arrivals_s, dtype=np.float64)
    if a.ndim != 1 or not np.all(np.isfinite(a)):
        raise ValueError("arrivals must be a 1-D array of finite times in seconds")
    if a.size > 1 and np.any(np.diff(a) < 0):
        raise ValueError("arrivals must be in ascending order")
    return a - a[0] if a.size else a


async def replay(
    send: Send,
    arrivals_s: NDArray[np.float64],
    slo_ms: float | None,
    timeout_s: float = 30.0,
    on_progress: Callable[[ReplayProgress], None] | None = None,
    classify: Classify = default_classify,
) -> ReplayResult:
    """Send query i (by awaiting `send(i)`, which raises on failure) at `arrivals_s[i] - arrivals_s[0]`
    after the start, whether or not earlier queries have answered; each gets `timeout_s` from its
    actual start, while its latency counts from its scheduled time.

    `classify` names an exception's error kind ("overloaded", "failed", "timeout", or any other).
    """
    offsets = _check_arrivals(arrivals_s)
    loop = asyncio.get_running_loop()
    run = _Run(offsets.size, loop.time())
    tasks: list[asyncio.Task[None]] = []  # strong references: the loop keeps only weak ones
    reporter = asyncio.create_task(_report(run, on_progress, loop)) if on_progress is not None else None
    try:
        for i, offset in enumerate(offsets):
            delay = run.t0 + float(offset) - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_one(run, i, send, timeout_s, classify, loop)))
            run.launched += 1
        await asyncio.gather(*tasks)
    finally:
        # After a cancellation (or a classifier that raised): stop the queries still in flight.
        leftover = [t for t in [*tasks, *([reporter] if reporter is not None else [])] if not t.done()]
        for t in leftover:
            t.cancel()
        await asyncio.gather(*leftover, return_exceptions=True)
    if on_progress is not None:
        on_progress(run.progress(loop.time()))
    return ReplayResult.of(offsets, run.started_s, run.finished_s, tuple(run.outcomes), slo_ms)


def _rounded(value: float | None, digits: int = 3) -> float | None:
    """JSON has no inf/NaN: a P99 that is inf (over 1% errors) or undefined (no queries) becomes null."""
    return round(value, digits) if value is not None and math.isfinite(value) else None


def run_results(
    result: ReplayResult,
    *,
    slo_ms: float | None,
    estimated_p99_ms: float | None,
    cost_per_hour: float | None,
    decisions: list[dict[str, Any]],
) -> dict[str, Any]:
    """The design's run-results JSON with the replay keys (DESIGN.md, "Run results").

    `slo_ms` None falls back to the SLO the replay ran with. `p99_ms` is null when more than 1%
    of the queries errored (errors count as infinitely late, so the nearest-rank P99 is inf).
    """
    slo = slo_ms if slo_ms is not None else result.slo_ms
    rate = miss_rate(result.latencies_ms, slo)
    errors = dict(result.errors)
    out: dict[str, Any] = {
        "queries": result.sent,
        "p99_ms": _rounded(result.p99_ms),
        "slo_ms": slo,
        "slo_miss_rate": round(rate, 6) if rate is not None else None,
        "cost": round(cost_per_hour * result.duration_s / 3600.0, 6) if cost_per_hour is not None else None,
        "cost_per_hour": round(cost_per_hour, 6) if cost_per_hour is not None else None,
        "decisions": decisions,
        "sent": result.sent,
        "answered": result.answered,
        "errors": sum(errors.values()),
        "errors_by_kind": errors,
        "throughput_qps": round(result.throughput_qps, 3),
        "estimated_p99_ms": _rounded(estimated_p99_ms),
        "p99_answered_ms": _rounded(result.p99_answered_ms),
        "duration_s": round(result.duration_s, 3),
        "send_lag_p99_ms": _rounded(result.send_lag_p99_ms),
        "send_lag_max_ms": _rounded(result.send_lag_max_ms),
    }
    return out | {"warnings": _warnings(result)}


def _warnings(result: ReplayResult) -> list[str]:
    if result.sent and result.send_lag_p99_ms > LAG_WARN_MS:
        return [
            f"the load generator fell behind: P99 send lag {result.send_lag_p99_ms:.1f} ms "
            f"(max {result.send_lag_max_ms:.1f} ms); measured latencies include it"
        ]
    return []


def per_second(
    result: ReplayResult,
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.float64]]:
    """Per second of the run: arrivals (by scheduled time), answers (by answer time) and the
    nearest-rank P99 of the queries scheduled in that second (errors as inf; NaN for none)."""
    ok = np.array([o == OK for o in result.outcomes], dtype=np.bool_)
    sched = np.floor(result.scheduled_s).astype(np.int64)
    done = np.floor(result.finished_s[ok]).astype(np.int64)
    seconds = int(max(sched.max(initial=-1), done.max(initial=-1))) + 1
    arrivals = np.bincount(sched, minlength=seconds)
    answered = np.bincount(done, minlength=seconds)
    lat = misses_as_inf(result.latencies_ms)
    order = np.argsort(sched, kind="stable")
    bounds = np.searchsorted(sched[order], np.arange(seconds + 1))
    p99s = np.array([nearest_rank_p99(lat[order[a:b]]) for a, b in itertools.pairwise(bounds)])
    return arrivals, answered, np.asarray(p99s, dtype=np.float64)
