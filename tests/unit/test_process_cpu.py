"""CPU time of a process group from /proc: what the profiler records as a local server's CPU per batch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from inferline.process_cpu import MachineCpu, cpu_from_stat, group_clock, group_cpu_s, machine_cpu

BURN = """
import os, time
def burn(seconds):
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
done_r, done_w = os.pipe()
child = os.fork()
burn(0.4)
if child:
    os.read(done_r, 1)  # the child has burnt its share too
    print("burnt", flush=True)
else:
    os.write(done_w, b"x")
time.sleep(60)
"""


def test_group_cpu_counts_every_live_process_of_the_group() -> None:
    process = subprocess.Popen([sys.executable, "-c", BURN], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "burnt"
        used = group_cpu_s(process.pid)
        clock = group_clock(process.pid)
        assert clock is not None
        # Two processes burnt 0.4 s each (plus the interpreter's start): both counted, this one not.
        assert used is not None and 0.75 <= used <= 1.6
        again = clock()
        assert again is not None and used <= again < used + 0.1  # idle now: the clock stands still
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


EXITING = """
import os, sys, time
child = os.fork()
if child == 0:
    end = time.process_time() + 0.3
    while time.process_time() < end:
        pass
    print("burnt", flush=True)
    sys.stdin.readline()  # exits when told
    os._exit(0)
os.waitpid(child, 0)
print("reaped", flush=True)
time.sleep(60)
"""


def test_the_group_clock_keeps_the_cpu_of_a_process_that_ended() -> None:
    # A group whose second process burns 0.3 s and then exits (as Triton's old stub process does a
    # second or so after a reload), reaped by the group's leader.
    process = subprocess.Popen(
        [sys.executable, "-c", EXITING],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert process.stdout is not None and process.stdin is not None
        assert process.stdout.readline().strip() == "burnt"
        clock = group_clock(process.pid)
        assert clock is not None
        before = clock()
        process.stdin.write("\n")
        process.stdin.flush()
        assert process.stdout.readline().strip() == "reaped"
        after = clock()
        assert before is not None and after is not None and before >= 0.3
        assert after >= before  # forgetting the ended process would lose its 0.3 s
        assert (group_cpu_s(process.pid) or 0.0) < before - 0.2  # as counting only the living does
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_no_clock_for_a_server_not_started_here() -> None:
    assert group_clock(None) is None


def test_process_cpu_counts_this_process_threads() -> None:
    import time

    from inferline.process_cpu import process_cpu_s

    before = process_cpu_s(os.getpid())
    end = time.process_time() + 0.2
    while time.process_time() < end:
        pass
    after = process_cpu_s(os.getpid())
    assert before is not None and after is not None and 0.15 <= after - before <= 0.5
    assert process_cpu_s(2**22 + 7) is None  # above Linux's largest pid: no such process


def test_steal_is_read_from_the_cpu_line_of_proc_stat() -> None:
    text = "cpu  695975 0 156098 6152065 4222 0 14612 45431 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\nintr 1\n"
    read = cpu_from_stat(text, 100)
    assert read is not None and read.steal_s == 454.31
    assert read.all_s == (695975 + 156098 + 6152065 + 4222 + 14612 + 45431) / 100  # guest time not twice
    assert read.busy_s == pytest.approx((695975 + 156098 + 14612) / 100)  # not idle, waiting for I/O or stolen
    assert cpu_from_stat("cpu  1 2 3 4\n", 100) is None  # a kernel too old to count it
    assert cpu_from_stat("intr 1\n", 100) is None
    now = machine_cpu()  # this machine's (Linux: /proc/stat)
    assert now is not None and 0.0 <= now.steal_s < now.all_s


def test_stolen_share_is_steal_over_all_the_cpu_time_between_two_readings() -> None:
    earlier = MachineCpu(steal_s=10.0, all_s=100.0)
    assert MachineCpu(steal_s=12.0, all_s=140.0).stolen_since(earlier) == 0.05
    assert MachineCpu(steal_s=10.0, all_s=140.0).stolen_since(earlier) == 0.0
    assert MachineCpu(steal_s=10.0, all_s=100.0).stolen_since(earlier) is None  # no time passed
