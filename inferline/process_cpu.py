"""CPU time of a process group, read from Linux's /proc: what a local model server spent computing.

A local server (the embedded Triton) runs in its own process group with its backends' processes
(the Python backend runs each model instance in a stub process), so the group's CPU time is the
server's. Per-thread scheduler statistics count nanoseconds; /proc/PID/stat counts 10 ms ticks,
too coarse for a batch of a millisecond.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


def available_cores() -> int:
    """The cores this process may run on (Linux), else the machine's: what local replicas share."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def group_cpu_s(pgid: int) -> float | None:
    """Seconds of CPU that the live processes of group `pgid` have used; None where /proc cannot tell."""
    if not (PROC / "self" / "schedstat").exists():
        return None
    return sum(_group_thread_times(pgid).values()) / 1e9


def _group_thread_times(pgid: int) -> dict[tuple[str, str], int]:
    """(pid, tid) -> nanoseconds on a CPU, for each live thread of the group's processes."""
    out: dict[tuple[str, str], int] = {}
    for entry in os.scandir(PROC):
        if entry.name.isdigit() and _group_of(entry.name) == pgid:
            out.update(_thread_times(entry.name))
    return out


def process_cpu_s(pid: int) -> float | None:
    """Seconds of CPU that process `pid` (all its threads) has used; None where /proc cannot tell."""
    if not (PROC / "self" / "schedstat").exists() or not (PROC / str(pid)).exists():
        return None
    return _threads_ns(str(pid)) / 1e9


def _threads_ns(pid: str) -> int:
    return sum(_thread_times(pid).values())


def _thread_times(pid: str) -> dict[tuple[str, str], int]:
    """(pid, tid) -> nanoseconds on a CPU, for each live thread of the process."""
    out: dict[tuple[str, str], int] = {}
    try:
        tasks = list(os.scandir(PROC / pid / "task"))
    except OSError:
        return out  # the process ended meanwhile
    for task in tasks:
        try:
            out[(pid, task.name)] = int((PROC / pid / "task" / task.name / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # this thread ended meanwhile; the others still count
    return out


def group_clock(pgid: int | None) -> Callable[[], float | None] | None:
    """A CPU clock for the profiler: the group's CPU seconds so far; None for a server not started here.

    It never runs backwards: a thread or process that ended keeps the CPU it was last seen with.
    (Triton unloads a reconfigured model's old stub process a second or so later, in the middle of
    the profiler's first batch sizes; counted only while alive, its CPU vanished from the sum and a
    batch size measured 0 ms of server CPU.)"""
    if pgid is None:
        return None
    seen: dict[tuple[str, str], int] = {}

    def clock() -> float | None:
        if not (PROC / "self" / "schedstat").exists():
            return None
        seen.update(_group_thread_times(pgid))
        return sum(seen.values()) / 1e9

    return clock


def _group_of(pid: str) -> int | None:
    try:
        stat = (PROC / pid / "stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: fields start after the last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    return int(fields[2]) if len(fields) > 2 else None


@dataclass(frozen=True)
class MachineCpu:
    """CPU seconds of this machine since boot, summed over its cores (Linux /proc/stat)."""

    steal_s: float
    """Time its hypervisor gave to others while this guest wanted to run ("steal")."""
    all_s: float
    """All of its time: busy, idle and stolen alike (about the seconds since boot times the cores)."""
    idle_s: float = 0.0
    """Time in which it had nothing to run (idle, or waiting for I/O)."""

    @property
    def busy_s(self) -> float:
        """Time it ran something: every process's and the kernel's."""
        return self.all_s - self.idle_s - self.steal_s

    def stolen_since(self, earlier: MachineCpu) -> float | None:
        """The share of the machine's CPU time its hypervisor gave to others since `earlier`: on a
        virtual machine, time in which nothing here ran, whatever it asked for (None: no time passed)."""
        elapsed = self.all_s - earlier.all_s
        return max(0.0, self.steal_s - earlier.steal_s) / elapsed if elapsed > 0 else None


def machine_cpu() -> MachineCpu | None:
    """This machine's CPU time so far; None where /proc/stat cannot tell (not Linux, or no steal count)."""
    try:
        return cpu_from_stat((PROC / "stat").read_text(), os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError):
        return None


def cpu_from_stat(text: str, ticks_per_s: int) -> MachineCpu | None:
    """The `cpu` line of /proc/stat's text, in clock ticks: user, nice, system, idle, iowait, irq,
    softirq, steal (then guest time, already counted in user and nice)."""
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            if len(fields) <= 8:
                return None  # a kernel too old to count steal
            ticks = [int(v) for v in fields[1:9]]
            return MachineCpu(
                steal_s=ticks[7] / ticks_per_s,
                all_s=sum(ticks) / ticks_per_s,
                idle_s=(ticks[3] + ticks[4]) / ticks_per_s,
            )
    return None
