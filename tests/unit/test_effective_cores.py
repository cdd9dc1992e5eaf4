"""The effective cores of replicas sharing a machine, fitted to how crowding slowed their calls."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from inferline.calibration import LiveStage, calibrate_profiles, effective_cores, live_stages
from inferline.cli import main
from inferline.effective_cores import MIN_CALLS, CrowdedCalls, crowding_slowdown, fit_cores
from inferline.planner.shared_cores import crowd_of, slowdown
from inferline.profiles import load_profiles
from inferline.router.crowding import CallCrowding
from tests.unit.test_calibration import METRICS, PAIR, _cpu_profile, _plan_for

WORK_AT = {1.0: {1: 1.0}, 1.5: {1: 0.5, 2: 0.5}, 2.0: {2: 1.0}, 3.0: {3: 1.0}, 4.0: {2: 0.25, 4: 0.75}}
"""Groups of calls by mean crowd -> the share of a call's work done at each count of calls under way."""


def _calls(
    base_s: float, share: float, cores: float, calls: int = 200, noise: float = 0.0, seed: int = 0, idle: bool = False
) -> dict:
    """Groups of calls (after an idle spell or back to back) whose seconds at each count follow the
    sharing rule with `cores` (every call beside them of the same share), with a relative noise."""
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
        out[(k, idle)] = (calls, seconds)
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
    # The second stage's calls after an idle spell take 1 ms more than its back-to-back ones: a base of their own.
    woken = _calls(0.0065, 1.0, cores) | _calls(0.0075, 1.0, cores, idle=True)
    stages = [CrowdedCalls(1.0, _calls(0.002, 1.0, cores)), CrowdedCalls(1.0, woken)]
    fit = fit_cores(stages, mean_share=1.0, machine_cores=3.0)
    assert fit is not None
    assert fit.cores == pytest.approx(cores, abs=0.006) and fit.of == 3.0
    assert fit.error < 1e-6
    assert fit.calls == 3 * 200 * len(WORK_AT)
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
    few = {(1.0, False): (1000, {1: 2.0}), (2.0, False): (MIN_CALLS - 1, {2: 0.2})}
    assert fit_cores([CrowdedCalls(1.0, few)], 1.0, 2.0) is None
    alone = {(1.0, False): (1000, {1: 2.0}), (2.0, True): (1000, {2: 3.0})}
    assert fit_cores([CrowdedCalls(1.0, alone)], 1.0, 2.0) is None  # one group of each kind: no slope
    assert fit_cores([], 1.0, 2.0) is None


def test_the_slowdown_over_calls_is_their_seconds_over_their_work() -> None:
    calls = CrowdedCalls(1.0, {(1.0, True): (10, {1: 0.1}), (3.0, False): (10, {3: 0.3})})
    # On 1.5 cores: 0.1 s alone is 0.1 s of work; 0.3 s with 3 under way (each at half speed) is 0.15.
    assert crowding_slowdown(calls, 1.0, 1.5) == pytest.approx(0.4 / 0.25)
    assert crowding_slowdown(calls, 1.0, 4.0) == pytest.approx(1.0)
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


def _crowded_live(cores: float) -> dict[str, LiveStage]:
    """PAIR's three stages with calls slowed by sharing `cores` cores (m: 10 ms alone, n: 5 ms)."""
    out = {}
    for stage, base in (("one", 0.010), ("two", 0.010), ("three", 0.005)):
        groups = _calls(base, 1.0, cores)
        calls = sum(n for n, _ in groups.values())
        mean_ms = 1000 * sum(sum(at.values()) for _, at in groups.values()) / calls
        out[stage] = LiveStage({1: (mean_ms, calls)}, 0.0, 0, concurrency={1.0: calls}, crowded=groups)
    return out


def test_calibration_takes_out_the_crowding_over_each_call() -> None:
    profiles = {"m": _cpu_profile("m", {1: 10.0, 4: 16.0}, 1.0), "n": _cpu_profile("n", {1: 5.0, 4: 8.0}, 1.0)}
    plan = _plan_for(PAIR)
    live = _crowded_live(1.4)
    fit = effective_cores(PAIR, plan, profiles, live, 2.0)  # type: ignore[arg-type]
    assert fit is not None and fit.cores == pytest.approx(1.4, abs=0.006)
    # The calls' crowding over their whole length is taken out (the count at their start said none):
    # on the cores they were slowed by, back to the profiles' times alone.
    out, done = calibrate_profiles(PAIR, plan, profiles, live, cores=fit.cores)  # type: ignore[arg-type]
    assert out["m"].points("cpu")[0].latency_ms.mean == pytest.approx(10.0, rel=0.01)
    assert out["n"].points("cpu")[0].latency_ms.mean == pytest.approx(5.0, rel=0.01)
    assert all(c.contention > 1.2 for c in done)
    # On the machine's 2 cores less of it is crowding: the profiles keep the rest.
    on_two, _ = calibrate_profiles(PAIR, plan, profiles, live, cores=2.0)  # type: ignore[arg-type]
    assert on_two["m"].points("cpu")[0].latency_ms.mean > 10.5


def test_calibrate_reports_the_fit_beside_the_machines_cores(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
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
    assert "shared cores: 2; how crowding slowed 3000 calls follows the sharing rule best with 1.4" in printed
    assert "`--cores 1.4` on replay or simulate estimates with the fit" in printed
    assert load_profiles(out)["m"].points("cpu")[0].latency_ms.mean > 10.5  # taken out on the machine's 2
    # Without the cores the replicas shared, nothing is fitted.
    assert main(["calibrate", str(plan_path), "--metrics", str(metrics), "--out", str(tmp_path / "plain")]) == 0
    assert "sharing rule" not in " ".join(capsys.readouterr().out.split())


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


def test_a_local_runs_results_report_the_fit_and_its_estimate_shares_the_machines_cores(cascade_plan: Path) -> None:
    from inferline.plan import load_plan
    from inferline.replay_command import Target, replay_table, results_for
    from inferline.spec import load_spec
    from inferline.traces import load_trace
    from tests.unit.test_startup import fake_replay

    plan = load_plan(cascade_plan)
    spec = load_spec(plan.spec)  # type: ignore[arg-type]
    arrivals = load_trace("gamma:rate=60,cv=2,duration=30,seed=6")
    local = Target("127.0.0.1:1", spec.name, plan, spec, None, "none", cores=2.0)
    crowded = _cascade_live(plan, spec, 1.3)
    out = results_for(local, fake_replay(arrivals), arrivals, 0.0, live=crowded)
    fit = effective_cores(spec, plan, load_profiles(plan.profiles), crowded, 2.0)  # type: ignore[arg-type]
    assert fit is not None and fit.cores < 1.5
    assert out["effective_cores"] == {
        "cores": fit.cores, "of": 2.0, "calls": fit.calls, "error": round(fit.error, 4),
        "error_at_machine": round(fit.error_at_machine, 4),
    }  # fmt: skip
    assert out["estimate"].startswith("static plan, replicas sharing 2 cores")
    from rich.console import Console

    console = Console(width=400, record=True)
    console.print(replay_table(spec.name, out))
    assert f"follows the sharing rule best with {fit.cores:g} of the 2 cores" in console.export_text()
    # A router that did not group its calls: no fit.
    unbinned = {s: LiveStage(v.calls, 0.0, 0, idle_gaps={}) for s, v in crowded.items()}
    assert results_for(local, fake_replay(arrivals), arrivals, 0.0, live=unbinned)["effective_cores"] is None
