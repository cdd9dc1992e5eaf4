"""The open-loop replay engine (fake async sends, no network) and the estimator's prediction for a plan."""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray

from inferline.catalog import HardwareCatalog, load_catalog
from inferline.errors import PlanError
from inferline.plan import Plan
from inferline.planner.planning import make_plan
from inferline.profiles import ModelProfile, load_profiles
from inferline.router.prediction import predicted_latencies_ms, predicted_p99_ms
from inferline.router.replay import ReplayProgress, ReplayResult, per_second, replay, run_results
from inferline.spec import PipelineSpec, load_spec
from inferline.traces import load_trace

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# Timing tolerance for a loaded test machine; the effects tested are several times larger.
TOL_S = 0.15  # well under the slow query's 300 ms, above a loaded machine's scheduling stalls


class Overloaded(Exception):
    pass


def classify(exc: BaseException) -> str:
    if isinstance(exc, Overloaded):
        return "overloaded"
    return "timeout" if isinstance(exc, TimeoutError) else "failed"


def test_open_loop_a_slow_query_does_not_delay_later_ones() -> None:
    arrivals = np.arange(21) * 0.010
    started: dict[int, float] = {}

    async def main() -> ReplayResult:
        loop = asyncio.get_running_loop()

        async def send(i: int) -> None:
            started[i] = loop.time()
            await asyncio.sleep(0.3 if i == 0 else 0.002)

        # Between the stall the others may take (TOL_S) and the slow query's 300 ms: only it misses.
        return await replay(send, arrivals, slo_ms=200.0)

    result = asyncio.run(main())
    assert result.answered == 21
    assert result.latencies_ms[0] >= 300.0
    # A closed loop would hold query 1 until query 0 answered (~300 ms late).
    assert np.all(result.latencies_ms[1:] < 1000 * TOL_S)
    actual = np.array([started[i] for i in range(21)]) - started[0]
    np.testing.assert_allclose(actual, arrivals, atol=TOL_S)
    np.testing.assert_allclose(result.started_s - result.scheduled_s, 0.0, atol=TOL_S)
    assert result.slo_miss_rate == pytest.approx(1 / 21)


def test_latency_runs_from_the_scheduled_time_when_the_loop_lags() -> None:
    arrivals = np.array([0.0, 0.010, 0.020])

    async def send(i: int) -> None:
        if i == 0:
            time.sleep(0.15)  # blocks the event loop: queries 1 and 2 start ~140 ms late
        await asyncio.sleep(0.001)

    result = asyncio.run(replay(send, arrivals, slo_ms=100.0))
    lag_ms = (result.started_s - result.scheduled_s) * 1000.0
    assert lag_ms[1] >= 100.0 and lag_ms[2] >= 90.0
    # Their own sends took ~1 ms; the late start counts as latency (no coordinated omission).
    assert np.all(result.latencies_ms[1:] >= lag_ms[1:])
    assert result.latencies_ms[1] >= 100.0
    np.testing.assert_allclose(result.latencies_ms, (result.finished_s - result.scheduled_s) * 1000.0)
    assert result.send_lag_max_ms == pytest.approx(lag_ms.max())
    assert result.send_lag_max_ms >= 100.0
    warnings = run_results(result, slo_ms=None, estimated_p99_ms=None, cost_per_hour=None, decisions=[])["warnings"]
    assert len(warnings) == 1 and "fell behind" in warnings[0]


def test_counts_add_up_with_ok_failing_overloaded_and_timing_out_queries() -> None:
    n = 20
    arrivals = np.arange(n) * 0.002
    cancelled: list[int] = []

    async def send(i: int) -> None:
        kind = i % 4
        if kind == 1:
            raise RuntimeError("replica died")
        if kind == 2:
            raise Overloaded()
        if kind == 3:
            try:
                await asyncio.sleep(5.0)
            except asyncio.CancelledError:
                cancelled.append(i)
                raise
        await asyncio.sleep(0.001)

    progress: list[ReplayProgress] = []
    started = time.monotonic()
    # An SLO far above the 1 ms sends: a full garbage collection of a heap earlier tests left (70 ms seen)
    # must not make an answered query miss.
    result = asyncio.run(replay(send, arrivals, 300.0, timeout_s=0.6, on_progress=progress.append, classify=classify))
    assert time.monotonic() - started < 2.0  # the timeout cut the 5 s sends short
    assert result.sent == n == result.answered + sum(result.errors.values())
    assert result.answered == 5
    assert result.errors == {"overloaded": 5, "failed": 5, "timeout": 5}
    assert sorted(cancelled) == [i for i in range(n) if i % 4 == 3]
    assert result.outcomes == tuple(("ok", "failed", "overloaded", "timeout")[i % 4] for i in range(n))
    assert np.array_equal(np.isnan(result.latencies_ms), np.arange(n) % 4 != 0)
    assert result.slo_miss_rate == pytest.approx(15 / 20)
    assert math.isinf(result.p99_ms)  # 75% errors: errors count as infinitely late
    assert result.p99_answered_ms < 300.0  # 1 ms sends, far from the 600 ms timeout
    # At least one report while the timeouts ran (every 0.5 s) and a final one with everything counted.
    assert len(progress) >= 2
    assert progress[-1] == ReplayProgress(sent=n, answered=5, errors=15, elapsed_s=progress[-1].elapsed_s, total=n)


