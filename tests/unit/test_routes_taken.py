"""The replay's estimate with the conditional edges its queries took (read from their answers)
instead of the estimator's sampled ones."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from inferline.plan import load_plan
from inferline.planner.closedloop import simulate_run
from inferline.planner.estimator import Estimator, p99
from inferline.planner.pipeline import check_visits, pipeline_model, sample_visits
from inferline.planner.shared_cores import shared_core_latencies_s
from inferline.profiles import load_profiles
from inferline.replay_command import Target, plan_catalog, results_for
from inferline.router.prediction import predicted_latencies_ms, routes_taken
from inferline.spec import load_spec, parse_spec
from inferline.traces import load_trace
from tests.reference_sim import simulate
from tests.unit.test_estimator_reference import make_case
from tests.unit.test_startup import SPEC, _live_at, fake_replay, plan_path  # noqa: F401 (a fixture)

CASES = [2, 8, 13, 24]  # cases with conditional edges: other visits than the sampled ones
CHAIN = {"name": "chain", "stages": [{"name": "a", "model": "m"}, {"name": "b", "model": "m", "after": ["a"]}]}


def other_visits(case: Any) -> np.ndarray[Any, Any]:
    return sample_visits(case.model, case.arrivals.size, np.random.default_rng(case.seed + 1000))


@pytest.mark.parametrize("seed", CASES)
def test_given_visits_are_simulated_as_the_reference_simulates_them(seed: int) -> None:
    case = make_case(seed)
    visits = other_visits(case)
    assert not np.array_equal(visits, sample_visits(case.model, case.arrivals.size, np.random.default_rng(case.seed)))
    est = Estimator(case.model, case.table, case.arrivals, math.inf, seed=case.seed, visits=visits)
    assert np.array_equal(est.visits, visits)
    for config in case.configs:
        ref = simulate(
            case.arrivals, case.parents, visits,
            [case.table[s].option(c.hardware).service_s for s, c in enumerate(config)],
            [c.max_batch_size for c in config], [c.replicas for c in config],
        )  # fmt: skip
        latencies, _ = est.latencies_s(config)
        np.testing.assert_allclose(latencies, ref.latencies_s, rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", CASES)
def test_the_closed_loop_takes_given_visits_too(seed: int) -> None:
    case = make_case(seed)
    config = case.configs[0]
    visits = other_visits(case)
    cores = max(0.5, sum(c.replicas for c in config) / 3)
    est = Estimator(case.model, case.table, case.arrivals, math.inf, visits=visits)
    expected, _ = shared_core_latencies_s(est, config, cores)
    tick = float(case.arrivals[-1] - case.arrivals[0]) / 7
    args = (case.model, case.table, config, case.arrivals, math.inf, None)
    run = simulate_run(*args, tick_s=tick, seed=case.seed, cores=cores, visits=visits)
    np.testing.assert_allclose(run.latencies_s, expected, rtol=0, atol=1e-12)
    sampled = simulate_run(*args, tick_s=tick, seed=case.seed, cores=cores)
    assert not np.array_equal(sampled.latencies_s, run.latencies_s)


def test_visits_that_no_route_could_produce_are_refused() -> None:
    model = pipeline_model(parse_spec(CHAIN))
    good = np.array([[True, True, False], [True, False, False]])
    assert np.array_equal(check_visits(model, good, 3), good)
    with pytest.raises(ValueError, match=r"visits must be a \(2, 4\) boolean array"):
        check_visits(model, good, 4)
    with pytest.raises(ValueError, match="boolean array"):
        check_visits(model, good.astype(np.int64), 3)
    with pytest.raises(ValueError, match="visits stage 'b' but none of its parents"):
        check_visits(model, np.array([[True, False, True], [True, True, False]]), 3)


CASCADE = {
    "name": "cascade",
    "stages": [  # listed out of order: visits are in the estimator's (topological) order
        {"name": "tail", "model": "t", "after": ["large"], "probability": 0.5},
        {"name": "small", "model": "s"},
        {"name": "large", "model": "l", "after": ["small"], "probability": 0.3},
    ],
}


def test_routes_are_read_from_the_answers_output_names() -> None:
    spec = parse_spec(CASCADE)
    answered: list[tuple[str, ...] | None] = [
        ("small.OUT",),
        ("small.OUT", "large.OUT", "large.SCORES"),
        None,  # not answered: sampled
        ("small.OUT", "large.OUT", "tail.OUT"),
        ("small.OUT", "tail.OUT"),  # no route reaches `tail` without `large`: as not answered
        ("small.OUT",),
        ("OUTPUT",),  # another pipeline's answer (no entry stage): as not answered
        ("large.OUT",),  # without the entry stage, which the router always runs: as not answered
    ]
    got = routes_taken(spec, answered, seed=7)
    assert got is not None
    visits, known = got
    assert known == 4
    sampled = sample_visits(pipeline_model(spec), len(answered), np.random.default_rng(7))
    names = pipeline_model(spec).names
    assert names == ("small", "large", "tail")
    expected = {0: [1, 0, 0], 1: [1, 1, 0], 3: [1, 1, 1], 5: [1, 0, 0]}
    for q in range(len(answered)):
        want = expected[q] if q in expected else sampled[:, q]
        assert visits[:, q].tolist() == [bool(v) for v in want], q
    # Nothing to read: no query answered, or no conditional edge to take.
    assert routes_taken(spec, [None, None]) is None
    assert routes_taken(spec, [("OUTPUT",)]) is None
    assert routes_taken(parse_spec(CHAIN), [("a.X", "b.X")]) is None


def test_the_replays_estimate_takes_the_routes_its_queries_took(plan_path: Any) -> None:  # noqa: F811
    plan, spec = load_plan(plan_path), load_spec(SPEC)
    arrivals = load_trace("gamma:rate=100,cv=2,duration=20,seed=3")
    result = fake_replay(arrivals)
    static = Target("127.0.0.1:1", spec.name, plan, spec, None, "none")
    sampled = results_for(static, result, arrivals, 0.0)
    assert sampled["estimate"] == "static plan"
    # Every query went on to `classify` (the spec's probability is 0.6): more work than sampled.
    every: list[tuple[str, ...] | None] = [("detect.OUTPUT", "classify.OUTPUT")] * arrivals.size
    took = results_for(static, result, arrivals, 0.0, answered=every)
    assert took["estimate"] == "static plan, conditional edges as the queries took them"
    all_visit = np.ones((2, arrivals.size), dtype=np.bool_)
    profiles = load_profiles(plan.profiles)
    expected = predicted_latencies_ms(spec, profiles, plan_catalog(plan), plan, arrivals, visits=all_visit)
    assert took["estimated_p99_ms"] == pytest.approx(p99(expected), abs=5e-4)  # results round to the µs
    assert took["estimated_p99_ms"] > sampled["estimated_p99_ms"]
    # Half of them unanswered: sampled for those, and said so.
    half = [names if q % 2 else None for q, names in enumerate(every)]
    partly = results_for(static, result, arrivals, 0.0, answered=half)
    assert partly["estimate"].endswith(
        f"as the queries took them ({arrivals.size // 2} of {arrivals.size} queries; sampled for the rest)"
    )
    # The closed loop of a tuned run takes them as well.
    tuned = Target("127.0.0.1:1", spec.name, plan, spec, None, "inferline")
    tuned_took = results_for(tuned, result, arrivals, 0.0, answered=every)
    assert tuned_took["estimate"].endswith(", conditional edges as the queries took them")
    assert tuned_took["estimated_p99_ms"] > results_for(tuned, result, arrivals, 0.0)["estimated_p99_ms"]
    # So does the estimate from the run's own service times, static or closed-loop.
    live = _live_at(plan, spec, 1.0, 500)
    for target, estimate in ((static, took), (tuned, tuned_took)):
        from_run = results_for(target, result, arrivals, 0.0, live=live, answered=every)["estimated_from_run_p99_ms"]
        assert from_run == pytest.approx(estimate["estimated_p99_ms"], rel=1e-3)
        assert from_run > results_for(target, result, arrivals, 0.0, live=live)["estimated_from_run_p99_ms"]
