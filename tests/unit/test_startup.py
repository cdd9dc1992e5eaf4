"""Measured replica start-up fed to the closed-loop simulator: the median, `simulate --startup-s FILE`,
and the closed-loop estimate of a replay with a tuner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from inferline.calibration import LiveStage, calibrate_profiles, with_router_work_per_call
from inferline.cli import main
from inferline.errors import InferlineError
from inferline.plan import load_plan
from inferline.planner.estimator import p99
from inferline.profiles import load_profiles, parse_profile
from inferline.replay_command import Target, drifted, plan_catalog, results_for, run_estimate, with_router_work
from inferline.router.prediction import predicted_latencies_ms
from inferline.router.replay import ReplayResult
from inferline.runs import simulate_plan
from inferline.spec import load_spec
from inferline.startup import DEFAULT_STARTUP_S, decisions_from_file, measured_startup_s, parse_startup
from inferline.traces import load_trace

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
SPEC = str(EXAMPLES / "pipelines" / "local-emulated.yaml")
STEP = "step:rate=80/200/80,cv=2,every=20,seed=2"


def decision(startup_s: Any, time_s: float = 1.0, replicas: int = 2, **extra: Any) -> dict[str, Any]:
    return {"time_s": time_s, "stage": "detect", "replicas": replicas, "reason": "r", "message": "m"} | (
        {"startup_s": startup_s} | extra
    )


@pytest.fixture(scope="module")
def plan_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The live demo's plan on the bundled CPU profiles (its tuner scales up on the step trace)."""
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    argv = ["plan", SPEC, "--profiles", str(EXAMPLES / "profiles" / "measured-cpu")]
    argv += ["--hardware", str(EXAMPLES / "catalog-local.yaml"), "--trace", "gamma:rate=80,cv=2,duration=120,seed=1"]
    assert main([*argv, "--out", str(path)]) == 0
    return path


def simulate(capsys: pytest.CaptureFixture[str], plan: Path, startup: str, tuner: str = "inferline") -> dict[str, Any]:
    argv = ["simulate", SPEC, "--plan", str(plan), "--trace", STEP, "--tuner", tuner, "--tick-s", "1", "--json"]
    rc = main([*argv, "--startup-s", startup])
    out, err = capsys.readouterr()
    assert rc == 0, err
    data: dict[str, Any] = json.loads(out)
    return data


def error_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("inferline: error: "), err
    return lines[0]


# --- the median ----------------------------------------------------------------------------------


def test_median_over_decisions_that_started_replicas() -> None:
    assert measured_startup_s([decision(3.0), decision(1.0), decision(2.0)]) == 2.0
    assert measured_startup_s([decision(1.0), decision(4.0)]) == 2.5
    # scale-downs (0), missing or non-numeric values do not count
    scaled = [decision(0.0), decision(1.5), decision(0), {"stage": "detect"}, decision(None), decision(True)]
    assert measured_startup_s(scaled) == 1.5
    assert measured_startup_s([decision(0.0), {"time_s": 2}]) is None
    assert measured_startup_s([]) is None


def test_decisions_from_a_log_a_results_file_and_a_demo_report(tmp_path: Path) -> None:
    log = tmp_path / "decisions.jsonl"
    log.write_text("".join(json.dumps(decision(s, unix_time=1e9)) + "\n" for s in (1.0, 0.0, 3.0)) + "\n")
    assert [d["startup_s"] for d in decisions_from_file(log)] == [1.0, 0.0, 3.0]
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps(decision(2.5)) + "\n")
    assert measured_startup_s(decisions_from_file(one)) == 2.5
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"p99_ms": 100, "decisions": [decision(4.0), decision(6.0)]}, indent=2))
    assert measured_startup_s(decisions_from_file(results)) == 5.0
    report = tmp_path / "report.json"
    runs = {"inferline": {"decisions": [decision(7.0)]}, "none": {"decisions": []}}
    report.write_text(json.dumps({"plan": {}, "runs": runs}))
    assert measured_startup_s(decisions_from_file(report)) == 7.0


def test_parse_startup_seconds_or_file(tmp_path: Path) -> None:
    assert parse_startup("2.5") == (2.5, None)
    assert parse_startup("0") == (0.0, None)
    log = tmp_path / "d.jsonl"
    log.write_text(json.dumps(decision(1.25)) + "\n" + json.dumps(decision(0.0)) + "\n")
    assert parse_startup(str(log)) == (1.25, str(log))
    for bad in ("-1", "nan", "inf"):
        with pytest.raises(InferlineError, match="--startup-s"):
            parse_startup(bad)


# --- inferline simulate --startup-s FILE -----------------------------------------------------------


