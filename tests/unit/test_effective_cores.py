"""The effective cores of replicas sharing a machine, fitted to how crowding slowed their calls."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from inferline.calibration import LiveStage, calibrate_profiles, calibrated_cores, effective_cores, live_stages
from inferline.cli import main
from inferline.effective_cores import MIN_CALLS, CrowdedCalls, fit_cores
from inferline.planner.shared_cores import crowd_of, slowdown
from inferline.profiles import load_profiles
from tests.unit.test_calibration import METRICS, PAIR, _cpu_profile, _plan_for

CROWDS = (1.0, 1.5, 2.0, 2.5, 3.0)


def _calls(base_s: float, share: float, cores: float, calls: int = 200, noise: float = 0.0, seed: int = 0) -> dict:
    """Bins of calls whose mean time follows the sharing rule with `cores` (and a relative noise)."""
    rng = np.random.default_rng(seed)
    out = {}
    for k in CROWDS:
        mean = base_s * slowdown(share, crowd_of(share + (k - 1.0) * share, cores)) * (1 + noise * rng.normal())
        out[k] = (calls, calls * mean)
    return out


@pytest.mark.parametrize("cores", [1.0, 1.3, 1.5, 1.77, 2.0])
def test_the_fit_finds_the_cores_the_calls_were_slowed_by(cores: float) -> None:
    stages = [CrowdedCalls(1.0, _calls(0.002, 1.0, cores)), CrowdedCalls(1.0, _calls(0.0065, 1.0, cores))]
    fit = fit_cores(stages, mean_share=1.0, machine_cores=2.0)
    assert fit is not None
    assert fit.cores == pytest.approx(cores, abs=0.006)
    assert fit.error < 1e-6
    assert fit.calls == 2 * 200 * len(CROWDS)
    if cores < 1.9:
        assert fit.error_at_machine > 0.01  # with the machine's 2 the rule misses these calls


def test_noisy_calls_still_fit_near_their_cores() -> None:
    stages = [CrowdedCalls(1.0, _calls(0.003, 1.0, 1.5, noise=0.02, seed=s)) for s in range(3)]
    fit = fit_cores(stages, mean_share=1.0, machine_cores=2.0)
    assert fit is not None and abs(fit.cores - 1.5) < 0.15
    assert fit.error < fit.error_at_machine


def test_the_fit_never_exceeds_the_machine() -> None:
    roomy = [CrowdedCalls(1.0, _calls(0.002, 1.0, 8.0))]  # never slowed: as many cores as wanted
    fit = fit_cores(roomy, mean_share=1.0, machine_cores=2.0)
    assert fit is not None and fit.cores == 2.0 and fit.error == fit.error_at_machine


def test_calls_that_do_not_compute_fit_nothing() -> None:
    # Calls that sleep (a share of 0.05) never demand half a core: every core count fits alike.
    sleeping = [CrowdedCalls(0.05, _calls(0.01, 0.05, 1.0))]
    assert fit_cores(sleeping, mean_share=0.05, machine_cores=2.0) is None


def test_too_few_crowded_calls_fit_nothing() -> None:
    few = {1.0: (1000, 2.0), 2.0: (MIN_CALLS - 1, 0.2)}
    assert fit_cores([CrowdedCalls(1.0, few)], 1.0, 2.0) is None
    assert fit_cores([CrowdedCalls(1.0, {1.0: (1000, 2.0)})], 1.0, 2.0) is None  # one bin: no slope
    assert fit_cores([], 1.0, 2.0) is None


def test_live_stages_reads_the_crowded_calls() -> None:
    text = METRICS + (
        "# TYPE inferline_router_crowded_calls counter\n"
        'inferline_router_crowded_calls_total{stage="detect",under_way="1"} 30.0\n'
        'inferline_router_crowded_calls_total{stage="detect",under_way="2.5"} 10.0\n'
        "# TYPE inferline_router_crowded_call_seconds counter\n"
        'inferline_router_crowded_call_seconds_total{stage="detect",under_way="1"} 0.3\n'
        'inferline_router_crowded_call_seconds_total{stage="detect",under_way="2.5"} 0.2\n'
    )
    live = live_stages(text)
    assert dict(live["detect"].crowded) == {1.0: (30, 0.3), 2.5: (10, 0.2)}
    assert dict(live["classify"].crowded) == {}  # not in the metrics


def _crowded_live(cores: float) -> dict[str, LiveStage]:
    """PAIR's three stages with calls slowed by sharing `cores` cores (m: 10 ms alone, n: 5 ms)."""
    out = {}
    for stage, base in (("one", 0.010), ("two", 0.010), ("three", 0.005)):
        bins = _calls(base, 1.0, cores)
        calls = sum(n for n, _ in bins.values())
        mean_ms = 1000 * sum(s for _, s in bins.values()) / calls
        out[stage] = LiveStage({1: (mean_ms, calls)}, 0.0, 0, concurrency={2.0: calls}, crowded=bins)
    return out


