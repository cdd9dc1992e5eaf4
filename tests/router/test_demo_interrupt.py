"""`inferline demo` on real Triton, interrupted with Ctrl-C: one line, non-zero exit, no process left behind.

The demo runs in its own session and process group, as a foreground job in a terminal would; the
test sends SIGINT to that group (what a terminal's Ctrl-C does). Its model servers run in sessions
of their own, so only the demo itself gets the signal and must stop them. Every process the demo
starts is found two ways: as a descendant of the demo while it runs, and by its command line,
which holds the demo's temporary folder (TMPDIR points into the test's own folder, so nothing
unrelated can match).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXIT_WITHIN_S = 60.0  # generous: a loaded 2-core machine stops Triton and its stubs slowly


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time in clock ticks) or None when gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), fields[0], int(fields[19])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def descendants(root: int) -> dict[int, tuple[int, str]]:
    """Every live descendant of `root`: pid -> (start time, command line)."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for pid in _pids():
        stat = _stat(pid)
        if stat is not None and stat[1] != "Z":
            children.setdefault(stat[0], []).append(pid)
            starts[pid] = stat[2]
    found: dict[int, tuple[int, str]] = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found[pid] = (starts[pid], _cmdline(pid))
        todo.extend(children.get(pid, []))
    return found


def alive(pid: int, start: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[1] != "Z" and stat[2] == start


@dataclass
class Demo:
    process: subprocess.Popen[str]
    folder: Path
    lines: list[str] = field(default_factory=list)
    seen: dict[int, tuple[int, str]] = field(default_factory=dict)
    """Every descendant ever seen: pid -> (start time, command line)."""
    stderr: str = ""

    def watch(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    def snapshot(self) -> None:
        self.seen |= descendants(self.process.pid)

    def wait_for(self, needle: str, timeout_s: float, tritonserver: bool = True) -> None:
        """Until an output line matches the regex `needle` and (optionally) a tritonserver child of the demo runs."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.snapshot()
            running = any("tritonserver" in cmd for _, cmd in descendants(self.process.pid).values())
            if any(re.search(needle, line) for line in self.lines) and (running or not tritonserver):
                return
            assert self.process.poll() is None, f"the demo ended early: {''.join(self.lines)[-2000:]}"
            time.sleep(0.2)
        pytest.fail(f"no {needle!r} with a running tritonserver within {timeout_s:g} s: {''.join(self.lines)[-2000:]}")

    def leftovers(self) -> list[str]:
        """Processes the demo started that still run: seen as descendants, or naming its folder."""
        left = {pid: cmd for pid, (start, cmd) in self.seen.items() if alive(pid, start)}
        for pid in _pids():
            cmd = _cmdline(pid)
            stat = _stat(pid)
            if str(self.folder) in cmd and stat is not None and stat[1] != "Z" and pid != os.getpid():
                left[pid] = cmd
        return [f"{pid}: {cmd[:200]}" for pid, cmd in sorted(left.items())]

    def kill_all(self) -> None:
        """Clean-up for a failed test: whatever the demo left, by pid (its own group first)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        for line in self.leftovers():
            pid = int(line.split(":", 1)[0])
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)  # a model server leads its own group (its stubs)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Demo]:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = os.environ | {"TMPDIR": str(tmp), "PYTHONUNBUFFERED": "1", "COLUMNS": "160"}
    env.pop("INFERLINE_DEBUG", None)
    argv = [sys.executable, "-m", "inferline.cli", "demo", "--out", str(tmp_path / "out")]
    process = subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    running = Demo(process, tmp_path)
    reader = threading.Thread(target=running.watch, daemon=True)
    reader.start()
    try:
        yield running
    finally:
        running.kill_all()
        reader.join(timeout=5)
        assert process.stdout is not None and process.stderr is not None
        process.stdout.close()
        process.stderr.close()


def interrupt_and_check(demo: Demo) -> None:
    demo.snapshot()
    servers = [cmd for _, cmd in demo.seen.values() if "tritonserver" in cmd]
    assert servers, "no tritonserver seen before the interrupt"
    os.killpg(demo.process.pid, signal.SIGINT)  # a terminal's Ctrl-C: the foreground process group
    sent = time.monotonic()
    try:
        _, demo.stderr = demo.process.communicate(timeout=EXIT_WITHIN_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the demo did not exit within {EXIT_WITHIN_S:g} s of Ctrl-C: {''.join(demo.lines)[-2000:]}")
    took = time.monotonic() - sent
    code = demo.process.returncode
    assert code != 0, f"exit code {code}"
    assert "Traceback" not in demo.stderr, demo.stderr
    lines = [line for line in demo.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "interrupted" in lines[0], demo.stderr
    assert "Traceback" not in "".join(demo.lines)
    deadline = time.monotonic() + 15.0  # a stub may take a moment after its server to go
    while demo.leftovers() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert demo.leftovers() == [], f"left running after Ctrl-C ({took:.1f} s to exit)"


def test_ctrl_c_while_profiling_leaves_no_process(demo: Demo) -> None:
    # The first model profiled: the next is being profiled.
    demo.wait_for(r"^profiled \S+ in", timeout_s=120.0)
    interrupt_and_check(demo)


def test_ctrl_c_while_replaying_leaves_no_process(demo: Demo) -> None:
    demo.wait_for("3/4 deploy", timeout_s=240.0, tritonserver=False)
    # A progress line past 20 s: in the trace's rate step, while the live tuner adds replicas.
    demo.wait_for(r"^\s*2\d\.\d s: sent", timeout_s=60.0)
    interrupt_and_check(demo)
