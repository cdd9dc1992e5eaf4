"""The `inferline` command, in-process (`main([...])`) and as a real subprocess."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from inferline.catalog import load_catalog
from inferline.cli import main
from inferline.errors import InferlineError, PlanError, SpecError, TraceError
from inferline.profiles import load_profiles
from inferline.spec import load_spec
from inferline.traces import load_trace

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
PIPELINES = sorted((EXAMPLES / "pipelines").glob("*.yaml"))
VIDEO = str(EXAMPLES / "pipelines" / "video-monitoring.yaml")
IMAGE = str(EXAMPLES / "pipelines" / "image-processing.yaml")
PROFILES = str(EXAMPLES / "profiles" / "representative")
CATALOG = str(EXAMPLES / "catalog.yaml")
TRACE = "gamma:rate=100,cv=2,duration=60,seed=1"
SIM_TRACE = "gamma:rate=100,cv=2,duration=30,seed=2"

PLAN_KEYS = {"pipeline", "slo_ms", "strategy", "cost_per_hour", "estimated_p99_ms", "feasible", "stages"}
RUN_KEYS = {"queries", "p99_ms", "slo_ms", "slo_miss_rate", "cost", "cost_per_hour", "decisions"}

# The baseline autoscalers are written separately; test every tuner whose module exists.
_BASELINE_MODULES = {
    "autoscale": "inferline.planner.tuning.autoscale",
    "ray": "inferline.planner.tuning.ray_serve",
    "kpa": "inferline.planner.tuning.kpa",
}
TUNERS = ["none", "inferline"] + [t for t, mod in _BASELINE_MODULES.items() if importlib.util.find_spec(mod)]


def plan_args(spec: str = VIDEO, *extra: str, trace: str = TRACE) -> list[str]:
    return ["plan", spec, "--profiles", PROFILES, "--hardware", CATALOG, "--trace", trace, *extra]


def run_json(capsys: pytest.CaptureFixture[str], argv: list[str], code: int = 0) -> dict[str, Any]:
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == code, err
    data = json.loads(out)
    assert isinstance(data, dict)
    return data


def error_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run a command that must fail with a user error: exit 2, exactly one line on stderr."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("inferline: error: ")
    assert err.endswith("\n")
    return lines[0]


@pytest.fixture(scope="module")
def video_plan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("plan") / "video.json"
    assert main([*plan_args(VIDEO), "--out", str(path)]) == 0
    return path


@pytest.fixture
def a_file(tmp_path: Path) -> Path:
    """An existing file where a command wants a folder."""
    taken = tmp_path / "taken"
    taken.write_text("")
    return taken


def edited_plan(src: Path, dst: Path, **changes: Any) -> str:
    data = json.loads(src.read_text())
    for key, value in changes.items():
        if key == "stage_batch":
            stage, batch = value
            data["stages"][stage]["max_batch_size"] = batch
        else:
            data[key] = value
    dst.write_text(json.dumps(data))
    return str(dst)


# --- plan ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec_path", PIPELINES, ids=lambda p: p.stem)
def test_plan_json_for_each_example(capsys: pytest.CaptureFixture[str], spec_path: Path) -> None:
    args = plan_args(str(spec_path))
    if spec_path.stem.startswith("local-"):  # the embedded default's pipelines: measured CPU profiles
        local = [
            "--profiles",
            str(EXAMPLES / "profiles" / "measured-cpu"),
            "--hardware",
            str(EXAMPLES / "catalog-local.yaml"),
        ]
        args = [*args[:2], *local, *args[6:]]
    rc = main([*args, "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert err == ""
    plan = json.loads(out)
    spec = load_spec(spec_path)
    assert set(plan) >= PLAN_KEYS
    assert plan["pipeline"] == spec.name
    assert plan["slo_ms"] == spec.slo_ms
    assert plan["strategy"] == "inferline"
    assert plan["feasible"] is True
    assert "reason" not in plan or plan["reason"] is None
    assert set(plan["stages"]) == set(spec.names)
    catalog = load_catalog(args[args.index("--hardware") + 1])
    profiles = load_profiles(args[args.index("--profiles") + 1])
    cost = 0.0
    for stage in spec.stages:
        sp = plan["stages"][stage.name]
        assert set(sp) >= {"hardware", "max_batch_size", "replicas"}
        assert sp["hardware"] in catalog.hardware
        assert sp["max_batch_size"] in profiles[stage.model].batch_sizes(sp["hardware"])
        assert isinstance(sp["replicas"], int) and sp["replicas"] >= 1
        cost += catalog.price(sp["hardware"]) * sp["replicas"]
    # One replica occupies one unit of its hardware.
    assert plan["cost_per_hour"] == pytest.approx(cost, rel=1e-6)
    assert 0 < plan["estimated_p99_ms"] <= plan["slo_ms"]


def test_plan_out_file_matches_stdout(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out_path = tmp_path / "plan.json"
    printed = run_json(capsys, [*plan_args(IMAGE), "--json", "--out", str(out_path)])
    assert json.loads(out_path.read_text()) == printed
    assert Path(printed["profiles"]) == Path(PROFILES).resolve()
    assert Path(printed["hardware_catalog"]) == Path(CATALOG).resolve()


def test_plan_table_without_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(plan_args(IMAGE)) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert "preprocess" in out and "classifier" in out


def test_plan_default_catalog_and_slo_override(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", IMAGE, "--profiles", PROFILES, "--trace", TRACE, "--slo-ms", "1000", "--json"]
    plan = run_json(capsys, argv)
    assert plan["slo_ms"] == 1000
    assert plan["feasible"] is True
    assert plan["estimated_p99_ms"] <= 1000
    assert "hardware_catalog" not in plan or plan["hardware_catalog"] is None


def test_looser_slo_is_not_more_expensive(capsys: pytest.CaptureFixture[str]) -> None:
    tight = run_json(capsys, [*plan_args(VIDEO), "--json"])
    loose = run_json(capsys, [*plan_args(VIDEO), "--slo-ms", "2000", "--json"])
    assert loose["cost_per_hour"] <= tight["cost_per_hour"] + 1e-9


@pytest.mark.parametrize(
    "spec_path", [VIDEO, str(EXAMPLES / "pipelines" / "tf-cascade.yaml")], ids=["video", "cascade"]
)
def test_plan_cg_peak(capsys: pytest.CaptureFixture[str], spec_path: str) -> None:
    cg = run_json(capsys, [*plan_args(spec_path), "--strategy", "cg-peak", "--json"])
    assert cg["strategy"] == "cg-peak"
    assert cg["feasible"] is True
    assert cg["estimated_p99_ms"] <= cg["slo_ms"]
    stages = list(cg["stages"].values())
    assert set(cg["stages"]) == set(load_spec(spec_path).names)
    # Coarse-grained: the whole pipeline replicated as one unit on one hardware type.
    assert len({s["hardware"] for s in stages}) == 1
    assert len({s["replicas"] for s in stages}) == 1
    price = load_catalog(CATALOG).price(stages[0]["hardware"])
    assert cg["cost_per_hour"] == pytest.approx(price * stages[0]["replicas"] * len(stages), rel=1e-6)
    fine = run_json(capsys, [*plan_args(spec_path), "--json"])
    assert fine["cost_per_hour"] <= cg["cost_per_hour"]


def test_infeasible_slo_json(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main([*plan_args(VIDEO), "--slo-ms", "1", "--json"])
    out, err = capsys.readouterr()
    assert rc == 1
    plan = json.loads(out)
    assert plan["feasible"] is False
    assert plan["reason"]
    assert plan["slo_ms"] == 1
    assert "1 ms" in plan["reason"]
    assert len(err.splitlines()) == 1
    assert "Traceback" not in err
    assert plan["reason"] in err


def test_infeasible_slo_without_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out_path = tmp_path / "p.json"
    rc = main([*plan_args(VIDEO), "--slo-ms", "1", "--out", str(out_path)])
    err = capsys.readouterr().err
    assert rc == 1
    assert len(err.splitlines()) == 1
    assert err.startswith("inferline: ")
    assert json.loads(out_path.read_text())["feasible"] is False


# --- simulate ------------------------------------------------------------------------------------


@pytest.mark.parametrize("tuner", TUNERS)
def test_simulate_each_tuner(capsys: pytest.CaptureFixture[str], video_plan: Path, tuner: str) -> None:
    argv = ["simulate", VIDEO, "--plan", str(video_plan), "--trace", SIM_TRACE, "--tuner", tuner, "--json"]
    res = run_json(capsys, argv)
    plan = json.loads(video_plan.read_text())
    assert set(res) >= RUN_KEYS
    assert res["queries"] == load_trace(SIM_TRACE).size
    assert res["slo_ms"] == plan["slo_ms"]
    assert 0.0 <= res["slo_miss_rate"] <= 1.0
    assert res["p99_ms"] > 0
    assert res["cost"] >= 0 and res["cost_per_hour"] > 0
    assert isinstance(res["decisions"], list)
    for d in res["decisions"]:
        assert {"time_s", "stage", "replicas", "reason"} <= set(d)
        assert d["stage"] in plan["stages"]
        assert d["replicas"] >= 1
    if "duration_s" in res:
        assert res["cost"] == pytest.approx(res["cost_per_hour"] * res["duration_s"] / 3600, rel=0.02)
    if tuner == "none":
        assert res["decisions"] == []
        assert res["cost_per_hour"] == pytest.approx(plan["cost_per_hour"])


def test_simulate_is_deterministic(capsys: pytest.CaptureFixture[str], video_plan: Path) -> None:
    argv = ["simulate", VIDEO, "--plan", str(video_plan), "--trace", SIM_TRACE, "--tuner", "none", "--json"]
    assert run_json(capsys, argv) == run_json(capsys, argv)


def test_simulate_with_the_replicas_sharing_cores(capsys: pytest.CaptureFixture[str], video_plan: Path) -> None:
    argv = ["simulate", VIDEO, "--plan", str(video_plan), "--trace", SIM_TRACE, "--tuner", "inferline", "--json"]
    own = run_json(capsys, argv)
    roomy = run_json(capsys, [*argv, "--cores", "1000"])
    scarce = run_json(capsys, [*argv, "--cores", "2"])
    assert "cores" not in own and roomy["cores"] == 1000 and scarce["cores"] == 2
    assert roomy["p99_ms"] == own["p99_ms"]  # never crowded: the same run
    assert scarce["p99_ms"] > own["p99_ms"]
    line = error_line(capsys, [*argv, "--cores", "0"])
    assert "--cores must be positive, got 0" in line


def test_simulate_table_and_plot(capsys: pytest.CaptureFixture[str], video_plan: Path, tmp_path: Path) -> None:
    png = tmp_path / "out.png"
    argv = ["simulate", VIDEO, "--plan", str(video_plan), "--trace", SIM_TRACE, "--tuner", "inferline"]
    assert main([*argv, "--plot", str(png)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.strip()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 1000


def test_simulate_with_explicit_profiles_and_hardware(capsys: pytest.CaptureFixture[str], video_plan: Path) -> None:
    argv = ["simulate", VIDEO, "--plan", str(video_plan), "--trace", SIM_TRACE, "--tuner", "none", "--json"]
    res = run_json(capsys, [*argv, "--profiles", PROFILES, "--hardware", CATALOG])
    assert res["queries"] == load_trace(SIM_TRACE).size


# --- user errors: exit 2, one line, no traceback -------------------------------------------------


def test_missing_spec_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    line = error_line(capsys, plan_args(str(tmp_path / "nope.yaml")))
    assert "nope.yaml" in line


def test_spec_with_a_cycle(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "cycle.yaml"
    path.write_text(
        "name: c\nslo_ms: 300\nstages:\n"
        "  - {name: a, model: yolo, after: [b]}\n"
        "  - {name: b, model: resnet50, after: [a]}\n"
    )
    line = error_line(capsys, plan_args(str(path)))
    assert "cycle" in line and "'a'" in line and "'b'" in line


def test_spec_without_slo_needs_slo_ms(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "noslo.yaml"
    path.write_text("name: n\nstages:\n  - {name: a, model: yolo}\n")
    line = error_line(capsys, [*plan_args(str(path))])
    assert "slo_ms" in line
    assert run_json(capsys, [*plan_args(str(path)), "--slo-ms", "500", "--json"])["slo_ms"] == 500


def test_non_positive_slo_override(capsys: pytest.CaptureFixture[str]) -> None:
    assert "slo" in error_line(capsys, [*plan_args(VIDEO), "--slo-ms", "-5"]).lower()


@pytest.mark.parametrize(
    "trace", ["gamma:rate=0,duration=10", "gamma:rate=10", "step:rate=1/2/3,cv=1/2,every=5", "no-such-trace.txt"]
)
def test_bad_trace(capsys: pytest.CaptureFixture[str], trace: str) -> None:
    error_line(capsys, plan_args(VIDEO, trace=trace))


@pytest.mark.parametrize(
    ("times", "message"),
    [
        ("1\n1\n", "2 arrivals within 0 s, over 1e+06 a second"),  # planning it never ended
        ("0\n1e-300\n", "over 1e+06 a second"),
        ("0\n1\n1e300\n", "(1e+300 s) is past 1e+07 s"),  # simulating it never ended
    ],
)
def test_a_trace_file_that_could_not_be_simulated_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, times: str, message: str
) -> None:
    trace = tmp_path / "t.txt"
    trace.write_text(times)
    assert message in error_line(capsys, plan_args(VIDEO, trace=str(trace)))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--trace", "gamma:rate=50,cv=1e300,duration=10"], "cv=1e+300 is outside 0.01 to 100"),
        (["--slo-ms", "nan"], "--slo-ms must be a positive finite number"),
        (["--slo-ms", "inf"], "--slo-ms must be a positive finite number"),
    ],
)
def test_extreme_numbers_are_one_line(capsys: pytest.CaptureFixture[str], extra: list[str], message: str) -> None:
    assert message in error_line(capsys, [*plan_args(VIDEO), *extra])


def test_an_infinite_slo_or_price_is_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # Accepted before, they wrote plans holding `Infinity`, which is not JSON.
    spec = tmp_path / "spec.yaml"
    spec.write_text(Path(VIDEO).read_text().replace("slo_ms: 400", "slo_ms: .inf", 1))
    assert "finite number" in error_line(capsys, plan_args(str(spec)))
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text("hardware:\n  cpu: {price_per_hour: .inf}\n")
    argv = ["plan", VIDEO, "--profiles", PROFILES, "--hardware", str(catalog), "--trace", TRACE]
    assert "finite number" in error_line(capsys, argv)


def test_unreadable_input_files_are_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(bytes(range(256)))
    assert "is not UTF-8 text" in error_line(capsys, plan_args(str(binary)))
    deep = tmp_path / "deep.yaml"
    deep.write_text("stages: " + "[" * 5000 + "]" * 5000)
    assert "nests too deeply" in error_line(capsys, plan_args(str(deep)))
    plan = tmp_path / "deep.json"
    plan.write_text("[" * 100_000 + "]" * 100_000)
    assert "is not readable JSON" in error_line(capsys, ["simulate", VIDEO, "--plan", str(plan), "--trace", SIM_TRACE])
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "yolo.json").write_bytes(bytes(range(256)))
    argv = ["plan", VIDEO, "--profiles", str(profiles), "--hardware", CATALOG, "--trace", TRACE]
    assert "is not readable JSON" in error_line(capsys, argv)


def test_simulate_refuses_a_negative_seed_and_an_absurd_tick(
    capsys: pytest.CaptureFixture[str], video_plan: Path
) -> None:
    argv = ["simulate", VIDEO, "--plan", str(video_plan), "--trace", SIM_TRACE]
    assert "--seed must be 0 or more" in error_line(capsys, [*argv, "--seed", "-1"])
    for tick in ("1e-9", "nan", "1e308"):
        assert "--tick-s must be 0.001 to 3600" in error_line(capsys, [*argv, "--tick-s", tick])


def test_a_plan_or_profile_past_the_size_limits_is_one_line(
    capsys: pytest.CaptureFixture[str], video_plan: Path, tmp_path: Path
) -> None:
    for field, value in (("replicas", 10**9), ("max_batch_size", 10**9)):
        doc = json.loads(video_plan.read_text())
        next(iter(doc["stages"].values()))[field] = value
        edited = tmp_path / f"{field}.json"
        edited.write_text(json.dumps(doc))
        line = error_line(capsys, ["simulate", VIDEO, "--plan", str(edited), "--trace", SIM_TRACE])
        assert "less than or equal to" in line


def test_bad_trace_in_simulate(capsys: pytest.CaptureFixture[str], video_plan: Path) -> None:
    error_line(capsys, ["simulate", VIDEO, "--plan", str(video_plan), "--trace", "gamma:rate=-1,duration=5"])


def test_missing_profiles_dir(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    argv = ["plan", VIDEO, "--profiles", str(tmp_path / "none"), "--trace", TRACE]
    assert "none" in error_line(capsys, argv)


def test_profile_dir_lacking_a_model(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    for src in Path(PROFILES).glob("*.json"):
        if src.stem != "alpr":
            (tmp_path / src.name).write_text(src.read_text())
    line = error_line(capsys, ["plan", VIDEO, "--profiles", str(tmp_path), "--trace", TRACE])
    assert "'alpr'" in line


def test_missing_hardware_catalog(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    argv = ["plan", VIDEO, "--profiles", PROFILES, "--trace", TRACE, "--hardware", str(tmp_path / "cat.yaml")]
    assert "cat.yaml" in error_line(capsys, argv)


def test_plan_file_not_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    path.write_text("this is { not json\n")
    line = error_line(capsys, ["simulate", VIDEO, "--plan", str(path), "--trace", SIM_TRACE])
    assert "plan.json" in line and "JSON" in line


def test_plan_file_missing(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    line = error_line(capsys, ["simulate", VIDEO, "--plan", str(tmp_path / "gone.json"), "--trace", SIM_TRACE])
    assert "gone.json" in line


def test_plan_file_malformed(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"pipeline": "video-monitoring", "slo_ms": 300}))
    line = error_line(capsys, ["simulate", VIDEO, "--plan", str(path), "--trace", SIM_TRACE])
    assert "strategy" in line


def test_infeasible_plan_file(capsys: pytest.CaptureFixture[str], video_plan: Path, tmp_path: Path) -> None:
    path = edited_plan(video_plan, tmp_path / "p.json", feasible=False, reason="too tight")
    line = error_line(capsys, ["simulate", VIDEO, "--plan", path, "--trace", SIM_TRACE])
    assert "infeasible" in line and "too tight" in line


def test_plan_for_another_pipeline(capsys: pytest.CaptureFixture[str], video_plan: Path) -> None:
    line = error_line(capsys, ["simulate", IMAGE, "--plan", str(video_plan), "--trace", SIM_TRACE])
    assert "video-monitoring" in line and "image-processing" in line


def test_plan_missing_a_stage(capsys: pytest.CaptureFixture[str], video_plan: Path, tmp_path: Path) -> None:
    data = json.loads(video_plan.read_text())
    del data["stages"]["plate"]
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    assert "'plate'" in error_line(capsys, ["simulate", VIDEO, "--plan", str(path), "--trace", SIM_TRACE])


def test_plan_with_unprofiled_batch_size(capsys: pytest.CaptureFixture[str], video_plan: Path, tmp_path: Path) -> None:
    plan = json.loads(video_plan.read_text())
    hw = plan["stages"]["detect"]["hardware"]
    sizes = load_profiles(PROFILES)["yolo"].batch_sizes(hw)
    bad = next(b for b in range(2, 1000) if b not in sizes)
    path = edited_plan(video_plan, tmp_path / "p.json", stage_batch=("detect", bad))
    line = error_line(capsys, ["simulate", VIDEO, "--plan", path, "--trace", SIM_TRACE])
    assert "'detect'" in line and str(bad) in line


def test_plan_with_unknown_hardware(capsys: pytest.CaptureFixture[str], video_plan: Path, tmp_path: Path) -> None:
    data = json.loads(video_plan.read_text())
    data["stages"]["detect"]["hardware"] = "tpu"
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    line = error_line(capsys, ["simulate", VIDEO, "--plan", str(path), "--trace", SIM_TRACE])
    assert "'tpu'" in line


def test_plot_to_missing_directory(capsys: pytest.CaptureFixture[str], video_plan: Path, tmp_path: Path) -> None:
    png = tmp_path / "no" / "such" / "dir.png"
    argv = ["simulate", VIDEO, "--plan", str(video_plan), "--trace", SIM_TRACE, "--tuner", "none", "--plot", str(png)]
    assert "dir.png" in error_line(capsys, argv)


def test_plan_out_to_missing_directory(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    error_line(capsys, [*plan_args(IMAGE), "--out", str(tmp_path / "no" / "plan.json")])


def test_trace_that_is_a_directory(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    error_line(capsys, plan_args(IMAGE, trace=str(tmp_path)))


def test_unknown_tuner_is_an_argparse_error(capsys: pytest.CaptureFixture[str], video_plan: Path) -> None:
    with pytest.raises(SystemExit) as info:
        main(["simulate", VIDEO, "--plan", str(video_plan), "--trace", SIM_TRACE, "--tuner", "magic"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "magic" in err
    assert "Traceback" not in err


def test_unknown_strategy_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([*plan_args(VIDEO), "--strategy", "cheapest"])
    assert info.value.code == 2
    assert "cheapest" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "exc"),
    [
        (["plan", "/nonexistent/spec.yaml", "--profiles", PROFILES, "--trace", TRACE], SpecError),
        (plan_args(VIDEO, trace="gamma:rate=0,duration=1"), TraceError),
        (["simulate", VIDEO, "--plan", "/nonexistent/plan.json", "--trace", TRACE], PlanError),
    ],
    ids=["spec", "trace", "plan"],
)
def test_debug_env_raises(monkeypatch: pytest.MonkeyPatch, argv: list[str], exc: type[InferlineError]) -> None:
    monkeypatch.setenv("INFERLINE_DEBUG", "1")
    with pytest.raises(exc):
        main(argv)


# --- a real process ------------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    code = "import sys; from inferline.cli import main; sys.exit(main())"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, cwd=ROOT, check=False
    )


def test_subprocess_plan_then_simulate(tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    proc = run_cli(*plan_args(VIDEO), "--json", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["feasible"] is True and plan["pipeline"] == "video-monitoring"
    proc = run_cli("simulate", VIDEO, "--plan", str(out), "--trace", SIM_TRACE, "--tuner", "inferline", "--json")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert set(res) >= RUN_KEYS
    assert 0.0 <= res["slo_miss_rate"] <= 1.0


def test_replay_at_an_endpoint_without_a_pipeline_name_says_to_name_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # Nothing is sent: the name is needed before the first query.
    line = error_line(capsys, ["replay", "--trace", "gamma:rate=10,duration=1", "--endpoint", "127.0.0.1:1",
                               "--state-dir", str(tmp_path)])  # fmt: skip
    assert "the pipeline to call at 127.0.0.1:1 is not named" in line and "--pipeline NAME" in line


def test_replay_with_nothing_running_says_to_start_it(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    line = error_line(capsys, ["replay", "--trace", "gamma:rate=10,duration=1", "--state-dir", str(tmp_path)])
    assert "nothing is running from" in line and "inferline up PLAN" in line


@pytest.mark.parametrize("simulated", [True, False])
def test_demo_into_a_file_is_one_line_before_any_work(
    capsys: pytest.CaptureFixture[str], a_file: Path, simulated: bool
) -> None:
    line = error_line(capsys, ["demo", "--out", str(a_file), *(["--simulated"] if simulated else [])])
    assert "the demo's output folder" in line and "is a file" in line


def test_up_with_a_file_for_its_state_folder_is_one_line(
    capsys: pytest.CaptureFixture[str], video_plan: Path, a_file: Path
) -> None:
    line = error_line(capsys, ["up", str(video_plan), "--state-dir", str(a_file)])
    assert "state folder" in line and "is a file" in line


def test_replay_checks_its_results_file_before_sending(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # The address answers nothing: the results file is refused before the replay would find that out.
    argv = ["replay", "--trace", "gamma:rate=10,duration=1", "--endpoint", "127.0.0.1:1", "--pipeline", "p"]
    line = error_line(capsys, [*argv, "--out", str(tmp_path / "no" / "r.json")])
    assert "results file" in line and "its folder does not exist" in line


def test_outputs_are_refused_before_any_measuring(
    capsys: pytest.CaptureFixture[str], video_plan: Path, tmp_path: Path, a_file: Path
) -> None:
    # Each would start a model server, profile or simulate first; the path is refused before that.
    models = str(EXAMPLES / "models")
    profile = ["profile", "--embedded", models, "--models", "preprocess", "--hardware", "cpu", "--out", str(a_file)]
    line = error_line(capsys, profile)
    assert "--out folder" in line and "is a file" in line
    calibrate = ["calibrate", str(video_plan), "--metrics", str(a_file), "--out", str(a_file)]
    assert "--out folder" in error_line(capsys, calibrate)
    simulate = ["simulate", VIDEO, "--plan", str(video_plan), "--trace", SIM_TRACE, "--plot", str(tmp_path)]
    line = error_line(capsys, simulate)
    assert "plot" in line and "is a folder" in line
    lineage = ["lineage", VIDEO, "--embedded", models, "--write-spec", str(tmp_path / "no" / "spec.yaml")]
    assert "its folder does not exist" in error_line(capsys, lineage)


def test_subprocess_user_error_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "cycle.yaml"
    path.write_text("name: c\nslo_ms: 300\nstages:\n  - {name: a, model: yolo, after: [a]}\n")
    proc = run_cli(*plan_args(str(path)))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("inferline: error: ")
    assert proc.stdout == ""


def test_subprocess_infeasible_exits_1() -> None:
    proc = run_cli(*plan_args(VIDEO), "--slo-ms", "1", "--json")
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["feasible"] is False
    assert len(proc.stderr.splitlines()) == 1
