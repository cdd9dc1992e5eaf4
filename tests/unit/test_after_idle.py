"""After-idle latency (`ModelProfile.after_idle`): a call on a replica that sat idle takes longer.

The estimator's kernel, the shared-core kernel and the closed loop all give the batch to the replica
that became idle last and add extra * (1 - exp(-idle / tau)); they are checked against the
event-by-event reference simulator, against each other, and against closed forms.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from inferline.calibration import Calibration, LiveStage, calibrate_profiles, live_stages, woken_ms
from inferline.catalog import DEFAULT_CATALOG
from inferline.errors import ProfileError
from inferline.plan import Plan
from inferline.planner.closedloop import simulate_run
from inferline.planner.costtable import CostTable, build_cost_table
from inferline.planner.estimator import Estimator
from inferline.planner.pipeline import StageConfig, pipeline_model
from inferline.planner.shared_cores import shared_core_latencies_s
from inferline.profiles import ModelProfile, load_profile, parse_profile, write_profile
from inferline.spec import parse_spec
from tests.reference_sim import build_pipeline, simulate
from tests.unit.test_closed_loop_shared import ScriptedPolicy, assert_same_run
from tests.unit.test_estimator_reference import SEEDS, make_case


def with_after_idle(table: CostTable, seed: int) -> CostTable:
    """The table with a random after-idle cost on every option, about the size of a batch's service."""
    rng = np.random.default_rng(seed)
    return tuple(
        dataclasses.replace(
            stage,
            options={
                hw: dataclasses.replace(
                    o,
                    idle_extra_s=float(rng.uniform(0.1, 1.0)) * float(o.service_s[1]),
                    idle_tau_s=float(rng.uniform(0.2, 3.0)) * float(o.service_s[1]),
                )
                for hw, o in stage.options.items()
            },
        )
        for stage in table
    )


@pytest.mark.parametrize("seed", SEEDS[:40])
def test_the_estimator_matches_the_reference(seed: int) -> None:
    case = make_case(seed)
    table = with_after_idle(case.table, seed)
    est = Estimator(case.model, table, case.arrivals, math.inf, seed=seed)
    for config in case.configs:
        options = [table[s].option(c.hardware) for s, c in enumerate(config)]
        ref = simulate(
            case.arrivals,
            case.parents,
            est.visits,
            [o.service_s for o in options],
            [c.max_batch_size for c in config],
            [c.replicas for c in config],
            [(o.idle_extra_s, o.idle_tau_s) for o in options],
        )
        latencies, _ = est.latencies_s(config)
        np.testing.assert_allclose(latencies, ref.latencies_s, rtol=0, atol=1e-9, err_msg=f"config {config}")


def test_the_extra_latency_shows_in_the_cases() -> None:
    longer = sum(
        bool(
            np.any(
                Estimator(c.model, with_after_idle(c.table, seed), c.arrivals, math.inf, seed=seed).latencies_s(
                    c.configs[0]
                )[0]
                > Estimator(c.model, c.table, c.arrivals, math.inf, seed=seed).latencies_s(c.configs[0])[0] + 1e-9
            )
        )
        for seed, c in ((seed, make_case(seed)) for seed in SEEDS[:40])
    )
    assert longer == 40


@pytest.mark.parametrize("seed", SEEDS[:40])
def test_the_shared_core_kernel_equals_the_estimator_when_the_cores_suffice(seed: int) -> None:
    case = make_case(seed)
    est = Estimator(case.model, with_after_idle(case.table, seed), case.arrivals, math.inf, seed=seed)
    for config in case.configs:
        expected, _ = est.latencies_s(config)
        got, _ = shared_core_latencies_s(est, config, sum(c.replicas for c in config))
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12, err_msg=f"config {config}")


@pytest.mark.parametrize("seed", SEEDS[:20])
def test_the_closed_loop_on_shared_cores_equals_a_core_per_replica_whatever_the_tuner_does(seed: int) -> None:
    case = make_case(seed)
    table = with_after_idle(case.table, seed)
    config = case.configs[0]
    caps = {
        name: table[s].option(c.hardware).service_s.size - 1
        for s, (name, c) in enumerate(zip(case.model.names, config, strict=True))
    }
    tick = float(case.arrivals[-1] - case.arrivals[0]) / 20
    args = (case.model, table, config, case.arrivals, math.inf)
    kwargs = {"tick_s": tick, "startup_s": 1.5 * tick, "seed": seed}
    alone = simulate_run(*args, ScriptedPolicy(caps, seed), **kwargs)  # type: ignore[arg-type]
    shared = simulate_run(*args, ScriptedPolicy(caps, seed), cores=1e9, **kwargs)  # type: ignore[arg-type]
    assert alone.decisions, "the scripted tuner changed nothing"
    assert_same_run(shared, alone)


# --- closed forms: one stage, 10 ms calls, 2 ms extra after idle, a 5 ms time constant -------------------