def test_calibration_records_the_cores_it_took_out_and_estimates_read_them_back() -> None:
    profiles = {"m": _cpu_profile("m", {1: 10.0, 4: 16.0}, 1.0), "n": _cpu_profile("n", {1: 5.0, 4: 8.0}, 1.0)}
    plan = _plan_for(PAIR)
    live = _crowded_live(1.4)
    fit = effective_cores(PAIR, plan, profiles, live, 2.0)  # type: ignore[arg-type]
    assert fit is not None and fit.cores == pytest.approx(1.4, abs=0.006)
    out, _ = calibrate_profiles(PAIR, plan, profiles, live, cores=fit.cores)  # type: ignore[arg-type]
    assert calibrated_cores(PAIR, plan, out) == fit.cores  # type: ignore[arg-type]
    assert calibrated_cores(PAIR, plan, profiles) is None  # type: ignore[arg-type]  # offline profiles
    # Profiles calibrated at different times with different cores tell no one count.
    other, _ = calibrate_profiles(PAIR, plan, profiles, live, cores=1.9)  # type: ignore[arg-type]
    assert calibrated_cores(PAIR, plan, {"m": out["m"], "n": other["n"]}) is None  # type: ignore[arg-type]


def test_calibrate_fits_the_cores_and_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from inferline.profiles import write_profile

    profiles_dir = tmp_path / "profiles"
    for name, ms in (("m", 10.0), ("n", 5.0)):
        write_profile(_cpu_profile(name, {1: ms, 4: 1.6 * ms}, 1.0), profiles_dir)  # type: ignore[arg-type]
    spec_path = tmp_path / "pair.yaml"
    from inferline.spec import write_spec

    write_spec(PAIR, spec_path)
    plan = _plan_for(PAIR).model_copy(update={"spec": str(spec_path), "profiles": str(profiles_dir)})  # type: ignore[attr-defined]
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(plan.to_json())
    lines = []
    for stage, live in _crowded_live(1.4).items():
        ms, calls = live.calls[1]
        lines.append(f'inferline_router_call_seconds_count{{batch_size="1",stage="{stage}"}} {calls}')
        lines.append(f'inferline_router_call_seconds_sum{{batch_size="1",stage="{stage}"}} {ms * calls / 1000}')
        for k, (n, s) in live.crowded.items():
            lines.append(f'inferline_router_crowded_calls_total{{stage="{stage}",under_way="{k:g}"}} {n}')
            lines.append(f'inferline_router_crowded_call_seconds_total{{stage="{stage}",under_way="{k:g}"}} {s}')
    metrics = tmp_path / "metrics.txt"
    metrics.write_text("\n".join(lines) + "\n")
    out = tmp_path / "calibrated"
    argv = ["calibrate", str(plan_path), "--metrics", str(metrics), "--out", str(out), "--cores", "2"]
    assert main(argv) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "shared cores: 1.4 effective of the machine's 2" in printed
    assert calibrated_cores(PAIR, plan, load_profiles(out)) == pytest.approx(1.4, abs=0.006)  # type: ignore[arg-type]
    # Without the cores the replicas shared, nothing is fitted or recorded.
    assert main(["calibrate", str(plan_path), "--metrics", str(metrics), "--out", str(tmp_path / "plain")]) == 0
    assert "effective of the machine" not in " ".join(capsys.readouterr().out.split())
    assert calibrated_cores(PAIR, plan, load_profiles(tmp_path / "plain")) is None  # type: ignore[arg-type]


CASCADE = Path(__file__).resolve().parents[2] / "examples" / "pipelines" / "local-cascade.yaml"


