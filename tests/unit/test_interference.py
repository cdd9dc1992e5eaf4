"""A stage's interference on shared cores, fitted to how crowding slowed its calls."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from inferline.calibration import LiveStage, calibrate_profiles, live_stages
from inferline.cli import main
from inferline.interference import MIN_CALLS, CrowdedCalls, _factors, crowding_slowdown, fit_interference
from inferline.planner.shared_cores import call_slowdown
from inferline.profiles import load_profiles
from inferline.router.crowding import CallCrowding
from tests.unit.test_calibration import METRICS, PAIR, _cpu_profile, _plan_for

WORK_AT = {1.0: {1: 1.0}, 1.5: {1: 0.5, 2: 0.5}, 2.0: {2: 1.0}, 3.0: {3: 1.0}, 4.0: {2: 0.25, 4: 0.75}}
"""Groups of calls by mean crowd -> the share of a call's work done at each count of calls under way."""


def _calls(
    base_s: float,
    share: float,
    g: float,
    cores: float = 2.0,
    calls: int = 200,
    noise: float = 0.0,
    seed: int = 0,
    idle: bool = False,
) -> dict:
    """Groups of calls (after an idle spell or back to back) whose seconds at each count follow the
    rule with interference g on `cores` (every call beside them of the same share), with a relative noise."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, work_at in WORK_AT.items():
        seconds = {
            n: calls * base_s * w * call_slowdown(share, g, n * share, cores) * (1 + noise * rng.normal())
            for n, w in work_at.items()
        }
        out[(k, idle)] = (calls, seconds)
    return out


def _shared_run(g: float, cores: float, seed: int = 0) -> dict[str, dict]:
    """Two stages' one-core calls (2 and 6.5 ms alone) arriving at random, each advancing at the
    rule's rate with interference g on `cores`, timed by the router's `CallCrowding` (a fake clock)."""
    rng = np.random.default_rng(seed)
    now = [0.0]
    crowding = CallCrowding(["a", "b"], clock=lambda: now[0])
    arrivals = np.cumsum(rng.exponential(0.006, 1500))  # 0.7 of a core of work: rarely 16 under way
    stages = rng.choice(["a", "b"], arrivals.size)
    active: list[list] = []  # [remaining work s, stage, token]
    i = 0
    while i < arrivals.size or active:
        rate = 1.0 / call_slowdown(1.0, g, float(len(active)), cores) if active else 0.0
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
    return {s: {k: (c.calls, dict(c.seconds_at)) for k, c in crowding.counts(s).items()} for s in ("a", "b")}


def test_the_rules_slowdown_is_the_kernels() -> None:
    counts = np.arange(1.0, 8.0)
    grid = np.array([0.0, 0.3, 1.2])
    for share, mean_share, cores in ((1.0, 1.0, 2.0), (0.6, 0.8, 1.5), (0.9, 0.4, 4.0)):
        factors = _factors(share, mean_share, counts, cores, grid)
        expected = [[call_slowdown(share, g, share + (n - 1) * mean_share, cores) for n in counts] for g in grid]
        np.testing.assert_allclose(factors, expected, rtol=1e-12)


@pytest.mark.parametrize("g", [0.0, 0.2, 0.35, 0.8])
def test_the_fit_finds_the_interference_the_calls_were_slowed_by(g: float) -> None:
    # Calls after an idle spell take 1 ms more than back-to-back ones: a base of their own.
    calls = CrowdedCalls(1.0, _calls(0.0065, 1.0, g) | _calls(0.0075, 1.0, g, idle=True))
    fit = fit_interference(calls, mean_share=1.0, cores=2.0)
    assert fit is not None
    assert fit.interference == pytest.approx(g, abs=0.006)
    assert fit.error < 1e-6
    assert fit.calls == 2 * 200 * len(WORK_AT)
    assert (fit.error_without > 0.01) == (g > 0)  # without interference the rule misses these calls


@pytest.mark.parametrize("g", [0.0, 0.3, 0.6])
def test_calls_timed_by_the_router_fit_the_interference_they_ran_with(g: float) -> None:
    run = _shared_run(g, cores=2.0)
    for stage in ("a", "b"):
        fit = fit_interference(CrowdedCalls(1.0, run[stage]), mean_share=1.0, cores=2.0)
        assert fit is not None and fit.interference == pytest.approx(g, abs=0.02)
        assert fit.error < 0.01


def test_noisy_calls_still_fit_near_their_interference() -> None:
    calls = CrowdedCalls(1.0, _calls(0.003, 1.0, 0.3, noise=0.02, seed=4))
    fit = fit_interference(calls, mean_share=1.0, cores=2.0)
    assert fit is not None and abs(fit.interference - 0.3) < 0.08
    assert fit.error < fit.error_without


def test_calls_that_do_not_compute_fit_nothing() -> None:
    # Calls that sleep (a share of 0.05) barely feel what they share: any interference fits them alike.
    assert fit_interference(CrowdedCalls(0.05, _calls(0.01, 0.05, 0.5)), mean_share=0.05, cores=2.0) is None


def test_too_few_crowded_calls_fit_nothing() -> None:
    few = {(1.0, False): (1000, {1: 2.0}), (2.0, False): (MIN_CALLS - 1, {2: 0.2})}
    assert fit_interference(CrowdedCalls(1.0, few), 1.0, 2.0) is None
    alone = {(1.0, False): (1000, {1: 2.0}), (2.0, True): (1000, {2: 3.0})}
    assert fit_interference(CrowdedCalls(1.0, alone), 1.0, 2.0) is None  # one group of each kind: no slope
    assert fit_interference(CrowdedCalls(1.0, {}), 1.0, 2.0) is None


def test_the_slowdown_over_calls_is_their_seconds_over_their_work() -> None:
    calls = CrowdedCalls(1.0, {(1.0, True): (10, {1: 0.1}), (3.0, False): (10, {3: 0.3})})
    # On 1.5 cores: 0.1 s alone is 0.1 s of work; 0.3 s with 3 under way (each at half speed) is 0.15.
    assert crowding_slowdown(calls, 1.0, 1.5) == pytest.approx(0.4 / 0.25)
    assert crowding_slowdown(calls, 1.0, 4.0) == pytest.approx(1.0)
    # On 4 cores with g = 0.25: 3 under way take 1 + 0.25 * 2 = 1.5 times as long, 0.3 s is 0.2 s of work.
    assert crowding_slowdown(calls, 1.0, 4.0, 0.25) == pytest.approx(0.4 / 0.3)
    assert crowding_slowdown(CrowdedCalls(1.0, {}), 1.0, 2.0) is None


def test_live_stages_reads_the_crowded_calls() -> None:
    at = 'inferline_router_crowded_call_seconds_total{stage="detect",mean_under_way='
    text = METRICS + (
        "# TYPE inferline_router_crowded_calls counter\n"
        'inferline_router_crowded_calls_total{stage="detect",mean_under_way="1",after_idle="true"} 30.0\n'
        'inferline_router_crowded_calls_total{stage="detect",mean_under_way="2.5",after_idle="false"} 10.0\n'
        "# TYPE inferline_router_crowded_call_seconds counter\n"
        f'{at}"1",after_idle="true",under_way="1"}} 0.3\n'
        f'{at}"2.5",after_idle="false",under_way="2"}} 0.1\n'
        f'{at}"2.5",after_idle="false",under_way="3"}} 0.1\n'
    )
    live = live_stages(text)
    assert dict(live["detect"].crowded) == {(1.0, True): (30, {1: 0.3}), (2.5, False): (10, {2: 0.1, 3: 0.1})}
    assert dict(live["classify"].crowded) == {}  # not in the metrics


def _crowded_live(g: float) -> dict[str, LiveStage]:
    """PAIR's three stages with calls slowed by interference g on 2 cores (m: 10 ms alone, n: 5 ms)."""
    out = {}
    for stage, base in (("one", 0.010), ("two", 0.010), ("three", 0.005)):
        groups = _calls(base, 1.0, g)
        calls = sum(n for n, _ in groups.values())
        mean_ms = 1000 * sum(sum(at.values()) for _, at in groups.values()) / calls
        out[stage] = LiveStage({1: (mean_ms, calls)}, 0.0, 0, concurrency={1.0: calls}, crowded=groups)
    return out


