"""`inferline serve` (foreground), `inferline up` (the same, detached) and `inferline down`.

`serve` deploys a plan locally (embedded model server, agent, router, endpoints), runs the live
tuner, and writes `STATE_DIR/up.json` (endpoints and process ids) once it serves and
`STATE_DIR/decisions.jsonl` as the tuner acts; SIGTERM or Ctrl-C stops everything it started.
`up` starts `serve` in its own session and returns once it serves; `down` stops it and makes sure
no process it started is left.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from inferline.deployment import LocalDeployment, core_shortfall
from inferline.errors import InferlineError, PlanError
from inferline.heap import freeze_long_lived
from inferline.live_tuner import LiveDecision, LiveTuner
from inferline.output_paths import make_dir
from inferline.plan import Plan, load_plan
from inferline.planner.tuning.registry import make_policy
from inferline.spec import PipelineSpec, load_spec

UP_FILE = "up.json"
DECISIONS_FILE = "decisions.jsonl"
UP_TIMEOUT_S = 120.0


def load_plan_and_spec(plan_path: str, spec_path: str | None) -> tuple[Plan, PipelineSpec]:
    plan = load_plan(plan_path)
    path = spec_path or plan.spec
    if path is None:
        raise PlanError("the plan does not name its pipeline spec", "pass --spec SPEC")
    return plan, load_spec(path)


def run_serve(args: argparse.Namespace, console: Console) -> int:
    plan, spec = load_plan_and_spec(args.plan, args.spec)
    state = make_dir(args.state_dir, "state folder")
    (state / DECISIONS_FILE).write_text("")
    policy = make_policy(args.tuner, plan.tuner)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    deployment = LocalDeployment(
        spec, plan, args.models, grpc_port=args.grpc_port, http_port=args.http_port, max_queue=args.max_queue
    )
    tuner: LiveTuner | None = None
    try:
        deployment.start()
        assert deployment.router is not None
        if policy is not None:
            tuner = LiveTuner(
                deployment.router,
                deployment,
                policy,
                plan,
                args.tick_s,
                _decision_log(state),
            ).start()
        freeze_long_lived()  # everything started now lives as long as the process
        _write_up(state, deployment, args.tuner, Path(args.plan).resolve())
        assert deployment.endpoints is not None
        console.print(
            f"serving pipeline {spec.name!r}: gRPC {deployment.endpoints.grpc} · HTTP {deployment.endpoints.http}"
            f" · tuner {args.tuner}"
        )
        stop.wait()
    finally:
        if tuner is not None:
            tuner.stop()
        deployment.stop()
        with contextlib.suppress(FileNotFoundError):
            (state / UP_FILE).unlink()
    return 0


def _decision_log(state: Path) -> Any:
    def write(d: LiveDecision) -> None:
        with (state / DECISIONS_FILE).open("a") as f:
            f.write(json.dumps({**d.as_json(), "unix_time": time.time()}) + "\n")

    return write


def _write_up(state: Path, deployment: LocalDeployment, tuner: str, plan: Path) -> None:
    info = deployment.describe() | {"pid": os.getpid(), "tuner": tuner, "plan": str(plan), "started_unix": time.time()}
    tmp = state / (UP_FILE + ".tmp")
    tmp.write_text(json.dumps(info, indent=2))
    tmp.replace(state / UP_FILE)


def read_up(state_dir: str | Path) -> dict[str, Any]:
    path = Path(state_dir) / UP_FILE
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise InferlineError(
            f"nothing is running from {state_dir} (no {path})", "start it with `inferline up PLAN`"
        ) from None
    return data


def run_up(args: argparse.Namespace, console: Console) -> int:
    plan, _ = load_plan_and_spec(args.plan, args.spec)  # fail here, in one line, rather than in the background
    state = Path(args.state_dir)
    if (state / UP_FILE).exists():
        up = read_up(state)
        if _alive(int(up["pid"])):
            raise InferlineError(
                f"a pipeline is already up from {state} (pid {up['pid']})", "run `inferline down` first"
            )
        (state / UP_FILE).unlink()
    make_dir(state, "state folder")
    argv = [sys.executable, "-m", "inferline.cli", "serve", args.plan, "--state-dir", str(state)]
    argv += ["--models", str(args.models), "--tuner", args.tuner, "--tick-s", str(args.tick_s)]
    argv += ["--grpc-port", str(args.grpc_port), "--http-port", str(args.http_port)]
    argv += ["--max-queue", str(args.max_queue)] + (["--spec", args.spec] if args.spec else [])
    with (state / "serve.log").open("wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + UP_TIMEOUT_S
    while not (state / UP_FILE).exists():
        if process.poll() is not None:
            raise InferlineError(f"the pipeline did not start: {_last_line(state / 'serve.log')}")
        if time.monotonic() > deadline:
            _stop_group(process.pid)
            raise InferlineError(f"the pipeline was not up within {UP_TIMEOUT_S:g} s", f"see {state / 'serve.log'}")
        time.sleep(0.1)
    up = read_up(state)
    console.print(
        f"up: pipeline {up['pipeline']!r} · gRPC {up['endpoints']['grpc']} · HTTP {up['endpoints']['http']}"
        f" · replicas {up['replicas']} · `inferline down` stops it"
    )
    shortfall = core_shortfall(plan)
    if shortfall is not None:
        console.print(f"[yellow]warning:[/] {shortfall}")
    return 0


def run_down(args: argparse.Namespace, console: Console) -> int:
    up = read_up(args.state_dir)
    pid = int(up["pid"])
    _stop_group(pid)
    server = up.get("server_pid")
    if server and _alive(int(server)):  # serve was killed before it could stop its model server
        _stop_group(int(server), grace_s=10.0)
    with contextlib.suppress(FileNotFoundError):
        (Path(args.state_dir) / UP_FILE).unlink()
    console.print(f"down: stopped pipeline {up['pipeline']!r} (pid {pid})")
    return 0


def _stop_group(pid: int, grace_s: float = 30.0) -> None:
    """SIGTERM the serve process (it stops what it started), then SIGKILL its session if need be."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    return True


def _last_line(path: Path) -> str:
    with contextlib.suppress(OSError):
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
        if lines:
            return lines[-1].removeprefix("inferline: error: ")
    return "no output"