def test_simulate_uses_the_measured_median_start_up(
    capsys: pytest.CaptureFixture[str], plan_path: Path, tmp_path: Path
) -> None:
    log = tmp_path / "decisions.jsonl"
    log.write_text("".join(json.dumps(decision(s)) + "\n" for s in (0.4, 0.0, 0.6, 0.5)))
    from_file = simulate(capsys, plan_path, str(log))
    assert from_file["startup_s"] == 0.5 and from_file["startup_measured_in"] == str(log)
    by_value = simulate(capsys, plan_path, "0.5")
    assert by_value["startup_s"] == 0.5 and "startup_measured_in" not in by_value
    assert {k: v for k, v in from_file.items() if k != "startup_measured_in"} == by_value
    # a slower measured start-up leaves the burst unserved for longer: more misses
    slow = tmp_path / "slow.json"
    slow.write_text(json.dumps({"decisions": [decision(15.0), decision(0.0)]}))
    slower = simulate(capsys, plan_path, str(slow))
    assert slower["startup_s"] == 15.0 and slower["decisions"]
    assert slower["slo_miss_rate"] > from_file["slo_miss_rate"]
    assert slower["p99_ms"] > from_file["p99_ms"]
    assert simulate(capsys, plan_path, str(DEFAULT_STARTUP_S))["startup_s"] == DEFAULT_STARTUP_S


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (None, "cannot read decisions file"),
        ("{not json\n", "line 1 is not JSON"),
        ("", "no measured replica start-up"),
        (json.dumps(decision(0.0)) + "\n" + json.dumps(decision(0.0)) + "\n", "no measured replica start-up"),
        (json.dumps({"p99_ms": 1.0, "decisions": [{"time_s": 1, "stage": "a", "replicas": 2}]}), "no measured"),
        (json.dumps(decision("slow")) + "\n", "malformed decision"),
        ("[1, 2]", "malformed decision"),
        (json.dumps({"pipeline": "p", "stages": {}}), "neither a decisions log nor run results"),
    ],
    ids=[
        "missing",
        "not-json",
        "empty",
        "only-scale-downs",
        "simulated-results",
        "non-numeric",
        "not-objects",
        "a-plan",
    ],
)
def test_a_bad_decisions_file_is_a_one_line_error_naming_it(
    capsys: pytest.CaptureFixture[str], plan_path: Path, tmp_path: Path, content: str | None, needle: str
) -> None:
    path = tmp_path / "decisions.jsonl"
    if content is not None:
        path.write_text(content)
    argv = ["simulate", SPEC, "--plan", str(plan_path), "--trace", STEP, "--startup-s", str(path)]
    line = error_line(capsys, argv)
    assert needle in line and str(path) in line


def test_a_directory_as_decisions_file_is_a_one_line_error(capsys: pytest.CaptureFixture[str], plan_path: Path) -> None:
    argv = ["simulate", SPEC, "--plan", str(plan_path), "--trace", STEP, "--startup-s", str(plan_path.parent)]
    assert str(plan_path.parent) in error_line(capsys, argv)


def test_a_bad_decisions_file_exits_non_zero_in_a_real_process(plan_path: Path, tmp_path: Path) -> None:
    path = tmp_path / "nothing-measured.jsonl"
    path.write_text(json.dumps(decision(0.0)) + "\n")
    argv = ["simulate", SPEC, "--plan", str(plan_path), "--trace", STEP, "--startup-s", str(path)]
    code = "import sys; from inferline.cli import main; sys.exit(main())"
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "no measured replica start-up" in lines[0]


# --- the estimate of a replay with a tuner -----------------------------------------------------------


def test_a_tuned_run_is_estimated_closed_loop_with_the_measured_start_up(plan_path: Path) -> None:
    plan, spec, arrivals = load_plan(plan_path), load_spec(SPEC), load_trace(STEP)
    fast = run_estimate(plan, spec, arrivals, "inferline", [decision(0.5), decision(0.0)])
    assert fast["estimated_startup_s"] == 0.5
    assert fast["estimate"] == "closed-loop tuner inferline, start-up 0.5 s measured"
    sim = simulate_plan(spec, plan, arrivals, "inferline", tick_s=1.0, startup_s=0.5)
    assert fast["estimated_p99_ms"] == pytest.approx(sim.p99_s * 1000.0)
    assert fast["estimated_slo_miss_rate"] == pytest.approx(sim.slo_miss_rate, abs=1e-6)
    unmeasured = run_estimate(plan, spec, arrivals, "inferline", [decision(0.0)])
    assert unmeasured["estimated_startup_s"] == DEFAULT_STARTUP_S and "default" in unmeasured["estimate"]
    assert unmeasured["estimated_p99_ms"] > fast["estimated_p99_ms"]  # replicas arrive 4.5 s later
    # A local deployment: the replicas share the machine's cores in the closed loop too.
    roomy = run_estimate(plan, spec, arrivals, "inferline", [decision(0.5)], cores=64.0)
    assert roomy["estimate"] == "closed-loop tuner inferline, start-up 0.5 s measured, replicas sharing 64 cores"
    assert roomy["estimated_p99_ms"] == fast["estimated_p99_ms"]  # never crowded: the same run
    scarce = run_estimate(plan, spec, arrivals, "inferline", [decision(0.5)], cores=0.05, background_s={"x": 0.001})
    assert scarce["estimate"].endswith(
        "replicas sharing 0.05 cores with the x (1.00 ms CPU per query, one query at a time)"
    )
    assert scarce["estimated_p99_ms"] > fast["estimated_p99_ms"]
    slow = run_estimate(plan, spec, arrivals, "inferline", [decision(15.0)])
    assert slow["estimated_startup_s"] == 15.0
    assert slow["estimated_slo_miss_rate"] > fast["estimated_slo_miss_rate"]
    static = run_estimate(plan, spec, arrivals, "none", [])
    assert static["estimate"] == "static plan" and static["estimated_startup_s"] is None
    assert static["estimated_p99_ms"] > fast["estimated_p99_ms"]  # the static plan cannot follow the step


