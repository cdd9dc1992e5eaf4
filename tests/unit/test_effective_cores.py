"""The effective cores of replicas sharing a machine, fitted to how crowding slowed their calls."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from inferline.calibration import LiveStage, calibrate_profiles, calibrated_cores, effective_cores, live_stages
from inferline.cli import main
from inferline.effective_cores import MIN_CALLS, CoreFit, CrowdedCalls, crowding_slowdown, fit_cores
from inferline.planner.shared_cores import crowd_of, slowdown
from inferline.profiles import load_profiles
from inferline.router.crowding import CallCrowding
from tests.unit.test_calibration import METRICS, PAIR, _cpu_profile, _plan_for

WORK_AT = {1.0: {1: 1.0}, 1.5: {1: 0.5, 2: 0.5}, 2.0: {2: 1.0}, 3.0: {3: 1.0}, 4.0: {2: 0.25, 4: 0.75}}
"""Groups of calls by mean crowd -> the share of a call's work done at each count of calls under way."""


def _calls(base_s: float, share: float, cores: float, calls: int = 200, noise: float = 0.0, seed: int = 0) -> dict:
    """Groups of calls whose seconds at each count follow the sharing rule with `cores` (every call
    beside them of the same share), with a relative noise."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, work_at in WORK_AT.items():
        seconds = {
            n: calls
            * base_s
            * w
            * slowdown(share, crowd_of(share + (n - 1) * share, cores))
            * (1 + noise * rng.normal())
            for n, w in work_at.items()
        }
        out[k] = (calls, seconds)
    return out


def _fluid_run(cores: float, seed: int = 0) -> dict[str, dict]:
    """Two stages' one-core calls (2 and 6.5 ms alone) arriving at random, run by exact processor
    sharing on `cores` cores and timed by the router's `CallCrowding` (a fake clock)."""
    rng = np.random.default_rng(seed)
    now = [0.0]
    crowding = CallCrowding(["a", "b"], clock=lambda: now[0])
    arrivals = np.cumsum(rng.exponential(0.006, 1500))  # 0.7 of a core of work: rarely 16 under way
    stages = rng.choice(["a", "b"], arrivals.size)
    active: list[list] = []  # [remaining work s, stage, token]
    i = 0
    while i < arrivals.size or active:
        rate = min(1.0, cores / len(active)) if active else 0.0
        finish = min((a[0] / rate for a in active), default=np.inf)
        arrive = arrivals[i] - now[0] if i < arrivals.size else np.inf
        step = min(finish, arrive)
        for a in active:
            a[0] -= step * rate
        now[0] += step
        if finish <= arrive:
            done = min(active, key=lambda a: a[0])
            active.remove(done)
            crowding.ended(done[1], done[2])
        else:
            stage = str(stages[i])
            active.append([0.002 if stage == "a" else 0.0065, stage, crowding.started()])
            i += 1
    return {s: {k: (g.calls, dict(g.seconds_at)) for k, g in crowding.counts(s).items()} for s in ("a", "b")}


@pytest.mark.parametrize("cores", [1.0, 1.3, 1.5, 1.77, 2.0])
def test_the_fit_finds_the_cores_the_calls_were_slowed_by(cores: float) -> None:
    stages = [CrowdedCalls(1.0, _calls(0.002, 1.0, cores)), CrowdedCalls(1.0, _calls(0.0065, 1.0, cores))]
    fit = fit_cores(stages, mean_share=1.0, machine_cores=3.0)
    assert fit is not None
    assert fit.cores == pytest.approx(cores, abs=0.006) and fit.of == 3.0
    assert fit.error < 1e-6
    assert fit.calls == 2 * 200 * len(WORK_AT)
    assert fit.error_at_machine > 0.01  # with the machine's 3 the rule misses these calls


@pytest.mark.parametrize("cores", [1.2, 1.5, 2.0])
def test_calls_timed_by_the_router_under_exact_sharing_fit_the_cores_they_shared(cores: float) -> None:
    run = _fluid_run(cores)
    fit = fit_cores([CrowdedCalls(1.0, run["a"]), CrowdedCalls(1.0, run["b"])], mean_share=1.0, machine_cores=4.0)
    assert fit is not None and fit.cores == pytest.approx(cores, abs=0.02)
    assert fit.error < 0.01


def test_noisy_calls_still_fit_near_their_cores() -> None:
    stages = [CrowdedCalls(1.0, _calls(0.003, 1.0, 1.5, noise=0.02, seed=s)) for s in range(3)]
    fit = fit_cores(stages, mean_share=1.0, machine_cores=2.0)
    assert fit is not None and abs(fit.cores - 1.5) < 0.15
    assert fit.error < fit.error_at_machine


def test_calls_never_slowed_fit_the_machines_cores() -> None:
    # Calls crowded up to 4 with as many cores as they wanted: every count from 4 up fits alike.
    roomy = [CrowdedCalls(1.0, _calls(0.002, 1.0, 8.0))]
    fit = fit_cores(roomy, mean_share=1.0, machine_cores=6.0)
    assert fit is not None and fit.cores == 6.0 and fit.error == fit.error_at_machine < 1e-9
    half = [CrowdedCalls(0.5, _calls(0.002, 0.5, 8.0))]  # demand 0.5 + 3 x 0.5 = 2 at the most
    fit = fit_cores(half, mean_share=0.5, machine_cores=4.0)
    assert fit is not None and fit.cores == 4.0