@pytest.fixture(scope="module")
def cascade_plan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cascade (compute-bound models) planned on the bundled CPU profiles."""
    examples = CASCADE.parents[1]
    path = tmp_path_factory.mktemp("cascade") / "plan.json"
    argv = ["plan", str(CASCADE), "--profiles", str(examples / "profiles" / "measured-cpu")]
    argv += ["--hardware", str(examples / "catalog-local.yaml"), "--trace", "gamma:rate=60,cv=2,duration=30,seed=6"]
    assert main([*argv, "--out", str(path)]) == 0
    return path


def _cascade_live(plan: object, spec: object, cores: float | None) -> dict[str, LiveStage]:
    """Every stage's batch-1 calls at its profile's mean, slowed by crowding on `cores` cores (None:
    a router that did not bin its calls by crowding)."""
    profiles = load_profiles(plan.profiles)  # type: ignore[attr-defined]
    out = {}
    for stage in spec.stages:  # type: ignore[attr-defined]
        point = profiles[stage.model].points("cpu")[0]
        share = point.latency_ms.server_cpu_ms / point.latency_ms.mean
        bins = _calls(point.latency_ms.mean / 1000.0, share, cores) if cores is not None else {}
        calls = 200 * len(CROWDS)
        mean_ms = 1000 * sum(s for _, s in bins.values()) / calls if bins else point.latency_ms.mean
        out[stage.name] = LiveStage({1: (mean_ms, calls)}, 0.0, 0, idle_gaps={}, crowded=bins)
    return out


def test_a_local_runs_estimate_from_its_service_times_shares_the_fitted_cores(cascade_plan: Path) -> None:
    from inferline.plan import load_plan
    from inferline.replay_command import Target, results_for
    from inferline.spec import load_spec
    from inferline.traces import load_trace
    from tests.unit.test_startup import fake_replay

    plan = load_plan(cascade_plan)
    spec = load_spec(plan.spec)  # type: ignore[arg-type]
    arrivals = load_trace("gamma:rate=60,cv=2,duration=30,seed=6")
    local = Target("127.0.0.1:1", spec.name, plan, spec, None, "none", cores=2.0)
    crowded = _cascade_live(plan, spec, 1.3)
    fitted = results_for(local, fake_replay(arrivals), arrivals, 0.0, live=crowded)
    fit = effective_cores(spec, plan, load_profiles(plan.profiles), crowded, 2.0)  # type: ignore[arg-type]
    assert fit is not None and fit.cores < 1.5
    assert fitted["effective_cores"]["cores"] == fit.cores and fitted["effective_cores"]["of"] == 2.0
    # The same calls' means from a router that did not bin them: the machine's 2 cores, a lower estimate.
    unbinned = {s: LiveStage(v.calls, 0.0, 0, idle_gaps={}) for s, v in crowded.items()}
    plain = results_for(local, fake_replay(arrivals), arrivals, 0.0, live=unbinned)
    assert plain["effective_cores"] is None
    assert fitted["estimated_from_run_p99_ms"] > plain["estimated_from_run_p99_ms"]
    # Profiles calibrated with 1.4 effective cores: the estimate shares those, the run's fit is of the 2.
    calibrated = Target("127.0.0.1:1", spec.name, plan, spec, None, "none", cores=1.4, machine_cores=2.0)
    out = results_for(calibrated, fake_replay(arrivals), arrivals, 0.0, live=crowded)
    effective = "static plan, replicas sharing 1.4 cores (effective, of 2, as the profiles were calibrated)"
    assert out["estimate"] == effective
    assert out["estimated_p99_ms"] > fitted["estimated_p99_ms"]  # fewer cores than the machine's 2
    assert out["effective_cores"] == fitted["effective_cores"]


def test_replay_estimates_with_the_cores_its_profiles_were_calibrated_with(cascade_plan: Path, tmp_path: Path) -> None:
    import json

    from inferline.plan import load_plan
    from inferline.profiles import write_profile
    from inferline.replay_command import target_from
    from inferline.spec import load_spec

    plan = load_plan(cascade_plan)
    spec = load_spec(plan.spec)  # type: ignore[arg-type]
    profiles = load_profiles(plan.profiles)  # type: ignore[arg-type]
    live = _cascade_live(plan, spec, 1.3)
    calibrated, _ = calibrate_profiles(spec, plan, profiles, live, cores=1.37)
    for profile in calibrated.values():
        write_profile(profile, tmp_path / "calibrated")
    on_calibrated = tmp_path / "plan.json"
    on_calibrated.write_text(plan.model_copy(update={"profiles": str(tmp_path / "calibrated")}).to_json())
    state = tmp_path / "state"
    state.mkdir()
    up = {"endpoints": {"grpc": "127.0.0.1:1", "http": "127.0.0.1:2"}, "pipeline": spec.name, "cores": 2}
    (state / "up.json").write_text(json.dumps(up))
    target = target_from(str(state), None, str(on_calibrated), None)
    assert (target.cores, target.machine_cores, target.on_cores) == (1.37, 2, 2)  # a run's fit is bounded by 2
    assert target_from(str(state), None, str(on_calibrated), None, cores=2.0).cores == 2.0  # told: as told
    offline = target_from(str(state), None, str(cascade_plan), None)
    assert (offline.cores, offline.machine_cores) == (2, None)  # offline profiles: the machine's
    up["cores"] = 1
    (state / "up.json").write_text(json.dumps(up))
    assert target_from(str(state), None, str(on_calibrated), None).cores == 1  # never more than the machine's
