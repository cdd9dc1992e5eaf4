"""Replicas sharing cores (`shared_core_latencies_s`): the estimator where cores suffice, closed forms where not."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from inferline.planner.estimator import Estimator
from inferline.planner.pipeline import StageConfig
from inferline.planner.shared_cores import shared_core_latencies_s, shared_core_run
from tests.reference_sim import build_pipeline
from tests.unit.test_estimator_reference import SEEDS, make_case


@pytest.mark.parametrize("seed", SEEDS)
def test_equals_the_estimator_when_the_cores_suffice(seed: int) -> None:
    case = make_case(seed)
    est = Estimator(case.model, case.table, case.arrivals, math.inf, seed=seed)
    for config in case.configs:
        replicas = sum(c.replicas for c in config)
        expected, expected_stages = est.latencies_s(config)
        for cores in (replicas, replicas + 0.5):
            got, stages = shared_core_latencies_s(est, config, cores)
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12, err_msg=f"config {config}")
            if case.dyadic:
                np.testing.assert_array_equal(got, expected)
            for s in range(case.model.size):
                np.testing.assert_allclose(stages[s], expected_stages[s], rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", SEEDS[:40])
def test_equals_the_estimator_with_fractional_shares_that_never_fill_the_cores(seed: int) -> None:
    case = make_case(seed)
    rng = np.random.default_rng(seed)
    table = tuple(
        dataclasses.replace(
            stage,
            options={
                hw: dataclasses.replace(o, cpu_share=rng.uniform(0.05, 1.0, o.service_s.size))
                for hw, o in stage.options.items()
            },
        )
        for stage in case.table
    )
    est = Estimator(case.model, table, case.arrivals, math.inf, seed=seed)
    for config in case.configs:
        # Every batch demands at most one core: as many cores as replicas are never crowded, however
        # the fractional shares add up.
        expected, _ = est.latencies_s(config)
        got, _ = shared_core_latencies_s(est, config, sum(c.replicas for c in config))
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
        if case.dyadic:
            np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("seed", SEEDS[:40])
def test_equals_the_estimator_on_arrivals_out_of_order(seed: int) -> None:
    case = make_case(seed)
    shuffled = np.random.default_rng(seed).permutation(case.arrivals)
    est = Estimator(case.model, case.table, shuffled, math.inf, seed=seed)
    for config in case.configs:
        expected, _ = est.latencies_s(config)
        got, _ = shared_core_latencies_s(est, config, sum(c.replicas for c in config))
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_queries_ready_at_once_keep_their_query_order_when_arrivals_are_out_of_order() -> None:
    # a (batch 4, 2 s) -> b (batch 1, 1 s). Queries 0 and 1 finish a together at 4 s; the estimator
    # serves them at b in query order: 0 first, although 1 arrived earlier.
    profile_a = {
        "cpu": [{"batch_size": 1, "latency_ms": {"mean": 2000.0}}, {"batch_size": 4, "latency_ms": {"mean": 2000.0}}]
    }
    profile_b = {"cpu": [{"batch_size": 1, "latency_ms": {"mean": 1000.0}}]}
    model, table = build_pipeline(
        [{"name": "a", "model": "ma"}, {"name": "b", "model": "mb", "after": ["a"]}], {"ma": profile_a, "mb": profile_b}
    )
    est = Estimator(model, table, np.array([1.5, 1.0, 0.0]), math.inf, seed=0)
    config = (StageConfig("cpu", 4, 1), StageConfig("cpu", 1, 1))
    expected, stages = est.latencies_s(config)
    got, got_stages = shared_core_latencies_s(est, config, cores=2)
    np.testing.assert_array_equal(got_stages[1], stages[1])
    np.testing.assert_array_equal(got, expected)
    assert stages[1][0] < stages[1][1]


def one_stage(service_ms: float, share: float | None, replicas: int, arrivals: list[float]) -> Estimator:
    point: dict[str, float] = {"mean": service_ms}
    if share is not None:
        point["server_cpu_ms"] = share * service_ms
    profile = {"cpu": [{"batch_size": 1, "latency_ms": point}]}
    model, table = build_pipeline([{"name": "only", "model": "m"}], {"m": profile})
    return Estimator(model, table, np.asarray(arrivals), math.inf, seed=0)


def test_two_compute_bound_calls_on_one_core_take_twice_as_long() -> None:
    est = one_stage(1000.0, 1.0, replicas=2, arrivals=[0.0, 0.0])
    latencies, _ = shared_core_latencies_s(est, (StageConfig("cpu", 1, 2),), cores=1)
    np.testing.assert_allclose(latencies, [2.0, 2.0], rtol=0, atol=1e-12)


def test_a_call_runs_at_full_speed_again_once_alone() -> None:
    # Alone until 0.5 s (half done), shared until the first finishes at 1.5 s (the second then has
    # 0.5 s of work left), alone again until 2.0 s.
    est = one_stage(1000.0, 1.0, replicas=2, arrivals=[0.0, 0.5])
    latencies, _ = shared_core_latencies_s(est, (StageConfig("cpu", 1, 2),), cores=1)
    np.testing.assert_allclose(latencies, [1.5, 1.5], rtol=0, atol=1e-12)


@pytest.mark.parametrize(("share", "expected_s"), [(0.0, 1.0), (0.5, 1.25), (1.0, 3.0)])
def test_only_the_share_on_a_core_is_slowed(share: float, expected_s: float) -> None:
    # Three calls at once on one core demand 3 x share cores: with share 0.5 each core is shared
    # by 1.5 calls, and a call takes 0.5 + 0.5 * 1.5 = 1.25 times as long.
    est = one_stage(1000.0, share, replicas=3, arrivals=[0.0, 0.0, 0.0])
    latencies, _ = shared_core_latencies_s(est, (StageConfig("cpu", 1, 3),), cores=1)
    np.testing.assert_allclose(latencies, expected_s, rtol=0, atol=1e-12)


def test_a_profile_without_cpu_time_counts_as_compute_bound() -> None:
    est = one_stage(1000.0, None, replicas=3, arrivals=[0.0, 0.0, 0.0])
    latencies, _ = shared_core_latencies_s(est, (StageConfig("cpu", 1, 3),), cores=1)
    np.testing.assert_allclose(latencies, 3.0, rtol=0, atol=1e-12)


def test_stages_of_a_pipeline_slow_each_other() -> None:
    # a -> b, one replica each, one core: query 0 runs at a alone (1 s); then b(query 0) and
    # a(query 1, arrived at 0.5) share the core until both finish, 2 s later.
    profile = {"cpu": [{"batch_size": 1, "latency_ms": {"mean": 1000.0, "server_cpu_ms": 1000.0}}]}
    model, table = build_pipeline(
        [{"name": "a", "model": "m"}, {"name": "b", "model": "m", "after": ["a"]}], {"m": profile}
    )
    est = Estimator(model, table, np.array([0.0, 0.5]), math.inf, seed=0)
    config = (StageConfig("cpu", 1, 1), StageConfig("cpu", 1, 1))
    own, _ = est.latencies_s(config)
    np.testing.assert_allclose(own, [2.0, 2.5], rtol=0, atol=1e-12)
    latencies, stages = shared_core_latencies_s(est, config, cores=1)
    np.testing.assert_allclose(stages[0], [1.0, 3.0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(stages[1], [3.0, 4.0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(latencies, [3.0, 3.5], rtol=0, atol=1e-12)


def test_cores_must_be_positive() -> None:
    est = one_stage(10.0, 1.0, replicas=1, arrivals=[0.0])
    with pytest.raises(ValueError, match="cores must be positive"):
        shared_core_latencies_s(est, (StageConfig("cpu", 1, 1),), cores=0)


@pytest.mark.parametrize(("background_s", "expected_s"), [((), 1.0), ((0.0,), 1.0), ((1.0,), 2.0), ((0.5,), 1.5)])
def test_a_query_passes_the_process_beside_the_replicas_first(
    background_s: tuple[float, ...], expected_s: float
) -> None:
    # One core, a 1 s compute-bound call, and a process beside it (a load generator) with
    # background_s of work for the query, done before the query reaches the stage.
    est = one_stage(1000.0, 1.0, replicas=1, arrivals=[0.0])
    latencies, _ = shared_core_latencies_s(est, (StageConfig("cpu", 1, 1),), cores=1, background_s=background_s)
    np.testing.assert_allclose(latencies, [expected_s], rtol=0, atol=1e-12)


def test_the_process_beside_the_replicas_works_on_one_query_at_a_time() -> None:
    # Two queries at once, 0.5 s of the process's work each, done one after the other (one thread):
    # the first reaches its replica at 0.5 s, the second at 1 s; with 3 cores nothing is crowded.
    est = one_stage(1000.0, 1.0, replicas=2, arrivals=[0.0, 0.0])
    latencies, _ = shared_core_latencies_s(est, (StageConfig("cpu", 1, 2),), cores=3, background_s=(0.5,))
    np.testing.assert_allclose(latencies, [1.5, 2.0], rtol=0, atol=1e-12)
    # On 1 core: the process alone until 0.5 s; then it and the first call at half speed, so its
    # second query's work ends at 1.5 s, when the first call has 0.5 s left; the two calls then
    # share the core: the first ends at 2.5 s, the second (0.5 s done by then) at 3 s.
    slower, _ = shared_core_latencies_s(est, (StageConfig("cpu", 1, 2),), cores=1, background_s=(0.5,))
    np.testing.assert_allclose(slower, [2.5, 3.0], rtol=0, atol=1e-12)


def test_processes_beside_the_replicas_are_passed_in_order() -> None:
    # The load generator (0.25 s a query) then the router (0.5 s): the first query reaches its
    # replica at 0.75 s, the second waits for the router until 1.25 s.
    est = one_stage(1000.0, 1.0, replicas=2, arrivals=[0.0, 0.0])
    latencies, _ = shared_core_latencies_s(est, (StageConfig("cpu", 1, 2),), cores=4, background_s=(0.25, 0.5))
    np.testing.assert_allclose(latencies, [1.75, 2.25], rtol=0, atol=1e-12)


def test_the_time_outside_the_stages_is_the_passage_through_the_processes_beside_them() -> None:
    # As above: the queries leave the router at 0.75 s and 1.25 s, then take 1 s in their stage.
    est = one_stage(1000.0, 1.0, replicas=2, arrivals=[0.0, 0.0])
    run = shared_core_run(est, (StageConfig("cpu", 1, 2),), cores=4, background_s=(0.25, 0.5))
    np.testing.assert_allclose(run.outside_s(), [0.75, 1.25], rtol=0, atol=1e-12)
    np.testing.assert_allclose(run.latencies_s(), [1.75, 2.25], rtol=0, atol=1e-12)
    # Out of order: query 1 (at 0) passes the process by 0.5 s; query 0 (at 0.1) waits for it and
    # passes by 1.0 s. Each comes back in the caller's order.
    late_first = one_stage(1000.0, 1.0, replicas=2, arrivals=[0.1, 0.0])
    run = shared_core_run(late_first, (StageConfig("cpu", 1, 2),), cores=4, background_s=(0.5,))
    np.testing.assert_allclose(run.outside_s(), [0.9, 0.5], rtol=0, atol=1e-12)
    alone = shared_core_run(est, (StageConfig("cpu", 1, 2),), cores=4)
    np.testing.assert_array_equal(alone.outside_s(), [0.0, 0.0])


def test_queueing_counts_inside_the_stages_and_side_by_side_branches_add_up() -> None:
    # a (1 s) -> b and c (1 s each) side by side, one replica each, cores to spare. Query 1 waits
    # 1 s in a's queue: inside the stages. Each query's branches take 1 s at once but count 2 s, as
    # a router's per-stage metrics count them: 1 s less than nothing outside.
    profile = {"cpu": [{"batch_size": 1, "latency_ms": {"mean": 1000.0}}]}
    model, table = build_pipeline(
        [
            {"name": "a", "model": "m"},
            {"name": "b", "model": "m", "after": ["a"]},
            {"name": "c", "model": "m", "after": ["a"]},
        ],
        {"m": profile},
    )
    est = Estimator(model, table, np.array([0.0, 0.0]), math.inf, seed=0)
    one = StageConfig("cpu", 1, 1)
    run = shared_core_run(est, (one, one, one), cores=8)
    np.testing.assert_allclose(run.latencies_s(), [2.0, 3.0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(run.outside_s(), [-1.0, -1.0], rtol=0, atol=1e-12)


def test_background_cpu_must_not_be_negative() -> None:
    est = one_stage(10.0, 1.0, replicas=1, arrivals=[0.0])
    with pytest.raises(ValueError, match="background CPU per query must be >= 0"):
        shared_core_latencies_s(est, (StageConfig("cpu", 1, 1),), cores=1, background_s=(-0.1,))


def with_interference(est: Estimator, g: float) -> Estimator:
    """The estimator with every stage's option on "cpu" given interference g (as a profile's would)."""
    tables = tuple(
        dataclasses.replace(t, options={"cpu": dataclasses.replace(t.options["cpu"], interference=g)})
        for t in est.table
    )
    return Estimator(est.model, tables, est.arrivals_s, math.inf, seed=0)


@pytest.mark.parametrize(("g", "expected_s"), [(0.0, 1.0), (0.25, 1.25), (0.5, 1.5)])
def test_interference_slows_calls_below_the_cores_count(g: float, expected_s: float) -> None:
    # Two compute-bound calls at once on 2 cores: the fluid rule has each alone on a core; with
    # interference g each core's worth of the other call's demand makes a call 1 + g times as long.
    est = with_interference(one_stage(1000.0, 1.0, replicas=2, arrivals=[0.0, 0.0]), g)
    latencies, _ = shared_core_latencies_s(est, (StageConfig("cpu", 1, 2),), cores=2)
    np.testing.assert_allclose(latencies, expected_s, rtol=0, atol=1e-12)


def test_interference_gives_way_to_the_cores_count_where_that_slows_more() -> None:
    # Three calls at once on one core: max(3 / 1, 1 + 0.25 * 2) = 3, as without interference.
    est = with_interference(one_stage(1000.0, 1.0, replicas=3, arrivals=[0.0, 0.0, 0.0]), 0.25)
    latencies, _ = shared_core_latencies_s(est, (StageConfig("cpu", 1, 3),), cores=1)
    np.testing.assert_allclose(latencies, 3.0, rtol=0, atol=1e-12)


def test_interference_weighs_only_the_share_on_a_core() -> None:
    # Two calls of share 0.5 on 2 cores with g = 1: each core is shared by 1 + 1 * 0.5 = 1.5 calls,
    # and a call takes 0.5 + 0.5 * 1.5 = 1.25 times as long.
    est = with_interference(one_stage(1000.0, 0.5, replicas=2, arrivals=[0.0, 0.0]), 1.0)
    latencies, _ = shared_core_latencies_s(est, (StageConfig("cpu", 1, 2),), cores=2)
    np.testing.assert_allclose(latencies, 1.25, rtol=0, atol=1e-12)


def test_a_call_slowed_by_interference_speeds_up_again_once_alone() -> None:
    # g = 1 on 2 cores: alone until 0.5 s (half done); beside the second at half speed until the
    # first finishes at 1.5 s (the second then has 0.5 s of work left), alone again until 2.0 s.
    est = with_interference(one_stage(1000.0, 1.0, replicas=2, arrivals=[0.0, 0.5]), 1.0)
    latencies, _ = shared_core_latencies_s(est, (StageConfig("cpu", 1, 2),), cores=2)
    np.testing.assert_allclose(latencies, [1.5, 1.5], rtol=0, atol=1e-12)


def test_interference_must_not_be_negative() -> None:
    from inferline.planner.shared_cores import start_shared

    est = one_stage(10.0, 1.0, replicas=1, arrivals=[0.0])
    option = est.table[0].options["cpu"]
    with pytest.raises(ValueError, match="interference must be finite and >= 0"):
        start_shared(
            est.model, [option.service_s], [option.cpu_share], (StageConfig("cpu", 1, 1),), est.arrivals_s,
            est.visits, 2.0, interference=[-0.1],
        )  # fmt: skip