def test_calls_that_do_not_compute_fit_nothing() -> None:
    # Calls that sleep (a share of 0.05) never demand a core: every core count fits alike.
    sleeping = [CrowdedCalls(0.05, _calls(0.01, 0.05, 1.0))]
    assert fit_cores(sleeping, mean_share=0.05, machine_cores=2.0) is None


def test_too_few_crowded_calls_fit_nothing() -> None:
    few = {1.0: (1000, {1: 2.0}), 2.0: (MIN_CALLS - 1, {2: 0.2})}
    assert fit_cores([CrowdedCalls(1.0, few)], 1.0, 2.0) is None
    assert fit_cores([CrowdedCalls(1.0, {1.0: (1000, {1: 2.0})})], 1.0, 2.0) is None  # one group: no slope
    assert fit_cores([], 1.0, 2.0) is None


def test_the_slowdown_over_calls_is_their_seconds_over_their_work() -> None:
    calls = CrowdedCalls(1.0, {1.0: (10, {1: 0.1}), 3.0: (10, {3: 0.3})})
    # On 1.5 cores: 0.1 s alone is 0.1 s of work; 0.3 s with 3 under way (each at half speed) is 0.15.
    assert crowding_slowdown(calls, 1.0, 1.5) == pytest.approx(0.4 / 0.25)
    assert crowding_slowdown(calls, 1.0, 4.0) == pytest.approx(1.0)
    assert crowding_slowdown(CrowdedCalls(1.0, {}), 1.0, 2.0) is None


def test_live_stages_reads_the_crowded_calls() -> None:
    text = METRICS + (
        "# TYPE inferline_router_crowded_calls counter\n"
        'inferline_router_crowded_calls_total{stage="detect",mean_under_way="1"} 30.0\n'
        'inferline_router_crowded_calls_total{stage="detect",mean_under_way="2.5"} 10.0\n'
        "# TYPE inferline_router_crowded_call_seconds counter\n"
        'inferline_router_crowded_call_seconds_total{stage="detect",mean_under_way="1",under_way="1"} 0.3\n'
        'inferline_router_crowded_call_seconds_total{stage="detect",mean_under_way="2.5",under_way="2"} 0.1\n'
        'inferline_router_crowded_call_seconds_total{stage="detect",mean_under_way="2.5",under_way="3"} 0.1\n'
    )
    live = live_stages(text)
    assert dict(live["detect"].crowded) == {1.0: (30, {1: 0.3}), 2.5: (10, {2: 0.1, 3: 0.1})}
    assert dict(live["classify"].crowded) == {}  # not in the metrics


def _crowded_live(cores: float) -> dict[str, LiveStage]:
    """PAIR's three stages with calls slowed by sharing `cores` cores (m: 10 ms alone, n: 5 ms)."""
    out = {}
    for stage, base in (("one", 0.010), ("two", 0.010), ("three", 0.005)):
        groups = _calls(base, 1.0, cores)
        calls = sum(n for n, _ in groups.values())
        mean_ms = 1000 * sum(sum(at.values()) for _, at in groups.values()) / calls
        out[stage] = LiveStage({1: (mean_ms, calls)}, 0.0, 0, concurrency={1.0: calls}, crowded=groups)
    return out


def test_calibration_takes_out_the_crowding_over_each_call_and_records_fitted_cores() -> None:
    profiles = {"m": _cpu_profile("m", {1: 10.0, 4: 16.0}, 1.0), "n": _cpu_profile("n", {1: 5.0, 4: 8.0}, 1.0)}
    plan = _plan_for(PAIR)
    live = _crowded_live(1.4)
    fit = effective_cores(PAIR, plan, profiles, live, 2.0)  # type: ignore[arg-type]
    assert fit is not None and fit.cores == pytest.approx(1.4, abs=0.006)
    out, done = calibrate_profiles(PAIR, plan, profiles, live, cores=2.0, fit=fit)  # type: ignore[arg-type]
    # The calls' crowding over their whole length is taken out (the count at their start said
    # none): back to the profiles' times alone.
    assert out["m"].points("cpu")[0].latency_ms.mean == pytest.approx(10.0, rel=0.01)
    assert out["n"].points("cpu")[0].latency_ms.mean == pytest.approx(5.0, rel=0.01)
    assert all(c.contention > 1.2 for c in done)
    assert (out["m"].model_extra or {})["calibration"]["cpu"]["cores"] == {"effective": fit.cores, "of": 2.0}
    assert calibrated_cores(PAIR, plan, out, 2.0) == fit.cores  # type: ignore[arg-type]
    assert calibrated_cores(PAIR, plan, out, 8.0) is None  # type: ignore[arg-type]  # fitted on another machine
    assert calibrated_cores(PAIR, plan, profiles, 2.0) is None  # type: ignore[arg-type]  # offline profiles
    # The machine's cores without a fit are not recorded as effective.
    plain, _ = calibrate_profiles(PAIR, plan, profiles, live, cores=2.0)  # type: ignore[arg-type]
    assert calibrated_cores(PAIR, plan, plain, 2.0) is None  # type: ignore[arg-type]
    # Profiles calibrated at different times with different cores tell no one count.
    other = fit.__class__(**{**fit.__dict__, "cores": 1.9})
    again, _ = calibrate_profiles(PAIR, plan, profiles, live, cores=2.0, fit=other)  # type: ignore[arg-type]
    assert calibrated_cores(PAIR, plan, {"m": out["m"], "n": again["n"]}, 2.0) is None  # type: ignore[arg-type]


