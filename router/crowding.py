"""How crowded each replica call was: the seconds it spent with each number of calls under way.

On a local deployment the replicas share a machine's few cores, and a call takes longer the more
calls compute beside it. The sharing rule the prediction uses (`planner/shared_cores.py`) says by
how much for a given number of cores and a stage's interference; calibration fits the interference
that makes the rule match what the router measured (`inferline/interference.py`). The rule's
slowdown is not linear in the count, so a call's count at its start, or its mean count, would not
tell the rule's slowdown over it: each call keeps
the seconds it spent with 1, 2, ... calls under way (itself included), from a running total of the
seconds at each count read at its start and its end. Calls are grouped by their mean count (to the
nearest half call), so that groups crowded more and less can be set against each other, and apart
by whether the replica sat idle before them: such a call also takes what the idle gap added (a
profile's after_idle term), and those fall mostly on calls alone, the back-to-back ones in bursts.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client.metrics_core import CounterMetricFamily
from prometheus_client.registry import Collector

BIN_WIDTH = 0.5
"""Calls are grouped by their mean count of calls under way, to the nearest half call (halves up)."""
MAX_CROWD = 16
"""The last group holds every call whose mean count was this or more, and the last count every
moment with this many calls under way or more."""
_BINS = round((MAX_CROWD - 1) / BIN_WIDTH) + 1


@dataclass(frozen=True)
class CallToken:
    """What a call's start left for its end: the count then, and the running totals."""

    under_way: int
    """Calls under way as it started, itself included."""
    after_idle: bool
    """Whether its replica sat idle before it (not back to back)."""
    seconds_at: tuple[float, ...]
    """Seconds so far with each count of calls under way (index: the count, the last: that or more)."""


@dataclass(frozen=True)
class CrowdedGroup:
    """The calls of one stage whose mean count of calls under way fell in one group."""

    calls: int
    seconds_at: Mapping[int, float]
    """Count of calls under way -> seconds these calls spent with it (counts with none left out)."""


def crowd_bin(mean_crowd: float) -> float:
    """The group a call's mean count of calls under way falls in (its label's value)."""
    return _bin_value(_bin_index(mean_crowd))


def _bin_value(index: int) -> float:
    return 1.0 + index * BIN_WIDTH


def _bin_index(mean_crowd: float) -> int:
    return min(_BINS - 1, max(0, math.floor((mean_crowd - 1.0) / BIN_WIDTH + 0.5)))


class CallCrowding:
    """Per stage and group, how many calls answered and the seconds they spent at each count of
    calls under way (thread-safe: replicas on threads and on the event loop both start and end calls)."""

    def __init__(self, stages: Sequence[str], clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._under_way = 0
        self._highest = 0
        """The most calls ever under way (up to the last count): no call spent time above it."""
        self._seconds_at = [0.0] * (MAX_CROWD + 1)
        self._since = clock()
        # [after idle][group]: calls, and seconds at each count
        self._calls = {s: [[0] * _BINS, [0] * _BINS] for s in stages}
        self._seconds = {s: [[[0.0] * (MAX_CROWD + 1) for _ in range(_BINS)] for _ in range(2)] for s in stages}
        self.created = time.time()

    @property
    def under_way(self) -> int:
        """Calls under way now."""
        return self._under_way

    def _advance(self, now: float | None) -> None:
        """Called under the lock: the time since the last change goes to the count it had.

        `now`: the caller's own reading of the clock (None: read here). A call's seconds then are
        exactly the call's length as its replica timed it, whatever ran between the two readings;
        another thread may have advanced past it meanwhile, so never before the last change."""
        now = max(self._since, self._clock() if now is None else now)
        self._seconds_at[min(self._under_way, MAX_CROWD)] += now - self._since
        self._since = now

    def started(self, after_idle: bool = True, now: float | None = None) -> CallToken:
        with self._lock:
            self._advance(now)
            self._under_way += 1
            self._highest = max(self._highest, min(self._under_way, MAX_CROWD))
            return CallToken(self._under_way, after_idle, tuple(self._seconds_at))

    def ended(self, stage: str, token: CallToken, answered: bool = True, now: float | None = None) -> None:
        """The call ended; only an answered call is counted (a failed one's time is no service time)."""
        with self._lock:
            self._advance(now)
            self._under_way -= 1
            if not answered:
                return
            # Only counts up to the most ever under way can hold time (a few on a small deployment).
            now_at, then_at = self._seconds_at, token.seconds_at
            spent = [now_at[n] - then_at[n] for n in range(self._highest + 1)]
            length = sum(spent)
            mean = sum(n * t for n, t in enumerate(spent)) / length if length > 0 else float(token.under_way)
            index, idle = _bin_index(mean), int(token.after_idle)
            self._calls[stage][idle][index] += 1
            row = self._seconds[stage][idle][index]
            for n, t in enumerate(spent):
                if t:
                    row[n] += t

    def counts(self, stage: str) -> dict[tuple[float, bool], CrowdedGroup]:
        """(group, after idle) -> its calls so far, for the stage (groups with calls only)."""
        with self._lock:
            calls = [list(row) for row in self._calls[stage]]
            seconds = [[list(row) for row in rows] for rows in self._seconds[stage]]
        return {
            (_bin_value(i), bool(idle)): CrowdedGroup(n, {k: t for k, t in enumerate(seconds[idle][i]) if t > 0})
            for idle in (0, 1)
            for i, n in enumerate(calls[idle])
            if n
        }


class CrowdingCollector(Collector):
    """Exports `CallCrowding` at each scrape, so that the calls' hot path only adds to lists."""

    def __init__(self, crowding: CallCrowding, stages: Sequence[str]) -> None:
        self._crowding, self._stages = crowding, tuple(stages)

    def collect(self) -> Generator[CounterMetricFamily, None, None]:
        grouped = (
            "grouped by the mean number of replica calls under way in the pipeline over each call, itself "
            f"included, to the nearest {BIN_WIDTH:g} ({MAX_CROWD}: that or more)"
        )
        grouped += ", and by whether the replica sat idle before the call"
        calls = CounterMetricFamily(
            "inferline_router_crowded_calls",
            f"Replica calls answered, {grouped}",
            labels=["stage", "mean_under_way", "after_idle"],
        )
        seconds = CounterMetricFamily(
            "inferline_router_crowded_call_seconds",
            f"Seconds those calls spent with each number of calls under way ({MAX_CROWD}: that or more), {grouped}: "
            "where it exceeds the cores the replicas share, they slow each other down",
            labels=["stage", "mean_under_way", "after_idle", "under_way"],
        )
        created = self._crowding.created
        for stage in self._stages:
            for (crowd, idle), group in self._crowding.counts(stage).items():
                labels = [stage, f"{crowd:g}", "true" if idle else "false"]
                calls.add_metric(labels, group.calls, created=created)
                for n, t in group.seconds_at.items():
                    seconds.add_metric([*labels, str(n)], t, created=created)
        yield calls
        yield seconds