def fake_replay(arrivals: np.ndarray[Any, Any], latency_ms: float = 50.0) -> ReplayResult:
    n = arrivals.size
    return ReplayResult(
        arrivals, arrivals.copy(), arrivals + latency_ms / 1000.0, np.full(n, latency_ms), ("ok",) * n, 120.0,
        float(arrivals[-1]) + 0.05,
    )  # fmt: skip


def test_replay_results_of_a_tuned_pipeline_read_the_start_up_from_the_state_dir(
    plan_path: Path, tmp_path: Path
) -> None:
    plan, spec, arrivals = load_plan(plan_path), load_spec(SPEC), load_trace(STEP)
    started = 1_000_000.0
    log = tmp_path / "decisions.jsonl"
    before = decision(9.0, unix_time=started - 500.0)  # an earlier run: not this one's
    during = [decision(s, time_s=0.0, unix_time=started + t) for s, t in ((0.8, 21.0), (0.0, 45.0), (1.2, 22.0))]
    log.write_text("".join(json.dumps(d) + "\n" for d in (before, *during)))
    result = fake_replay(arrivals)
    tuned = results_for(Target("127.0.0.1:1", spec.name, plan, spec, log, "inferline"), result, arrivals, started)
    assert [d["startup_s"] for d in tuned["decisions"]] == [0.8, 0.0, 1.2]
    assert tuned["estimated_startup_s"] == 1.0 and tuned["estimate"].startswith("closed-loop tuner inferline")
    assert 0.0 <= tuned["estimated_slo_miss_rate"] <= 1.0 and tuned["estimated_p99_ms"] > 0
    assert tuned["p99_ms"] == pytest.approx(50.0) and tuned["slo_miss_rate"] == 0.0
    # no decision in this run's window: the state dir's whole log still measured a start-up
    later = results_for(
        Target("127.0.0.1:1", spec.name, plan, spec, log, "inferline"), result, arrivals, started + 10_000.0
    )
    assert later["decisions"] == [] and later["estimated_startup_s"] == 1.2  # median of 9.0, 0.8, 1.2
    static = results_for(Target("127.0.0.1:1", spec.name, plan, spec, log, "none"), result, arrivals, started)
    assert static["estimate"] == "static plan" and static["estimated_startup_s"] is None
    assert static["estimated_p99_ms"] > 0 and 0.0 <= static["estimated_slo_miss_rate"] <= 1.0
    bare = results_for(Target("127.0.0.1:1", spec.name, None, None, None), result, arrivals, started)
    assert bare["estimated_p99_ms"] is None and bare["estimate"].startswith("none")


# --- the estimate of a local deployment: replicas share the machine's cores ---------------------------


def test_a_static_run_is_estimated_with_the_cores_the_replicas_share(plan_path: Path) -> None:
    plan, spec = load_plan(plan_path), load_spec(SPEC)
    arrivals = load_trace(STEP)
    own = run_estimate(plan, spec, arrivals, "none", [])
    roomy = run_estimate(plan, spec, arrivals, "none", [], cores=64.0)
    # The emulated models mostly sleep: even on half a core their calls barely slow each other.
    scarce = run_estimate(plan, spec, arrivals, "none", [], cores=0.05)
    assert own["estimate"] == "static plan"
    assert roomy["estimate"] == "static plan, replicas sharing 64 cores"
    assert roomy["estimated_p99_ms"] == pytest.approx(own["estimated_p99_ms"], abs=1e-9)
    assert scarce["estimated_p99_ms"] > own["estimated_p99_ms"]


def test_replay_takes_the_cores_from_up_json_unless_told(tmp_path: Path) -> None:
    from inferline.replay_command import target_from

    up = {"endpoints": {"grpc": "127.0.0.1:1", "http": "127.0.0.1:2"}, "pipeline": "p", "cores": 2}
    (tmp_path / "up.json").write_text(json.dumps(up))
    assert target_from(str(tmp_path), None, None, None).cores == 2
    assert target_from(str(tmp_path), None, None, None, cores=1.5).cores == 1.5
    assert target_from(None, "127.0.0.1:1", None, "p").cores is None  # a remote pipeline: as planned
    with pytest.raises(InferlineError, match="--cores must be positive, got -1"):
        target_from(str(tmp_path), None, None, None, cores=-1.0)