def test_default_classifier_and_a_classifier_that_says_ok() -> None:
    async def send(i: int) -> None:
        raise (TimeoutError() if i == 0 else ValueError())

    result = asyncio.run(replay(send, np.array([0.0, 0.0]), None))
    assert result.outcomes == ("timeout", "failed")
    assert result.slo_miss_rate is None
    result = asyncio.run(replay(send, np.array([0.0, 0.0]), None, classify=lambda exc: "ok"))
    assert result.answered == 0 and result.errors["failed"] == 2  # a query that raised is never ok


def synthetic(latencies_ms: list[float], errors: set[int], slo_ms: float | None = 95.5) -> ReplayResult:
    n = len(latencies_ms)
    scheduled = np.arange(n) * 0.01
    finished = scheduled + np.array(latencies_ms) / 1000.0
    outcomes = tuple("failed" if i in errors else "ok" for i in range(n))
    return ReplayResult.of(scheduled, scheduled.copy(), finished, outcomes, slo_ms)


def test_p99_is_nearest_rank_over_all_queries_with_errors_as_misses() -> None:
    lat = [float(v) for v in range(1, 101)]  # 1..100 ms
    clean = synthetic(lat, set())
    assert clean.p99_ms == pytest.approx(99.0)  # rank ceil(0.99 * 100) = 99
    assert clean.slo_miss_rate == pytest.approx(5 / 100)  # 96..100 over 95.5 ms (off the float boundary)
    one = synthetic(lat, {49})  # the 50 ms query errored: rank 99 of 99 finite + inf is 100 ms
    assert one.p99_ms == pytest.approx(100.0)
    assert one.p99_answered_ms == pytest.approx(100.0)  # rank ceil(0.99 * 99) = 99 of 99: the largest
    assert one.slo_miss_rate == pytest.approx(6 / 100)
    two = synthetic(lat, {0, 49})
    assert math.isinf(two.p99_ms)
    assert two.p99_answered_ms == pytest.approx(100.0)  # rank ceil(0.99 * 98) = 98: the largest
    assert two.slo_miss_rate == pytest.approx(7 / 100)
    assert two.errors == {"overloaded": 0, "failed": 2, "timeout": 0}


DESIGN_KEYS = {"queries", "p99_ms", "slo_ms", "slo_miss_rate", "cost", "cost_per_hour", "decisions"}
REPLAY_KEYS = {"sent", "answered", "errors", "throughput_qps", "estimated_p99_ms"}
EXTRA_KEYS = {"errors_by_kind", "p99_answered_ms", "send_lag_p99_ms"}