def test_calibration_fits_the_interference_and_takes_the_crowding_out_over_each_call() -> None:
    profiles = {"m": _cpu_profile("m", {1: 10.0, 4: 16.0}, 1.0), "n": _cpu_profile("n", {1: 5.0, 4: 8.0}, 1.0)}
    plan = _plan_for(PAIR)
    live = _crowded_live(0.3)
    out, done = calibrate_profiles(PAIR, plan, profiles, live, cores=2.0)  # type: ignore[arg-type]
    assert {c.model: c.interference_fit.interference for c in done if c.interference_fit} == {"m": 0.3, "n": 0.3}
    assert out["m"].interference == {"cpu": 0.3} and out["n"].interference == {"cpu": 0.3}
    # The calls' crowding over their whole length is taken out (the count at their start said none):
    # back to the profiles' times alone.
    assert out["m"].points("cpu")[0].latency_ms.mean == pytest.approx(10.0, rel=0.001)
    assert out["n"].points("cpu")[0].latency_ms.mean == pytest.approx(5.0, rel=0.001)
    assert all(c.contention > 1.2 for c in done)
    # Without the cores shared, nothing is fitted or taken out: the profiles keep the slowness.
    plain, done = calibrate_profiles(PAIR, plan, profiles, live)  # type: ignore[arg-type]
    assert all(c.interference_fit is None for c in done) and plain["m"].interference == {}
    assert plain["m"].points("cpu")[0].latency_ms.mean > 13.0