def test_the_load_generators_cpu_is_counted_where_replicas_share_cores(plan_path: Path) -> None:
    plan, spec, arrivals = load_plan(plan_path), load_spec(SPEC), load_trace(STEP)
    result = fake_replay(arrivals)
    local = Target("127.0.0.1:1", spec.name, plan, spec, None, "none", cores=1.0, router_pid=os.getpid())
    quiet = results_for(local, result, arrivals, 0.0)
    lg_only = results_for(local, result, arrivals, 0.0, cpu_s_per_query={"load generator": 0.006})
    busy = {"router": 0.004, "load generator": 0.006}
    beside = results_for(local, result, arrivals, 0.0, cpu_s_per_query=busy)
    assert beside["cpu_ms_per_query"] == {"router": 4.0, "load generator": 6.0}
    assert beside["estimate"] == (
        "static plan, replicas sharing 1 core with the load generator (6.00 ms CPU per query, one query at a time)"
        " and the router (4.00 ms CPU per query, one query at a time)"
    )
    # 6 ms of CPU per query at the step's 200 q/s is more than the core: the models get less of it.
    assert lg_only["estimated_p99_ms"] > quiet["estimated_p99_ms"]
    # The router's whole CPU is in each query's way (without its metrics, its work per call on each
    # stage is unknown), after the load generator's.
    assert beside["estimated_p99_ms"] > lg_only["estimated_p99_ms"]
    # Offline profiles and no router metrics to tell its work per call on each stage: all of its
    # CPU counts, whatever part of it was outside its replicas.
    split = results_for(local, result, arrivals, 0.0, cpu_s_per_query=busy | {"router outside its replicas": 0.002})
    assert split["estimated_p99_ms"] == pytest.approx(beside["estimated_p99_ms"])
    assert split["cpu_ms_per_query"]["router outside its replicas"] == 2.0
    remote_target = Target("127.0.0.1:1", spec.name, plan, spec, None, "none")
    remote = results_for(remote_target, result, arrivals, 0.0, cpu_s_per_query=busy)
    assert remote["estimate"] == "static plan" and remote["cpu_ms_per_query"] == {"router": 4.0, "load generator": 6.0}
    # Told the replicas share a core elsewhere (--cores with --endpoint): this load generator is not there.
    elsewhere = results_for(Target("127.0.0.1:1", spec.name, plan, spec, None, "none", cores=1.0), result, arrivals,
                            0.0, cpu_s_per_query=busy)  # fmt: skip
    assert elsewhere["estimated_p99_ms"] == quiet["estimated_p99_ms"]


def test_cpu_readings_per_query() -> None:
    from inferline.process_cpu import MachineCpu
    from inferline.replay_command import CpuReading

    before = CpuReading(router_s=10.0, client_s=2.0)
    assert before.per_query_s(CpuReading(10.5, 2.2), 100) == pytest.approx({"router": 0.005, "load generator": 0.002})
    assert before.per_query_s(CpuReading(None, 2.2), 100) == pytest.approx({"load generator": 0.002})
    assert before.per_query_s(CpuReading(10.5, 2.2), 0) == {}
    threads = CpuReading(router_s=10.0, client_s=2.0, replicas_s=1.0)
    assert threads.per_query_s(CpuReading(10.5, 2.2, 1.3), 100) == pytest.approx(
        {"router": 0.005, "load generator": 0.002, "router outside its replicas": 0.002}
    )
    # The whole machine's busy time: neither idle nor stolen by its hypervisor.
    machine = CpuReading(None, 2.0, machine=MachineCpu(steal_s=1.0, all_s=100.0, idle_s=60.0))
    later = CpuReading(None, 2.2, machine=MachineCpu(steal_s=1.5, all_s=110.0, idle_s=66.0))
    assert machine.per_query_s(later, 100) == pytest.approx({"load generator": 0.002, "machine": 0.035})


