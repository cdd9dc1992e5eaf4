"""A model's interference measured offline: its calls timed alone and beside a busy neighbour per core.

The sharing rule of `planner/shared_cores.py` slows a call with CPU share u, while the calls and
processes under way demand D cores of C, by 1 + u * (max(max(1, D / C), 1 + g * (D - u)) - 1), g
being the model's interference. `inferline calibrate` fits g to a live run's crowded calls; without
it an estimate from offline profiles took g = 0 and fell 15-26% under the measured P99 of the
cascade on the 2-core bench VM, where g = 0.35 brought it within -5% to +10%.

Here the profiler times calls back to back, alone and with one neighbour process per core working
through arrays a few MB large (as a model's inference does, unlike a spin loop: spinning neighbours
left the classifiers' calls as fast or faster), interleaved in rounds so that a drift of the
machine's speed hits both alike. With C neighbours D = u + C, and the slowdown s gives
g = (1 + (s - 1) / u - 1) / C where that exceeds the rule's crowd (u + C) / C, else 0. On the bench
VM this gave 0.31, 0.37 and 0.61 for the cascade's three models where live runs fitted 0.32-0.36,
0.38-0.49 and 0.44-0.55.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Protocol

import numpy as np

from inferline.adapters.base import Adapter

MIN_SHARE = 0.1
"""Below this CPU share a call mostly waits (sleeps, I/O): what cores it shares hardly matters, and
the slowdown's excess over noise, divided by the share, would say nothing."""
MAX_INTERFERENCE = 2.0
"""The top of the range `inferline calibrate` fits over."""
CALLS_PER_ROUND = 8
SETTLE_S = 0.005
"""How long the neighbours run before the timed calls beside them start."""
NEIGHBOUR_CODE = (
    "import numpy as np\na = np.ones(1 << 20)\nb = np.empty_like(a)\nwhile True:\n    np.multiply(a, 1.0001, out=b)\n"
)
"""One core's worth of memory-touching work: 8 MB arrays multiplied over and over."""


class NeighbourSwitch(Protocol):
    def running(self) -> contextlib.AbstractContextManager[None]: ...

    def close(self) -> None: ...


class Neighbours:
    """`count` neighbour processes, paused (SIGSTOP) except inside `running()`; `close` kills them."""

    def __init__(self, count: int) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []
        try:
            for _ in range(count):
                proc = subprocess.Popen([sys.executable, "-c", NEIGHBOUR_CODE], stdin=subprocess.DEVNULL)
                self._procs.append(proc)
                os.kill(proc.pid, signal.SIGSTOP)
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        for p in self._procs:
            os.kill(p.pid, signal.SIGCONT)
        try:
            yield
        finally:
            for p in self._procs:
                if p.poll() is None:
                    os.kill(p.pid, signal.SIGSTOP)

    def close(self) -> None:
        for p in self._procs:
            if p.poll() is None:
                p.kill()  # SIGKILL ends a stopped process too
            p.wait()
        self._procs.clear()


def interference_from_slowdown(share: float, cores: float, slowdown: float) -> float:
    """The g under which the sharing rule slows a call of CPU share `share` by `slowdown` beside one
    busy neighbour per core (module doc): 0 where the rule's crowd alone explains it."""
    if not 0.0 < share <= 1.0 or not cores > 0:
        raise ValueError(f"need a share in (0, 1] and cores > 0, got {share} and {cores}")
    needed = 1.0 + (slowdown - 1.0) / share  # the crowd per core the call ran in
    if needed <= (share + cores) / cores * (1.0 + 1e-9):  # up to rounding, the crowd's own slowdown
        return 0.0
    return min((needed - 1.0) / cores, MAX_INTERFERENCE)


def measure_interference(
    adapter: Adapter,
    model: str,
    inputs: object,
    share: float,
    cores: int,
    rounds: int,
    neighbours: Callable[[int], NeighbourSwitch] = Neighbours,
) -> float | None:
    """The model's interference on this machine (module doc), from `rounds` rounds of calls alone
    and beside `cores` neighbours; None where the calls' CPU share is too small to tell or no
    rounds are asked for."""
    if rounds < 1 or share < MIN_SHARE:
        return None
    switch = neighbours(cores)
    try:
        alone: list[float] = []
        beside: list[float] = []
        for _ in range(rounds):
            alone += _timed_calls(adapter, model, inputs)
            with switch.running():
                time.sleep(SETTLE_S)
                beside += _timed_calls(adapter, model, inputs)
    finally:
        switch.close()
    slowdown = float(np.mean(beside) / np.mean(alone))
    return round(interference_from_slowdown(min(share, 1.0), float(cores), slowdown), 4)


def _timed_calls(adapter: Adapter, model: str, inputs: object) -> list[float]:
    for _ in range(2):  # the first calls after a switch find the server's threads asleep or cold
        adapter.infer(model, inputs)  # type: ignore[arg-type]
    out = []
    for _ in range(CALLS_PER_ROUND):
        started = time.perf_counter()
        adapter.infer(model, inputs)  # type: ignore[arg-type]
        out.append(time.perf_counter() - started)
    return out
