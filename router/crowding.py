"""How crowded each replica call was: the mean number of calls under way in the pipeline over its length.

On a local deployment the replicas share a machine's few cores, and a call takes longer the more
calls compute beside it. The sharing rule the prediction uses (`planner/shared_cores.py`) says by
how much for a given number of cores; calibration fits the cores that make the rule match what the
router measured (`calibration.fit_cores`). A call's count at its start alone blurs that: calls
start and end during it. So each call is binned by the time-weighted mean of the calls under way
over its whole length (itself included), from a running integral of the count, two additions per
call start and end.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass

from prometheus_client.metrics_core import CounterMetricFamily
from prometheus_client.registry import Collector

BIN_WIDTH = 0.5
"""Calls are binned by their mean crowd to the nearest half call."""
MAX_CROWD = 8.0
"""The last bin holds every call whose mean crowd was this or more."""
_BINS = round((MAX_CROWD - 1.0) / BIN_WIDTH) + 1


@dataclass(frozen=True)
class CallToken:
    """What a call's start left for its end: when, the count then, and the integral so far."""

    started: float
    under_way: int
    """Calls under way as it started, itself included."""
    area: float


def crowd_bin(mean_crowd: float) -> float:
    """The bin a call's mean crowd falls in (its label's value)."""
    return 1.0 + _bin_index(mean_crowd) * BIN_WIDTH


def _bin_index(mean_crowd: float) -> int:
    return min(_BINS - 1, max(0, round((mean_crowd - 1.0) / BIN_WIDTH)))


class CallCrowding:
    """Per stage, how many calls and how many seconds of calls ran at each mean crowd (thread-safe:
    replicas on threads and on the event loop both start and end calls)."""

    def __init__(self, stages: Sequence[str], clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._under_way = 0
        self._area = 0.0
        """The integral of calls under way over time since the router started, in call-seconds."""
        self._since = clock()
        self._calls = {s: [0] * _BINS for s in stages}
        self._seconds = {s: [0.0] * _BINS for s in stages}
        self.created = time.time()

    def started(self) -> CallToken:
        with self._lock:
            now = self._clock()
            self._area += self._under_way * (now - self._since)
            self._since = now
            self._under_way += 1
            return CallToken(now, self._under_way, self._area)

    def ended(self, stage: str, token: CallToken) -> None:
        with self._lock:
            now = self._clock()
            self._area += self._under_way * (now - self._since)
            self._since = now
            self._under_way -= 1
            length = now - token.started
            mean = (self._area - token.area) / length if length > 0 else float(token.under_way)
            index = _bin_index(mean)
            self._calls[stage][index] += 1
            self._seconds[stage][index] += length

    @property
    def under_way(self) -> int:
        """Calls under way now."""
        return self._under_way

    def counts(self, stage: str) -> dict[float, tuple[int, float]]:
        """Mean crowd bin -> (calls, seconds) for the stage's calls so far (bins with calls only)."""
        with self._lock:
            calls, seconds = list(self._calls[stage]), list(self._seconds[stage])
        return {1.0 + i * BIN_WIDTH: (n, s) for i, (n, s) in enumerate(zip(calls, seconds, strict=True)) if n}


class CrowdingCollector(Collector):
    """Exports `CallCrowding` at each scrape, so that the calls' hot path only adds to lists."""

    def __init__(self, crowding: CallCrowding, stages: Sequence[str]) -> None:
        self._crowding, self._stages = crowding, tuple(stages)

    def collect(self) -> Generator[CounterMetricFamily, None, None]:
        help_tail = (
            "by the mean number of replica calls under way in the pipeline over the call's length, itself "
            f"included, to the nearest {BIN_WIDTH:g} ({MAX_CROWD:g}: that or more): where it exceeds the "
            "cores the replicas share, they slow each other down"
        )
        calls = CounterMetricFamily(
            "inferline_router_crowded_calls", f"Replica calls {help_tail}", labels=["stage", "under_way"]
        )
        seconds = CounterMetricFamily(
            "inferline_router_crowded_call_seconds",
            f"Time of replica calls {help_tail}",
            labels=["stage", "under_way"],
        )
        created = self._crowding.created
        for stage in self._stages:
            for crowd, (n, s) in self._crowding.counts(stage).items():
                calls.add_metric([stage, f"{crowd:g}"], n, created=created)
                seconds.add_metric([stage, f"{crowd:g}"], s, created=created)
        yield calls
        yield seconds