def test_the_routers_work_on_each_call_goes_in_the_calls_its_frontends_in_each_querys_way(plan_path: Path) -> None:
    """The router's replicas' own CPU is in a calibrated profile's call times; an offline profile's
    stage gets it added to each call. What is left of the router's CPU is in each query's way."""
    from inferline.replay_command import in_each_querys_way

    plan, spec = load_plan(plan_path), load_spec(SPEC)
    offline = load_profiles(plan.profiles)
    live = _live_at(plan, spec, 1.0, 500, router_cpu_ms=0.5)
    every, _ = calibrate_profiles(spec, plan, offline, live)
    classify_only, _ = calibrate_profiles(spec, plan, offline, {"classify": live["classify"]})
    measured = {"router": 0.004, "load generator": 0.003, "router outside its replicas": 0.001}
    in_way = {"load generator": 0.003, "router outside its replicas": 0.001}

    def way(profiles: Any, live_stages: Any = live, cpu: Any = measured, pipeline: Any = spec) -> Any:
        return in_each_querys_way(cpu, pipeline, plan, profiles, live_stages)

    assert way(offline).beside == in_way and way(offline).in_calls_ms == {"detect": 0.5, "classify": 0.5}
    assert list(way(offline).beside) == ["load generator", "router outside its replicas"]  # the order passed
    assert way(every).beside == in_way and way(every).in_calls_ms == {}  # their call times hold it
    assert way(classify_only).in_calls_ms == {"detect": 0.5}
    # A stage never called cost nothing.
    assert way(classify_only, live_stages={"classify": live["classify"]}).in_calls_ms == {}
    # Stages serving one model on one hardware share its profile: the mean per call of them all.
    twice = spec.model_copy(
        update={"stages": [spec.stages[0], spec.stages[1].model_copy(update={"model": spec.stages[0].model})]}
    )
    uneven = {
        "detect": live["detect"],
        "classify": replace(live["classify"], router_cpu_ms=1.0, calls={1: (6.0, 1500)}),
    }
    assert way(offline, live_stages=uneven, pipeline=twice).in_calls_ms == pytest.approx(
        {"detect": 0.875, "classify": 0.875}  # (500 * 0.5 + 1500 * 1.0) / 2000
    )
    # Where the share on the calls is not measured, all of the router's CPU is in the way.
    unmeasured = _live_at(plan, spec, 1.0, 500)
    assert way(classify_only, live_stages=unmeasured).beside["router"] == 0.004
    assert way(offline, live_stages=None).beside == {"load generator": 0.003, "router": 0.004}
    without_split = {"router": 0.004, "load generator": 0.003}
    assert way(offline, cpu=without_split).beside["router"] == 0.004
    assert way(every, cpu=without_split).beside == {"load generator": 0.003}  # all of it would be counted twice
    assert way(offline, cpu={"load generator": 0.003}).beside == {"load generator": 0.003}
    assert in_each_querys_way(measured, None, None, None, None).beside["router"] == 0.004  # no plan: all of it


def test_an_offline_estimate_puts_the_routers_work_on_each_call_in_the_calls(plan_path: Path) -> None:
    plan, spec, arrivals = load_plan(plan_path), load_spec(SPEC), load_trace(STEP)
    result = fake_replay(arrivals)
    local = Target("127.0.0.1:1", spec.name, plan, spec, None, "none", cores=2.0, router_pid=os.getpid())
    cpu = {"router": 0.004, "load generator": 0.001, "router outside its replicas": 0.001}

    def estimate(per_call_ms: float, target: Target = local) -> dict[str, Any]:
        live = _live_at(plan, spec, 1.0, 500, router_cpu_ms=per_call_ms)
        return results_for(target, result, arrivals, 0.0, cpu_s_per_query=cpu, live=live)

    none, some = estimate(0.0), estimate(2.0)
    assert some["estimate"].endswith(
        ", the router's own work on each call in place of the profiler client's (detect 2.00 ms, classify 2.00 ms)"
    )
    assert "and the router outside its replicas (1.00 ms CPU per query" in some["estimate"]
    assert some["estimated_p99_ms"] > none["estimated_p99_ms"]
    longer = {m: with_router_work_per_call(p, "cpu", 2.0) for m, p in load_profiles(plan.profiles).items()}
    expected = predicted_latencies_ms(
        spec, longer, plan_catalog(plan), plan, arrivals, cores=2.0, background_s=(0.001, 0.001)
    )
    assert some["estimated_p99_ms"] == pytest.approx(p99(expected), abs=5e-4)  # results round to the µs
    # The calibrated estimate from the run is not changed by it: its call times hold that work.
    assert some["estimated_from_run_p99_ms"] == pytest.approx(none["estimated_from_run_p99_ms"])
    # A tuned run's closed loop takes it too.
    tuned = replace(local, tuner="inferline")
    tuned_some = estimate(2.0, tuned)
    assert tuned_some["estimate"].startswith("closed-loop tuner inferline")
    assert tuned_some["estimate"].endswith("(detect 2.00 ms, classify 2.00 ms)")
    assert tuned_some["estimated_p99_ms"] > estimate(0.0, tuned)["estimated_p99_ms"]


def test_the_routers_work_goes_in_each_of_a_models_profiles_by_hardware(plan_path: Path) -> None:
    """Two stages serving one model on two kinds of hardware: each hardware's calls get their own."""
    plan, spec = load_plan(plan_path), load_spec(SPEC)
    doc = {"batch_size": 1, "latency_ms": {"mean": 10.0, "server_cpu_ms": 4.0}}
    profile = parse_profile({"model": "m", "profiles": {"a": [doc], "b": [doc]}}, "test")
    both = spec.model_copy(update={"stages": tuple(s.model_copy(update={"model": "m"}) for s in spec.stages)})
    on_two = plan.model_copy(
        update={"stages": {"detect": plan.stage("detect").model_copy(update={"hardware": "a"}),
                           "classify": plan.stage("classify").model_copy(update={"hardware": "b"})}}
    )  # fmt: skip
    out = with_router_work({"m": profile}, both, on_two, {"detect": 1.0, "classify": 2.0})["m"]
    assert [out.points(h)[0].latency_ms.mean for h in ("a", "b")] == [11.0, 12.0]
    assert [out.points(h)[0].latency_ms.server_cpu_ms for h in ("a", "b")] == [4.0, 4.0]  # not the server's
    assert with_router_work({}, both, on_two, {"detect": 1.0}) == {}  # no profile: the estimate says so