def test_run_results_has_the_design_and_replay_keys() -> None:
    lat = [float(v) for v in range(1, 101)]
    result = synthetic(lat, {0, 49})
    decisions = [{"time_s": 0.5, "stage": "detect", "replicas": 2, "reason": "burst"}]
    out = run_results(result, slo_ms=95.5, estimated_p99_ms=88.1234, cost_per_hour=0.36, decisions=decisions)
    assert set(out) >= DESIGN_KEYS | REPLAY_KEYS | EXTRA_KEYS
    assert out["queries"] == out["sent"] == 100 and out["answered"] == 98
    assert out["errors"] == 2 and out["errors_by_kind"]["failed"] == 2
    assert out["p99_ms"] is None  # inf: over 1% of the queries errored
    assert out["p99_answered_ms"] == pytest.approx(100.0)
    assert out["slo_ms"] == 95.5 and out["slo_miss_rate"] == pytest.approx(0.07)
    assert out["estimated_p99_ms"] == 88.123
    assert out["cost"] == pytest.approx(0.36 * result.duration_s / 3600.0, abs=1e-6)
    assert result.duration_s == pytest.approx(0.99 + 0.1)  # the last query is scheduled at 0.99 s, takes 100 ms
    assert out["throughput_qps"] == pytest.approx(98 / result.duration_s, abs=1e-3)
    assert out["decisions"] == decisions and out["warnings"] == []
    json.dumps(out, allow_nan=False)  # valid JSON: no inf or NaN
    # Another SLO in the report recomputes the miss rate; no SLO anywhere gives none.
    assert run_results(result, slo_ms=50.5, estimated_p99_ms=None, cost_per_hour=None, decisions=[])[
        "slo_miss_rate"
    ] == pytest.approx(52 / 100)
    none = run_results(
        synthetic(lat, set(), None), slo_ms=None, estimated_p99_ms=None, cost_per_hour=None, decisions=[]
    )
    assert none["slo_miss_rate"] is None and none["cost"] is None and none["p99_ms"] == pytest.approx(99.0)


def test_per_second_series() -> None:
    scheduled = np.array([0.1, 0.2, 0.9, 1.5, 2.2])
    finished = np.array([0.15, 1.1, 1.2, 1.6, 2.3])
    outcomes = ("ok", "ok", "ok", "failed", "ok")
    result = ReplayResult.of(scheduled, scheduled.copy(), finished, outcomes, 100.0)
    arrivals, answered, p99s = per_second(result)
    assert arrivals.tolist() == [3, 1, 1]
    assert answered.tolist() == [1, 2, 1]
    assert p99s[0] == pytest.approx(900.0) and math.isinf(p99s[1]) and p99s[2] == pytest.approx(100.0)


def test_empty_and_unordered_traces() -> None:
    async def send(i: int) -> None:
        return None

    empty = asyncio.run(replay(send, np.array([]), 100.0))
    assert empty.sent == 0 and math.isnan(empty.p99_ms) and empty.slo_miss_rate == 0.0
    with pytest.raises(ValueError, match="ascending"):
        asyncio.run(replay(send, np.array([1.0, 0.5]), 100.0))


@dataclass(frozen=True)
class Example:
    spec: PipelineSpec
    profiles: dict[str, ModelProfile]
    catalog: HardwareCatalog
    plan: Plan
    arrivals: NDArray[np.float64]

    def p99(self, replicas: dict[str, int] | None = None) -> float:
        return predicted_p99_ms(self.spec, self.profiles, self.catalog, self.plan, self.arrivals, replicas=replicas)


@pytest.fixture(scope="module")
def example() -> Example:
    spec = load_spec(EXAMPLES / "pipelines" / "local-emulated.yaml")
    profiles = load_profiles(EXAMPLES / "profiles" / "measured-cpu")
    catalog = load_catalog(EXAMPLES / "catalog-local.yaml")
    arrivals = load_trace("gamma:rate=150,cv=2,duration=20,seed=1")
    assert spec.slo_ms is not None
    plan = make_plan(spec, profiles, catalog, arrivals, spec.slo_ms)  # seed 0, as the prediction's default
    assert plan.feasible and plan.estimated_p99_ms is not None
    return Example(spec, profiles, catalog, plan, arrivals)


def test_prediction_equals_the_plans_estimate_for_its_trace(example: Example) -> None:
    assert round(example.p99(), 3) == example.plan.estimated_p99_ms
    latencies = predicted_latencies_ms(example.spec, example.profiles, example.catalog, example.plan, example.arrivals)
    assert latencies.shape == example.arrivals.shape and np.all(latencies > 0)


def test_more_replicas_predict_no_higher_p99(example: Example) -> None:
    base = example.p99()
    more = {name: s.replicas + 2 for name, s in example.plan.stages.items()}
    scaled = example.p99(more)
    assert scaled <= base
    assert scaled < 0.5 * base  # the plan is tight on this trace: two more replicas each help a lot
    # The override is used stage by stage: scaling one stage alone lands in between.
    first = next(iter(more))
    assert scaled <= example.p99({first: more[first]}) <= base
    with pytest.raises(PlanError, match="unknown stages"):
        example.p99({"nope": 3})
    with pytest.raises(PlanError, match="below 1"):
        example.p99({first: 0})