def test_calls_that_cannot_tell_keep_the_profiles_interference() -> None:
    profiles = {
        "m": _cpu_profile("m", {1: 10.0, 4: 16.0}, 1.0).model_copy(update={"interference": {"cpu": 0.3}}),
        "n": _cpu_profile("n", {1: 5.0, 4: 8.0}, 1.0),
    }
    live = {s: LiveStage(v.calls, 0.0, 0, concurrency={1.0: v.call_count}) for s, v in _crowded_live(0.3).items()}
    out, done = calibrate_profiles(PAIR, _plan_for(PAIR), profiles, live, cores=2.0)  # type: ignore[arg-type]
    assert all(c.interference_fit is None for c in done)
    assert out["m"].interference == {"cpu": 0.3} and out["n"].interference == {}


def test_calibrate_reports_and_records_the_interference(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
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
    for stage, live in _crowded_live(0.3).items():
        ms, calls = live.calls[1]
        lines.append(f'inferline_router_call_seconds_count{{batch_size="1",stage="{stage}"}} {calls}')
        lines.append(f'inferline_router_call_seconds_sum{{batch_size="1",stage="{stage}"}} {ms * calls / 1000}')
        for (k, idle), (n, at) in live.crowded.items():
            group = f'stage="{stage}",mean_under_way="{k:g}",after_idle="{str(idle).lower()}"'
            lines.append(f"inferline_router_crowded_calls_total{{{group}}} {n}")
            for c, seconds in at.items():
                lines.append(f'inferline_router_crowded_call_seconds_total{{{group},under_way="{c}"}} {seconds}')
    metrics = tmp_path / "metrics.txt"
    metrics.write_text("\n".join(lines) + "\n")
    out = tmp_path / "calibrated"
    argv = ["calibrate", str(plan_path), "--metrics", str(metrics), "--out", str(out), "--cores", "2"]
    assert main(argv) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "shared cores: 2; per core's worth of calls computing beside them, a call took longer by: m +30%" in printed
    assert "n +30%" in printed
    written = load_profiles(out)
    assert written["m"].interference == {"cpu": 0.3}
    assert written["m"].points("cpu")[0].latency_ms.mean == pytest.approx(10.0, rel=0.001)
    # Without the cores the replicas shared, nothing is fitted.
    assert main(["calibrate", str(plan_path), "--metrics", str(metrics), "--out", str(tmp_path / "plain")]) == 0
    assert "took longer by" not in " ".join(capsys.readouterr().out.split())
    assert load_profiles(tmp_path / "plain")["m"].interference == {}


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


def _cascade_live(plan: object, spec: object, g: float | None) -> dict[str, LiveStage]:
    """Every stage's batch-1 calls at its profile's mean, slowed by interference g on 2 cores (None:
    a router that did not group its calls by crowding)."""
    profiles = load_profiles(plan.profiles)  # type: ignore[attr-defined]
    out = {}
    for stage in spec.stages:  # type: ignore[attr-defined]
        point = profiles[stage.model].points("cpu")[0]
        share = point.latency_ms.server_cpu_ms / point.latency_ms.mean
        groups = _calls(point.latency_ms.mean / 1000.0, share, g) if g is not None else {}
        calls = 200 * len(WORK_AT)
        seconds = sum(sum(at.values()) for _, at in groups.values())
        mean_ms = 1000 * seconds / calls if groups else point.latency_ms.mean
        out[stage.name] = LiveStage({1: (mean_ms, calls)}, 0.0, 0, idle_gaps={}, crowded=groups)
    return out


def test_a_local_runs_results_report_each_models_interference(cascade_plan: Path) -> None:
    from rich.console import Console

    from inferline.plan import load_plan
    from inferline.replay_command import Target, replay_table, results_for
    from inferline.spec import load_spec
    from inferline.traces import load_trace
    from tests.unit.test_startup import fake_replay

    plan = load_plan(cascade_plan)
    spec = load_spec(plan.spec)  # type: ignore[arg-type]
    arrivals = load_trace("gamma:rate=60,cv=2,duration=30,seed=6")
    local = Target("127.0.0.1:1", spec.name, plan, spec, None, "none", cores=2.0)
    out = results_for(local, fake_replay(arrivals), arrivals, 0.0, live=_cascade_live(plan, spec, 0.4))
    fits = out["interference"]
    assert sorted(fits) == ["classifier-large", "classifier-small", "preprocess"]
    # The calls beside each were generated at its own share, the fit assumes the pipeline's mean: near, not exact.
    assert all(abs(f["interference"] - 0.4) < 0.15 and f["error"] < f["error_without"] for f in fits.values())
    assert out["estimate"].startswith("static plan, replicas sharing 2 cores")
    console = Console(width=400, record=True)
    console.print(replay_table(spec.name, out))
    large = fits["classifier-large"]["interference"]
    assert f"per core's worth: classifier-large +{large:.0%}" in console.export_text()
    # A router that did not group its calls: nothing fitted.
    ungrouped = results_for(local, fake_replay(arrivals), arrivals, 0.0, live=_cascade_live(plan, spec, None))
    assert ungrouped["interference"] is None
    assert ungrouped["estimated_from_run_p99_ms"] is not None


def _profile_doc(interference: object) -> dict:
    point = {"batch_size": 1, "latency_ms": {"mean": 10.0, "server_cpu_ms": 9.0}}
    return {"model": "m", "profiles": {"cpu": [point], "k80": [point]}, "interference": interference}


def test_a_profile_carries_its_interference_into_the_cost_table_and_back(tmp_path: Path) -> None:
    from inferline.catalog import DEFAULT_CATALOG
    from inferline.planner.costtable import build_cost_table
    from inferline.planner.pipeline import pipeline_model
    from inferline.profiles import load_profile, parse_profile, write_profile
    from inferline.spec import parse_spec

    profile = parse_profile(_profile_doc({"cpu": 0.3}), "test")
    model = pipeline_model(parse_spec({"name": "p", "stages": [{"name": "s", "model": "m"}]}))
    table = build_cost_table(model, {"m": profile}, DEFAULT_CATALOG)[0]
    assert table.option("cpu").interference == 0.3 and table.option("k80").interference == 0.0
    write_profile(profile, tmp_path)
    assert load_profile(tmp_path / "m.json") == profile
    # Profiling k80 again keeps cpu's; profiling cpu again drops it (measured anew, without it).
    write_profile(
        parse_profile(_profile_doc({"k80": 0.1}) | {"profiles": {"k80": _profile_doc({})["profiles"]["k80"]}}, "t"),
        tmp_path,
    )
    assert load_profile(tmp_path / "m.json").interference == {"cpu": 0.3, "k80": 0.1}
    write_profile(
        parse_profile(_profile_doc({}) | {"profiles": {"cpu": _profile_doc({})["profiles"]["cpu"]}}, "t"), tmp_path
    )
    assert load_profile(tmp_path / "m.json").interference == {"k80": 0.1}
    plain = tmp_path / "plain"
    write_profile(parse_profile(_profile_doc({}), "test"), plain)
    assert "interference" not in (plain / "m.json").read_text()


@pytest.mark.parametrize(
    ("interference", "message"),
    [({"v100": 0.2}, "interference names hardware 'v100'"), ({"cpu": -0.2}, "interference on 'cpu' must be finite")],
)
def test_a_bad_interference_is_one_line_naming_it(interference: object, message: str) -> None:
    from inferline.errors import ProfileError
    from inferline.profiles import parse_profile

    with pytest.raises(ProfileError) as caught:
        parse_profile(_profile_doc(interference), "profile 'm.json'")
    assert message in str(caught.value) and "\n" not in str(caught.value)