def test_the_routers_work_replaces_the_profiler_clients_own() -> None:
    """A profile timed from a client of its own holds that client's CPU on each call: the router's
    work goes in its place, never making a call shorter than profiled."""
    points = [
        {"batch_size": 1, "latency_ms": {"mean": 10.0, "p99": 12.0, "client_cpu_ms": 0.6}},
        {"batch_size": 4, "latency_ms": {"mean": 20.0, "client_cpu_ms": 0.9}},
        {"batch_size": 8, "latency_ms": {"mean": 30.0}},  # from before the client's CPU was recorded
    ]
    profile = parse_profile({"model": "m", "profiles": {"cpu": points}}, "test")
    out = with_router_work_per_call(profile, "cpu", 1.0).points("cpu")
    assert [p.latency_ms.mean for p in out] == pytest.approx([10.4, 20.1, 31.0])
    assert out[0].latency_ms.p99 == pytest.approx(12.4)
    assert all(p.latency_ms.client_cpu_ms is None for p in out)  # the calls no longer hold the client's work
    cheaper = with_router_work_per_call(profile, "cpu", 0.5).points("cpu")
    assert [p.latency_ms.mean for p in cheaper] == pytest.approx([10.0, 20.0, 30.5])


def test_a_local_run_estimated_from_its_own_service_times_counts_the_router_outside_its_replicas(
    plan_path: Path,
) -> None:
    """The run's calibrated profiles hold the router's replicas' work: only its part outside them
    goes in each query's way."""
    plan, spec, arrivals = load_plan(plan_path), load_spec(SPEC), load_trace(STEP)
    result = fake_replay(arrivals)
    local = Target("127.0.0.1:1", spec.name, plan, spec, None, "none", cores=2.0, router_pid=os.getpid())
    live = _live_at(plan, spec, 1.0, 500, router_cpu_ms=0.5)

    def from_run(router_s: float, outside_s: float) -> float:
        cpu = {"router": router_s, "load generator": 0.001, "router outside its replicas": outside_s}
        out = results_for(local, result, arrivals, 0.0, cpu_s_per_query=cpu, live=live)
        return float(out["estimated_from_run_p99_ms"])

    assert from_run(0.004, 0.001) == from_run(0.009, 0.001)  # the whole router's CPU does not count ...
    assert from_run(0.004, 0.004) > from_run(0.004, 0.001)  # ... its part outside its replicas does


# --- the estimate again from the run's own service times ------------------------------------------


def _live_at(
    plan: Any, spec: Any, factor: float, calls: int, router_cpu_ms: float | None = None
) -> dict[str, LiveStage]:
    """Per stage, `calls` batch-1 calls that took `factor` times the profile's mean, none after an idle
    spell, each costing the router `router_cpu_ms` of its own work (None: not measured)."""
    profiles = load_profiles(plan.profiles)
    out = {}
    for stage in spec.stages:
        point = profiles[stage.model].points(plan.stage(stage.name).hardware)[0]
        calls_at = {point.batch_size: (factor * point.latency_ms.mean, calls)}
        out[stage.name] = LiveStage(calls_at, 0.0, 0, idle_gaps={}, router_cpu_ms=router_cpu_ms)
    return out


def test_a_static_run_is_estimated_again_from_its_own_service_times(plan_path: Path) -> None:
    plan, spec, arrivals = load_plan(plan_path), load_spec(SPEC), load_trace(STEP)
    result = fake_replay(arrivals)
    static = Target("127.0.0.1:1", spec.name, plan, spec, None, "none")
    as_profiled = results_for(static, result, arrivals, 0.0, live=_live_at(plan, spec, 1.0, 500))
    # Calls as long as profiled: the profiles' estimate again.
    assert as_profiled["estimated_from_run_p99_ms"] == pytest.approx(as_profiled["estimated_p99_ms"], rel=1e-3)
    slower = results_for(static, result, arrivals, 0.0, live=_live_at(plan, spec, 1.5, 500))
    assert slower["estimated_from_run_p99_ms"] > 1.3 * slower["estimated_p99_ms"]
    assert slower["estimated_p99_ms"] == as_profiled["estimated_p99_ms"]  # the profiles' estimate stays
    # Too few calls to calibrate from, or no router metrics: none.
    few = results_for(static, result, arrivals, 0.0, live=_live_at(plan, spec, 1.5, 3))
    assert few["estimated_from_run_p99_ms"] is None
    assert results_for(static, result, arrivals, 0.0)["estimated_from_run_p99_ms"] is None
    # A tuned run: closed-loop again, with the same tuner and start-up.
    tuned = Target("127.0.0.1:1", spec.name, plan, spec, None, "inferline")
    same = results_for(tuned, result, arrivals, 0.0, live=_live_at(plan, spec, 1.0, 500))
    assert same["estimate"].startswith("closed-loop tuner inferline")
    assert same["estimated_from_run_p99_ms"] == pytest.approx(same["estimated_p99_ms"], rel=1e-3)
    slow = results_for(tuned, result, arrivals, 0.0, live=_live_at(plan, spec, 1.5, 500))
    assert slow["estimated_from_run_p99_ms"] > 1.3 * slow["estimated_p99_ms"]


