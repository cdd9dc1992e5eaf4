"""The estimate's sensitivity to the servers' speed: the estimate again with every server a few
percent slower, reported beside a replay's estimate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from inferline.cli import main
from inferline.plan import load_plan
from inferline.profiles import load_profiles
from inferline.replay_command import Target, replay_table, results_for, run_estimate
from inferline.router.replay import ReplayResult
from inferline.sensitivity import SLOWER_BY, Sensitivity, sensitivity, slower_profiles
from inferline.spec import load_spec
from inferline.traces import load_trace

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
SPEC = str(EXAMPLES / "pipelines" / "local-emulated.yaml")
PROFILES = EXAMPLES / "profiles" / "measured-cpu"
TRACE = "gamma:rate=80,cv=2,duration=30,seed=3"


@pytest.fixture(scope="module")
def plan_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    argv = ["plan", SPEC, "--profiles", str(PROFILES), "--hardware", str(EXAMPLES / "catalog-local.yaml")]
    assert main([*argv, "--trace", TRACE, "--out", str(path)]) == 0
    return path


def test_slower_profiles_stretch_each_stages_model_on_its_planned_hardware_only(plan_path: Path) -> None:
    plan, spec, profiles = load_plan(plan_path), load_spec(SPEC), load_profiles(str(PROFILES))
    gpu = profiles["emulated-detector"].profiles["cpu"]
    profiles["emulated-detector"] = profiles["emulated-detector"].model_copy(
        update={"profiles": {**profiles["emulated-detector"].profiles, "gpu": gpu}}
    )
    slower = slower_profiles(profiles, spec, plan, 0.1)
    used = {s.model for s in spec.stages}
    assert used and set(slower) == set(profiles)
    for model, profile in profiles.items():
        if model not in used:
            assert slower[model] is profile
            continue
        hardware = {plan.stage(s.name).hardware for s in spec.stages if s.model == model}
        for hw in profile.profiles:
            factor = 1.1 if hw in hardware else 1.0
            for before, after in zip(profile.points(hw), slower[model].points(hw), strict=True):
                b, a = before.latency_ms, after.latency_ms
                assert a.mean == pytest.approx(b.mean * factor)
                assert a.p99 == pytest.approx(b.p99 * factor)  # type: ignore[operator]
                if b.server_cpu_ms is not None:
                    assert a.server_cpu_ms == pytest.approx(b.server_cpu_ms * factor)
    assert slower["emulated-detector"].points("gpu") == profiles["emulated-detector"].points("gpu")


def test_sensitivity_is_the_relative_change_per_relative_slowdown() -> None:
    s = sensitivity(100.0, 115.0, 0.05)
    assert s.elasticity == pytest.approx(3.0) and s.estimated_p99_ms == 115.0
    assert (
        Sensitivity.from_record(s.record()).record()
        == s.record()
        == {"servers_slower_by": 0.05, "estimated_p99_ms": 115.0, "elasticity": 3.0}
    )
    assert s.line() == "servers 5% slower: estimated P99 115.0 ms (each 1% slower adds 3.0% to it)"
    with pytest.raises(ValueError, match="positive"):
        sensitivity(0.0, 10.0)
    with pytest.raises(ValueError, match="positive"):
        sensitivity(10.0, 10.0, 0.0)


def _result(arrivals: np.ndarray, latency_ms: float = 40.0) -> ReplayResult:  # type: ignore[type-arg]
    n = arrivals.size
    return ReplayResult(
        arrivals, arrivals.copy(), arrivals + latency_ms / 1000.0, np.full(n, latency_ms), ("ok",) * n, 120.0,
        float(arrivals[-1]) + 0.05,
    )  # fmt: skip


@pytest.mark.parametrize("tuner", ["none", "inferline"])
def test_a_replays_results_carry_the_estimate_with_every_server_slower(plan_path: Path, tuner: str) -> None:
    plan, spec, arrivals = load_plan(plan_path), load_spec(SPEC), load_trace(TRACE)
    target = Target("127.0.0.1:1", spec.name, plan, spec, None, tuner, cores=2.0)
    results = results_for(target, _result(arrivals), arrivals, 0.0)
    sensitive = results["estimate_sensitivity"]
    slower = slower_profiles(load_profiles(str(plan.profiles)), spec, plan)
    expected = run_estimate(plan, spec, arrivals, tuner, [], cores=2.0, profiles=slower)["estimated_p99_ms"]
    assert sensitive["servers_slower_by"] == SLOWER_BY
    assert sensitive["estimated_p99_ms"] == pytest.approx(expected, abs=1e-3)
    assert sensitive["estimated_p99_ms"] > results["estimated_p99_ms"]
    ratio = sensitive["estimated_p99_ms"] / results["estimated_p99_ms"]
    assert sensitive["elasticity"] == pytest.approx((ratio - 1.0) / SLOWER_BY, abs=1e-2)
    console = Console(width=400, record=True)
    console.print(replay_table(spec.name, results))
    assert f"servers 5% slower: estimated P99 {sensitive['estimated_p99_ms']:.1f} ms" in console.export_text()


def test_no_estimate_no_sensitivity() -> None:
    arrivals = load_trace(TRACE)
    bare = results_for(Target("127.0.0.1:1", "p", None, None, None), _result(arrivals), arrivals, 0.0)
    assert bare["estimated_p99_ms"] is None and bare["estimate_sensitivity"] is None