def one_stage(replicas: int, arrivals: list[float], cores: float | None = None) -> list[float]:
    profile = {"cpu": [{"batch_size": 1, "latency_ms": {"mean": 10.0}}]}
    model, table = build_pipeline([{"name": "only", "model": "m"}], {"m": profile})
    option = dataclasses.replace(table[0].option("cpu"), idle_extra_s=0.002, idle_tau_s=0.005)
    table = (dataclasses.replace(table[0], options={"cpu": option}),)
    est = Estimator(model, table, np.asarray(arrivals), math.inf)
    config = (StageConfig("cpu", 1, replicas),)
    latencies = est.latencies_s(config)[0] if cores is None else shared_core_latencies_s(est, config, cores)[0]
    return [round(1000 * x, 6) for x in latencies]


@pytest.mark.parametrize("cores", [None, 1.0])
def test_a_call_after_a_long_idle_takes_the_whole_extra_and_one_back_to_back_none(cores: float | None) -> None:
    # 1st: idle 100 ms (20 time constants); 2nd queued behind it, sent the moment the replica frees;
    # 3rd: idle 3 ms, 2 * (1 - exp(-3/5)) = 0.902377 ms extra.
    got = one_stage(1, [0.100, 0.105, 0.125], cores)
    assert got == pytest.approx([12.0, 17.0, 10.0 + 2 * (1 - math.exp(-0.6))], abs=1e-5)


@pytest.mark.parametrize("cores", [None, 2.0])
def test_the_replica_idle_the_shortest_takes_the_next_call(cores: float | None) -> None:
    # Two replicas idle since 0; the first call's replica is idle again from 112 ms; at 113 ms it
    # (idle 1 ms: 0.362538 ms extra) takes the call, not the other one (idle 113 ms: 2 ms extra).
    got = one_stage(2, [0.100, 0.113], cores)
    assert got == pytest.approx([12.0, 10.0 + 2 * (1 - math.exp(-0.2))], abs=1e-5)


# --- the profile's field ---------------------------------------------------------------------------


def profile_doc(after_idle: object) -> dict[str, object]:
    return {
        "model": "m",
        "profiles": {
            "cpu": [
                {"batch_size": 1, "latency_ms": {"mean": 2.0}},
                {"batch_size": 4, "latency_ms": {"mean": 5.0}},
            ]
        },
        "after_idle": after_idle,
    }


def test_a_profile_carries_its_after_idle_term_into_the_cost_table(tmp_path: Path) -> None:
    profile = parse_profile(profile_doc({"cpu": {"extra_ms": 1.2, "time_constant_ms": 2.5}}), "test")
    assert profile.after_idle_s("cpu") == (0.0012, 0.0025)
    assert profile.after_idle_s("v100") == (0.0, 1.0)
    write_profile(profile, tmp_path)
    again = load_profile(tmp_path / "m.json")
    assert again == profile
    _, table = build_pipeline([{"name": "s", "model": "m"}], {"m": profile_doc({})["profiles"]})
    assert table[0].option("cpu").idle_extra_s == 0.0
    model = pipeline_model(parse_spec({"name": "p", "stages": [{"name": "s", "model": "m"}]}))
    option = build_cost_table(model, {"m": profile}, DEFAULT_CATALOG)[0].option("cpu")
    assert (option.idle_extra_s, option.idle_tau_s) == (0.0012, 0.0025)
    plain = parse_profile(profile_doc({}), "test")
    write_profile(plain, tmp_path / "plain")
    assert "after_idle" not in json.loads((tmp_path / "plain" / "m.json").read_text())


@pytest.mark.parametrize(
    ("after_idle", "message"),
    [
        ({"k80": {"extra_ms": 1.0, "time_constant_ms": 2.0}}, "after_idle names hardware 'k80'"),
        ({"cpu": {"extra_ms": -1.0, "time_constant_ms": 2.0}}, "extra_ms"),
        ({"cpu": {"extra_ms": 1.0, "time_constant_ms": 0.0}}, "time_constant_ms"),
    ],
)
def test_a_bad_after_idle_term_is_one_line_naming_it(after_idle: object, message: str) -> None:
    with pytest.raises(ProfileError) as caught:
        parse_profile(profile_doc(after_idle), "profile 'm.json'")
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_profiling_one_hardware_again_replaces_its_after_idle_term_and_keeps_the_others(tmp_path: Path) -> None:
    both = profile_doc(
        {"cpu": {"extra_ms": 1.0, "time_constant_ms": 2.0}, "k80": {"extra_ms": 3.0, "time_constant_ms": 4.0}}
    )
    both["profiles"]["k80"] = both["profiles"]["cpu"]  # type: ignore[index]
    write_profile(parse_profile(both, "test"), tmp_path)
    write_profile(parse_profile(profile_doc({}), "test"), tmp_path)  # cpu again, nothing after idle this time
    merged = load_profile(tmp_path / "m.json")
    assert merged.after_idle_s("cpu") == (0.0, 1.0)
    assert merged.after_idle_s("k80") == (0.003, 0.004)