def _with_queue_waits(live: dict[str, LiveStage], seconds: float) -> dict[str, LiveStage]:
    return {name: replace(stage, queue_wait_s=seconds) for name, stage in live.items()}


def test_the_time_outside_the_stages_measured_in_a_run_is_added_where_the_simulation_lacks_it(
    plan_path: Path,
) -> None:
    """Every query took 50 ms; the router counted part of that in its stages' queues and calls.
    The rest, outside the stages, goes into both estimates, less what the simulation has there."""
    plan, spec, arrivals = load_plan(plan_path), load_spec(SPEC), load_trace(STEP)
    result = fake_replay(arrivals)
    live = _live_at(plan, spec, 1.0, 500)
    in_calls_ms = sum(n * ms * c for stage in live.values() for n, (ms, c) in stage.calls.items())
    waits_s = 20.0 * arrivals.size / 1000 / 2  # 10 ms per query in each of two queues
    expected = 50.0 - (in_calls_ms + 2000 * waits_s) / arrivals.size
    assert 0 < expected < 50

    # Each replica on its own hardware: the simulation has nothing outside the stages, so all of it.
    static = Target("127.0.0.1:1", spec.name, plan, spec, None, "none")
    without = results_for(static, result, arrivals, 0.0, live=live)
    measured = results_for(static, result, arrivals, 0.0, live=_with_queue_waits(live, waits_s))
    assert without["outside_stages_ms"] is None  # the router's metrics lack the queue waits
    assert measured["outside_stages_ms"] == pytest.approx(expected, abs=1e-3)
    assert measured["estimated_p99_ms"] - without["estimated_p99_ms"] == pytest.approx(expected, abs=2e-3)
    assert measured["estimated_from_run_p99_ms"] - without["estimated_from_run_p99_ms"] == pytest.approx(
        expected, abs=2e-3
    )
    assert measured["estimated_slo_miss_rate"] >= without["estimated_slo_miss_rate"]
    assert f"and {expected:.2f} ms per query outside the stages added to each" in measured["estimate"]
    assert measured["estimated_outside_added_ms"] == pytest.approx(expected, abs=1e-3)
    assert without["estimated_outside_added_ms"] is None

    # Sharing cores, the load generator and the router are in each query's way: only the rest is added.
    local = Target("127.0.0.1:1", spec.name, plan, spec, None, "none", cores=2.0, router_pid=os.getpid())
    cpu = {"router": 0.004, "load generator": 0.001, "router outside its replicas": 0.001}
    shared_without = results_for(local, result, arrivals, 0.0, cpu_s_per_query=cpu, live=live)
    shared = results_for(local, result, arrivals, 0.0, cpu_s_per_query=cpu, live=_with_queue_waits(live, waits_s))
    simulated = float(shared["estimate"].split("simulated ")[1].split(" ms")[0])
    assert simulated >= 2.0  # at least the two processes' CPU per query
    added = shared["estimated_p99_ms"] - shared_without["estimated_p99_ms"]
    assert added == pytest.approx(expected - simulated, abs=0.02)
    assert shared["estimated_outside_added_ms"] == pytest.approx(added, abs=1e-3)
    # Queue waits that leave less outside than the simulation has: nothing is taken away.
    crowded = _with_queue_waits(live, waits_s + 0.5 * expected * arrivals.size / 1000)
    less = results_for(local, result, arrivals, 0.0, cpu_s_per_query=cpu, live=crowded)
    assert less["outside_stages_ms"] < simulated
    assert less["estimated_p99_ms"] == shared_without["estimated_p99_ms"]
    assert "and 0.00 ms per query outside the stages added" in less["estimate"]


