"""The profiler's offline interference: calls timed alone and beside a busy neighbour per core, and the
sharing rule's g read back from their slowdown."""

from __future__ import annotations

import contextlib
import itertools
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import inferline.agent.interference_probe as probe
from inferline.agent.interference_probe import (
    MAX_INTERFERENCE,
    MIN_SHARE,
    Neighbours,
    interference_from_slowdown,
    measure_interference,
)
from inferline.planner.shared_cores import call_slowdown


@pytest.mark.parametrize(
    ("share", "cores", "g"), list(itertools.product((0.3, 0.7, 1.0), (1.0, 2.0, 4.0), (0.05, 0.4, 1.5)))
)
def test_the_fit_reads_back_the_g_the_sharing_rule_slowed_the_calls_with(share: float, cores: float, g: float) -> None:
    slowdown = call_slowdown(share, g, share + cores, cores)  # one busy neighbour per core beside the call
    fitted = interference_from_slowdown(share, cores, slowdown)
    if 1.0 + g * cores > (share + cores) / cores:  # interference, not the crowd, set the slowdown
        assert fitted == pytest.approx(g)
    else:
        assert fitted == 0.0


def test_a_slowdown_the_crowd_explains_is_no_interference_and_the_fit_stays_in_range() -> None:
    assert interference_from_slowdown(1.0, 1.0, 1.0) == 0.0  # not even the crowd's slowdown: none
    assert interference_from_slowdown(1.0, 1.0, 0.9) == 0.0
    assert interference_from_slowdown(0.5, 2.0, 50.0) == MAX_INTERFERENCE
    with pytest.raises(ValueError, match="share"):
        interference_from_slowdown(0.0, 2.0, 1.5)
    with pytest.raises(ValueError, match="cores"):
        interference_from_slowdown(0.5, 0.0, 1.5)


class _Machine:
    """A fake clock and CPU neighbours: a call takes `alone_s`, or `beside_s` while the neighbours run."""

    def __init__(self, alone_s: float, beside_s: float) -> None:
        self.now, self.alone_s, self.beside_s = 0.0, alone_s, beside_s
        self.busy = False
        self.started: list[int] = []
        self.closed = 0
        self.calls = {"alone": 0, "beside": 0}

    # -- the fake time module the probe reads
    def perf_counter(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    # -- the adapter
    def infer(self, model: str, inputs: Any) -> None:
        self.now += self.beside_s if self.busy else self.alone_s
        self.calls["beside" if self.busy else "alone"] += 1

    # -- the neighbours
    def neighbours(self, count: int) -> _Machine:
        self.started.append(count)
        return self

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        self.busy = True
        try:
            yield
        finally:
            self.busy = False

    def close(self) -> None:
        self.closed += 1


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch) -> _Machine:
    fake = _Machine(alone_s=0.002, beside_s=0.003)
    monkeypatch.setattr(probe, "time", types.SimpleNamespace(perf_counter=fake.perf_counter, sleep=fake.sleep))
    return fake


def test_measuring_reads_g_from_calls_alone_and_beside_one_neighbour_per_core(machine: _Machine) -> None:
    g = measure_interference(machine, "m", None, share=0.5, cores=2, rounds=4, neighbours=machine.neighbours)  # type: ignore[arg-type]
    # x1.5 with share 0.5: the calls ran in a crowd of 2 per core, where the rule alone has (0.5 + 2) / 2.
    assert g == pytest.approx(0.5)
    assert machine.started == [2] and machine.closed == 1 and not machine.busy
    per_round = probe.CALLS_PER_ROUND + 2  # two untimed calls after each switch
    assert machine.calls == {"alone": 4 * per_round, "beside": 4 * per_round}


def test_no_rounds_or_a_call_that_mostly_waits_starts_no_neighbour(machine: _Machine) -> None:
    assert measure_interference(machine, "m", None, 0.9, 2, rounds=0, neighbours=machine.neighbours) is None  # type: ignore[arg-type]
    small = MIN_SHARE / 2
    assert measure_interference(machine, "m", None, small, 2, rounds=3, neighbours=machine.neighbours) is None  # type: ignore[arg-type]
    assert machine.started == [] and machine.calls == {"alone": 0, "beside": 0}


def test_the_neighbours_stop_when_a_call_fails(machine: _Machine) -> None:
    def failing(model: str, inputs: Any) -> None:
        if machine.busy:
            raise RuntimeError("server gone")
        machine.now += machine.alone_s

    machine.infer = failing  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="server gone"):
        measure_interference(machine, "m", None, 0.9, 2, rounds=3, neighbours=machine.neighbours)  # type: ignore[arg-type]
    assert machine.closed == 1 and not machine.busy


def _eventually(condition: Callable[[], bool], within_s: float = 5.0) -> bool:
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _state(pid: int) -> str:
    """A process's state letter from /proc (T: stopped; R or S: running or sleeping)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from Linux's /proc")
def test_real_neighbours_are_paused_run_only_when_asked_and_are_gone_after_close() -> None:
    neighbours = Neighbours(2)
    pids = neighbours.pids
    try:  # a signal takes effect when the kernel next handles the process: polled, not read at once
        assert len(pids) == 2 and _eventually(lambda: all(_state(p) == "T" for p in pids))
        with neighbours.running():
            assert _eventually(lambda: all(_state(p) in "RSD" for p in pids))
        assert _eventually(lambda: all(_state(p) == "T" for p in pids))
    finally:
        neighbours.close()
    assert neighbours.pids == []
    for pid in pids:  # reaped: no such process any more
        assert not Path(f"/proc/{pid}").exists()