def calibrated_from(live: LiveStage, cores: float | None = None) -> tuple[ModelProfile, Calibration]:
    spec = parse_spec({"name": "p", "stages": [{"name": "s", "model": "m"}]})
    profile = parse_profile(profile_doc({"cpu": {"extra_ms": 1.0, "time_constant_ms": 2.0}}), "test")
    plan = Plan.model_validate(
        {"pipeline": "p", "slo_ms": 100, "strategy": "inferline", "cost_per_hour": 0.07, "estimated_p99_ms": 10,
         "feasible": True, "stages": {"s": {"hardware": "cpu", "max_batch_size": 4, "replicas": 1}}}
    )  # fmt: skip
    calibrated, done = calibrate_profiles(spec, plan, {"m": profile}, {"s": live}, cores=cores)
    return calibrated["m"], done[0]


def test_calibration_takes_out_what_idle_gaps_added_and_keeps_the_term() -> None:
    # 50 calls of 3 ms at batch 1 (profiled: 2 ms): 30 after long idle spells (1 ms extra each), 20
    # back to back (not in the histogram), so the calls themselves took (150 - 30) / 50 = 2.4 ms.
    live = LiveStage(calls={1: (3.0, 50)}, dispatch_ms=0.0, dispatches=20, idle_gaps={math.inf: 30})
    profile, done = calibrated_from(live)
    assert done.ratio == pytest.approx(1.2)
    assert done.woken_ms == pytest.approx(0.6)
    assert profile.points("cpu")[0].latency_ms.mean == pytest.approx(2.4)
    assert profile.after_idle_s("cpu") == (0.001, 0.002)
    assert (profile.model_extra or {})["calibration"]["cpu"]["after_idle_ms_per_call"] == pytest.approx(0.6)
    # Measured, and never idle: nothing to take out, the term stays.
    busy, always = calibrated_from(LiveStage(calls={1: (3.0, 50)}, dispatch_ms=0.0, dispatches=49, idle_gaps={}))
    assert always.ratio == pytest.approx(1.5) and busy.after_idle_s("cpu") == (0.001, 0.002)
    # Metrics without the histogram: the live means hold the wake-ups, so the term goes (not twice).
    folded, plain = calibrated_from(LiveStage(calls={1: (3.0, 50)}, dispatch_ms=0.0, dispatches=0))
    assert plain.ratio == pytest.approx(1.5) and plain.woken_ms == 0.0
    assert folded.after_idle == {}
    assert "folded" in (folded.model_extra or {})["calibration"]["cpu"]["after_idle"]


def test_calibration_takes_the_wake_ups_out_at_the_calls_slowdown() -> None:
    # Calls slowed 2x by sharing the cores take out twice the wake-up time they measured: the
    # prediction slows the wake-up with the rest of the call.
    # Every call started with one other under way on a single core: slowdown 2 (the CPU share is 1).
    live = LiveStage(
        calls={1: (6.0, 50)}, dispatch_ms=0.0, dispatches=0, concurrency={2.0: 50}, idle_gaps={math.inf: 50}
    )
    calibrated, done = calibrated_from(live, cores=1.0)
    assert done.contention == pytest.approx(2.0)
    # 6 ms = 2 x (call + 1 ms wake-up): the call alone 2 ms, as profiled.
    assert calibrated.points("cpu")[0].latency_ms.mean == pytest.approx(2.0)


def test_the_routers_gap_histogram_reaches_calibration() -> None:
    metrics = "\n".join(
        [
            "# TYPE inferline_router_call_seconds summary",
            'inferline_router_call_seconds_count{batch_size="1",stage="s"} 6',
            'inferline_router_call_seconds_sum{batch_size="1",stage="s"} 0.018',
            "# TYPE inferline_router_idle_gap_seconds histogram",
            'inferline_router_idle_gap_seconds_bucket{le="0.001",stage="s"} 2',
            'inferline_router_idle_gap_seconds_bucket{le="0.004",stage="s"} 3',
            'inferline_router_idle_gap_seconds_bucket{le="+Inf",stage="s"} 5',
            'inferline_router_idle_gap_seconds_count{stage="s"} 5',
            'inferline_router_idle_gap_seconds_sum{stage="s"} 1.2',
            "",
        ]
    )
    live = live_stages(metrics)["s"]
    assert live.idle_gaps == {0.0005: 2, 0.002: 1, math.inf: 2}
    without = live_stages(metrics.split("# TYPE inferline_router_idle_gap_seconds")[0])["s"]
    assert without.idle_gaps is None
    assert woken_ms(live.idle_gaps, 1.0, 2.0) == pytest.approx(
        2 * (1 - math.exp(-0.25)) + (1 - math.exp(-1.0)) + 2, abs=1e-9
    )
