"""`inferline up` / `inferline down` with real processes: serving, one-line errors, nothing left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from inferline.calibration import live_stages, stolen_share
from inferline.router.client import KServeClient

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "inferline.cli", *args], capture_output=True, text=True, timeout=180, cwd=cwd
    )


def plan_file(tmp: Path, pipeline: str = "local-emulated", local: bool = True) -> Path:
    out = tmp / f"{pipeline}-plan.json"
    profiles, catalog = (
        (EXAMPLES / "profiles" / "measured-cpu", EXAMPLES / "catalog-local.yaml")
        if local
        else (EXAMPLES / "profiles" / "representative", EXAMPLES / "catalog.yaml")
    )
    done = cli(
        "plan", str(EXAMPLES / "pipelines" / f"{pipeline}.yaml"), "--profiles", str(profiles),
        "--hardware", str(catalog), "--trace", "gamma:rate=80,cv=2,duration=60,seed=1", "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_up_serves_the_plan_and_down_leaves_no_process(tmp_path: Path) -> None:
    plan = plan_file(tmp_path)
    state = tmp_path / "state"
    up = cli("up", str(plan), "--state-dir", str(state), "--tuner", "none")
    try:
        assert up.returncode == 0, up.stderr
        info = json.loads((state / "up.json").read_text())
        pids = [int(info["pid"]), int(info["server_pid"])]
        assert all(alive(p) for p in pids)
        planned = json.loads(plan.read_text())["stages"]
        assert info["replicas"] == {name: s["replicas"] for name, s in planned.items()}
        with KServeClient(info["endpoints"]["grpc"]) as client:
            x = np.random.default_rng(0).random((1, 16)).astype(np.float32)
            out = client.infer("local-emulated", {"INPUT": x})
        np.testing.assert_allclose(out["detect.OUTPUT"], x)
        again = cli("up", str(plan), "--state-dir", str(state))
        assert again.returncode == 2 and "already up" in again.stderr and again.stderr.count("\n") == 1
        kept = tmp_path / "metrics"
        replayed = cli(
            "replay", "--state-dir", str(state), "--trace", "gamma:rate=40,cv=1,duration=3,seed=4", "--json",
            "--metrics-out", str(kept),
        )  # fmt: skip
        assert replayed.returncode == 0, replayed.stderr
        results = json.loads(replayed.stdout)
        assert results["sent"] == results["answered"] + results["errors"] and results["sent"] > 60
        # The router's metrics around this replay: between them, exactly its queries' calls of the
        # entry stage, and the machine's CPU time; calibrate reads this replay alone from them.
        before, after = kept / "router-metrics-before.txt", kept / "router-metrics-after.txt"
        window = live_stages(after.read_text(), since=before.read_text())
        assert sum(n * count for n, (_, count) in window["detect"].calls.items()) == results["answered"]
        # Every answered call grouped by how crowded it was, with its seconds at each count under way.
        for stage in window.values():
            assert sum(n for n, _ in stage.crowded.values()) == stage.call_count
            seconds = sum(ms * count for ms, count in stage.calls.values()) / 1000.0
            assert sum(sum(at.values()) for _, at in stage.crowded.values()) == pytest.approx(seconds, rel=0.02)
        # The emulated models sleep: they barely feel what they share, so no interference is fitted.
        assert results["interference"] is None
        assert stolen_share(after.read_text(), since=before.read_text()) is not None
        calibrated = tmp_path / "calibrated"
        done = cli("calibrate", str(plan), "--metrics", str(after), "--since", str(before), "--out", str(calibrated))
        assert done.returncode == 0, done.stderr
        assert (calibrated / "emulated-detector.json").exists()
        assert results["errors"] == 0 and results["p99_ms"] > 0 and results["estimated_p99_ms"] > 0
        assert results["slo_ms"] == json.loads(plan.read_text())["slo_ms"] and results["cost_per_hour"] > 0
        # The replicas share this machine's cores with the router and the load generator: both measured.
        assert info["cores"] == len(os.sched_getaffinity(0))
        cpu = results["cpu_ms_per_query"]
        assert set(cpu) == {"router", "load generator", "router outside its replicas", "machine"}
        assert cpu["router"] > 0 and cpu["load generator"] > 0
        # The machine's busy time holds both, and the model server's (/proc/stat counts in 10 ms ticks).
        assert cpu["machine"] > 0.8 * (cpu["router"] + cpu["load generator"])
        assert 0 <= results["machine_stolen"] < 1  # what the hypervisor took meanwhile (Linux: /proc/stat)
        # What remains of the router's CPU after its replicas' own (0 at worst: a thread that exits
        # mid-replay takes its CPU out of the process's sum).
        assert 0 <= cpu["router outside its replicas"] < cpu["router"]
        cores = info["cores"]
        assert results["estimate"].startswith(f"static plan, replicas sharing {cores} core")
        assert "with the load generator" in results["estimate"]
        # `classify` follows `detect` with probability 0.6: the estimate takes the routes the queries
        # took, read from their answers (every query answered).
        assert results["estimate"].endswith(", conditional edges as the queries took them")
        # Estimated again from the service times the router measured in this replay alone.
        assert results["estimated_from_run_p99_ms"] > 0
        # Each query's time outside the stages (the hops to the router and back, its passing on)
        # measured, and what the simulation lacks of it added to the estimates.
        outside = results["outside_stages_ms"]
        assert 0 < outside < results["p99_ms"]
        described = results["estimate"].split("outside the stages added to each (measured ")[1]
        assert float(described.split(" ms")[0]) == pytest.approx(outside, abs=0.006)
        # The gRPC endpoint, named explicitly: an HTTP client could not talk to it at all.
        grpc = ["--endpoint", info["endpoints"]["grpc"], "--protocol", "grpc", "--plan", str(plan)]
        replayed = cli("replay", *grpc, "--trace", "gamma:rate=40,cv=1,duration=2,seed=5", "--json")
        assert replayed.returncode == 0, replayed.stderr
        results = json.loads(replayed.stdout)
        assert results["errors"] == 0 and results["answered"] == results["sent"] > 40 and results["p99_ms"] > 0
        assert results["estimate"].endswith(", conditional edges as the queries took them")  # gRPC answers too
        assert set(results["cpu_ms_per_query"]) == {"load generator", "machine"}  # by address: no router pid
        assert results["estimated_from_run_p99_ms"] is None  # nor its metrics
    finally:
        down = cli("down", "--state-dir", str(state))
    assert down.returncode == 0, down.stderr
    assert not any(alive(p) for p in pids)
    assert not (state / "up.json").exists()


def test_a_plan_for_hardware_this_machine_lacks_is_a_one_line_error(tmp_path: Path) -> None:
    plan = plan_file(tmp_path, "tf-cascade", local=False)
    done = cli("up", str(plan), "--state-dir", str(tmp_path / "state"))
    assert done.returncode == 2
    assert "the local deployment has only 'cpu'" in done.stderr and done.stderr.count("\n") == 1
    assert not (tmp_path / "state" / "up.json").exists()


def test_bad_plan_files_and_down_with_nothing_up_are_one_line_errors(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    infeasible = tmp_path / "infeasible.json"
    plan = json.loads(plan_file(tmp_path).read_text())
    infeasible.write_text(json.dumps(plan | {"feasible": False, "reason": "SLO too tight"}))
    by_address = ["replay", "--endpoint", "127.0.0.1:9", "--pipeline", "p", "--trace", "gamma:rate=5,duration=1"]
    for args, needle in (
        (["up", str(broken)], "not valid JSON"),
        (["up", str(infeasible)], "infeasible"),
        (["down", "--state-dir", str(tmp_path / "none")], "nothing is running"),
        (by_address, "no KServe v2 server answers"),
        (["replay", "--state-dir", str(tmp_path / "none"), "--trace", "gamma:rate=5,duration=1"], "nothing is running"),
        (["replay", "--trace", "gamma:rate=5,duration=1", "--cores", "0"], "--cores must be positive, got 0"),
        ([*by_address, "--metrics-out", str(tmp_path / "kept")], "--metrics-out needs the router's metrics"),
    ):
        done = cli(*args, "--state-dir", str(tmp_path / "s")) if args[0] == "up" else cli(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert needle in done.stderr and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_down_stops_the_model_server_even_if_serve_was_killed(tmp_path: Path) -> None:
    plan = plan_file(tmp_path)
    state = tmp_path / "state"
    assert cli("up", str(plan), "--state-dir", str(state), "--tuner", "none").returncode == 0
    info = json.loads((state / "up.json").read_text())
    os.kill(int(info["pid"]), 9)
    down = cli("down", "--state-dir", str(state))
    assert down.returncode == 0, down.stderr
    assert not alive(int(info["server_pid"])) and not alive(int(info["pid"]))