def test_calibrate_fits_the_cores_and_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from inferline.profiles import write_profile
    from inferline.spec import write_spec

    profiles_dir = tmp_path / "profiles"
    for name, ms in (("m", 10.0), ("n", 5.0)):
        write_profile(_cpu_profile(name, {1: ms, 4: 1.6 * ms}, 1.0), profiles_dir)  # type: ignore[arg-type]
    spec_path = tmp_path / "pair.yaml"
    write_spec(PAIR, spec_path)
    plan = _plan_for(PAIR).model_copy(update={"spec": str(spec_path), "profiles": str(profiles_dir)})  # type: ignore[attr-defined]
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(plan.to_json())
    lines = []
    for stage, live in _crowded_live(1.4).items():
        ms, calls = live.calls[1]
        lines.append(f'inferline_router_call_seconds_count{{batch_size="1",stage="{stage}"}} {calls}')
        lines.append(f'inferline_router_call_seconds_sum{{batch_size="1",stage="{stage}"}} {ms * calls / 1000}')
        for k, (n, at) in live.crowded.items():
            lines.append(f'inferline_router_crowded_calls_total{{stage="{stage}",mean_under_way="{k:g}"}} {n}')
            for c, s in at.items():
                labels = f'stage="{stage}",mean_under_way="{k:g}",under_way="{c}"'
                lines.append(f"inferline_router_crowded_call_seconds_total{{{labels}}} {s}")
    metrics = tmp_path / "metrics.txt"
    metrics.write_text("\n".join(lines) + "\n")
    out = tmp_path / "calibrated"
    argv = ["calibrate", str(plan_path), "--metrics", str(metrics), "--out", str(out), "--cores", "2"]
    assert main(argv) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "shared cores: 1.4 effective of the machine's 2" in printed
    assert calibrated_cores(PAIR, plan, load_profiles(out), 2.0) == pytest.approx(1.4, abs=0.006)  # type: ignore[arg-type]
    # Without the cores the replicas shared, nothing is fitted or recorded.
    assert main(["calibrate", str(plan_path), "--metrics", str(metrics), "--out", str(tmp_path / "plain")]) == 0
    assert "effective of the machine" not in " ".join(capsys.readouterr().out.split())
    assert calibrated_cores(PAIR, plan, load_profiles(tmp_path / "plain"), 2.0) is None  # type: ignore[arg-type]


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
        groups = _calls(point.latency_ms.mean / 1000.0, share, cores) if cores is not None else {}
        calls = 200 * len(WORK_AT)
        seconds = sum(sum(at.values()) for _, at in groups.values())
        mean_ms = 1000 * seconds / calls if groups else point.latency_ms.mean
        out[stage.name] = LiveStage({1: (mean_ms, calls)}, 0.0, 0, idle_gaps={}, crowded=groups)
    return out


def test_a_local_runs_estimate_from_its_service_times_shares_the_fitted_cores(cascade_plan: Path) -> None:
    from inferline.plan import load_plan
    from inferline.replay_command import Target, results_for, run_estimate
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
    # The calls are the profiles' slowed by the rule on 1.3 cores: taken out again, the run's estimate
    # is about the profiles' on the fitted cores (about: each stage's calls were slowed here as if the
    # calls beside them had its own share, where calibration takes the pipeline's mean share), and
    # above the profiles' on the machine's 2.
    on_fit = run_estimate(plan, spec, arrivals, "none", [], cores=fit.cores)["estimated_p99_ms"]
    on_machine = run_estimate(plan, spec, arrivals, "none", [], cores=2.0)["estimated_p99_ms"]
    assert fitted["estimated_from_run_p99_ms"] == pytest.approx(on_fit, rel=0.08)
    assert on_fit > 1.1 * on_machine
    # The same calls' means from a router that did not group them: no fit.
    unbinned = {s: LiveStage(v.calls, 0.0, 0, idle_gaps={}) for s, v in crowded.items()}
    assert results_for(local, fake_replay(arrivals), arrivals, 0.0, live=unbinned)["effective_cores"] is None
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
    fit = CoreFit(cores=1.37, of=2.0, calls=1000, error=0.01, error_at_machine=0.1)
    calibrated, _ = calibrate_profiles(spec, plan, profiles, live, cores=2.0, fit=fit)
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
    assert target_from(str(state), None, str(on_calibrated), None).cores == 1  # fitted on 2 cores, run on 1