def test_a_profile_missing_for_the_estimate_from_the_run_leaves_the_results_standing(
    plan_path: Path, tmp_path: Path
) -> None:
    import shutil

    plan, spec, arrivals = load_plan(plan_path), load_spec(SPEC), load_trace(STEP)
    profiles = tmp_path / "profiles"
    shutil.copytree(str(plan.profiles), profiles)
    (profiles / f"{spec.stages[-1].model}.json").unlink()
    lacking = plan.model_copy(update={"profiles": str(profiles)})
    target = Target("127.0.0.1:1", spec.name, lacking, spec, None, "none")
    results = results_for(target, fake_replay(arrivals), arrivals, 0.0, live=_live_at(plan, spec, 1.0, 500))
    assert results["estimated_from_run_p99_ms"] is None
    assert results["p99_ms"] == pytest.approx(50.0) and results["estimate"].startswith("none: ")
    # A local run with the router's work per call to add to the missing profile: the same.
    local = replace(target, cores=2.0, router_pid=os.getpid())
    live = _live_at(plan, spec, 1.0, 500, router_cpu_ms=0.5)
    cpu = {"router": 0.002, "load generator": 0.001, "router outside its replicas": 0.001}
    measured = results_for(local, fake_replay(arrivals), arrivals, 0.0, cpu_s_per_query=cpu, live=live)
    assert measured["estimate"].startswith("none: ") and "has no profile" in measured["estimate"]
    assert measured["p99_ms"] == pytest.approx(50.0)


def test_drift_is_named_only_where_the_runs_own_estimate_holds_and_the_profiles_do_not() -> None:
    assert drifted(120.0, 95.0, 100.0)  # profiles 20% off, the run's own 5%
    assert not drifted(105.0, 95.0, 100.0)  # the profiles' estimate holds
    assert not drifted(120.0, 130.0, 100.0)  # both miss: the estimator's model, not drift
    assert not drifted(None, 95.0, 100.0) and not drifted(120.0, 95.0, None)


@pytest.mark.parametrize(("errors", "hint"), [(0, True), (3, False)])
def test_the_replay_table_names_drift_only_after_a_run_without_errors(errors: int, hint: bool) -> None:
    from inferline.replay_command import replay_table

    results = {
        "sent": 100, "answered": 100 - errors, "errors": errors, "throughput_qps": 50.0, "p99_ms": 100.0,
        "estimated_p99_ms": 120.0, "estimated_from_run_p99_ms": 95.0, "slo_miss_rate": 0.0, "cost_per_hour": 0.1,
        "estimate": "static plan",
    }  # fmt: skip
    caption = str(replay_table("p", results).caption)
    assert "this run's own service times: P99 95.0 ms" in caption
    assert ("`inferline calibrate` rewrites them" in caption) is hint


@pytest.mark.parametrize(("stolen", "said"), [(None, False), (0.01, False), (0.12, True)])
def test_the_replay_table_says_when_the_hypervisor_took_the_machines_cpu(stolen: float | None, said: bool) -> None:
    from inferline.replay_command import replay_table

    results = {
        "sent": 100, "answered": 100, "errors": 0, "throughput_qps": 50.0, "p99_ms": 100.0,
        "estimated_p99_ms": 100.0, "slo_miss_rate": 0.0, "cost_per_hour": 0.1, "estimate": "static plan",
        "machine_stolen": stolen,
    }  # fmt: skip
    caption = str(replay_table("p", results).caption)
    assert ("the hypervisor gave 12.0% of this machine's CPU to others during the run" in caption) is said


def test_the_share_of_the_machine_its_hypervisor_took_between_two_readings() -> None:
    from inferline.process_cpu import MachineCpu
    from inferline.replay_command import CpuReading

    before = CpuReading(None, 0.0, machine=MachineCpu(steal_s=5.0, all_s=100.0))
    assert before.stolen_share(CpuReading(None, 0.0, machine=MachineCpu(7.0, 140.0))) == pytest.approx(0.05)
    assert before.stolen_share(CpuReading(None, 0.0)) is None  # not known
    assert before.stolen_share(CpuReading(None, 0.0, machine=MachineCpu(5.0, 100.0))) is None  # no time passed


def test_metrics_out_is_checked_before_the_replay_and_written_after_it(tmp_path: Path) -> None:
    from inferline.errors import InferlineError
    from inferline.replay_command import Target, metrics_directory, save_router_metrics

    up = Target("127.0.0.1:1", "p", None, None, None, router_metrics="http://127.0.0.1:1/metrics")
    assert metrics_directory(None, up) is None
    a_file = tmp_path / "taken"
    a_file.write_text("")
    with pytest.raises(InferlineError, match="is a file"):
        metrics_directory(str(a_file), up)
    with pytest.raises(InferlineError, match="is a file"):
        metrics_directory(str(a_file / "under"), up)
    with pytest.raises(InferlineError, match="needs the router's metrics"):
        metrics_directory(str(tmp_path / "kept"), Target("127.0.0.1:1", "p", None, None, None))
    kept = metrics_directory(str(tmp_path / "kept" / "replay-1"), up)
    assert kept is not None and not kept.exists()  # made only once there is something to keep
    said = save_router_metrics(kept, "before\n", "after\n")
    assert (kept / "router-metrics-before.txt").read_text() == "before\n"
    assert (kept / "router-metrics-after.txt").read_text() == "after\n"
    assert f"--since {kept / 'router-metrics-before.txt'}" in said
    assert "none written" in save_router_metrics(tmp_path / "unread", "before\n", None)
    assert "could not be written" in save_router_metrics(a_file / "gone", "before\n", "after\n")  # said, not raised
    assert not (tmp_path / "unread").exists()
