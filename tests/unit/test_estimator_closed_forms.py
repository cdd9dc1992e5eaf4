"""The estimator against results known in closed form (queueing theory and exact hand counts)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from inferline.planner.costtable import CostTable, HardwareOption
from inferline.planner.estimator import Estimator
from inferline.planner.pipeline import PipelineModel, StageConfig, sample_visits
from tests.reference_sim import build_pipeline

GRID_MS = 1000.0 / 64.0  # 1/64 s: every sum below is exact in floating point


def single_stage(points: list[tuple[int, float]], hardware: str = "cpu") -> tuple[PipelineModel, CostTable]:
    profile = {"m": {hardware: [{"batch_size": b, "latency_ms": {"mean": ms}} for b, ms in points]}}
    return build_pipeline([{"name": "only", "model": "m"}], profile)


def latencies(
    arrivals: NDArray[np.float64], points: list[tuple[int, float]], batch: int, replicas: int
) -> tuple[NDArray[np.float64], HardwareOption]:
    model, table = single_stage(points)
    est = Estimator(model, table, np.asarray(arrivals, dtype=np.float64), slo_s=math.inf, seed=0)
    lat, _ = est.latencies_s((StageConfig("cpu", batch, replicas),))
    return lat, table[0].option("cpu")


# (a) deterministic arrivals, never any queueing ------------------------------------------------


@pytest.mark.parametrize(("period_s", "service_ms", "batch"), [(0.05, 20.0, 1), (0.0125, 12.4, 1), (0.03, 29.9, 4)])
def test_deterministic_arrivals_slower_than_service_never_wait(period_s: float, service_ms: float, batch: int) -> None:
    arrivals = 3.0 + period_s * np.arange(2000)
    points = [(1, service_ms)] if batch == 1 else [(1, service_ms), (batch, 4 * service_ms)]
    lat, _ = latencies(np.asarray(arrivals, dtype=np.float64), points, batch, replicas=1)
    np.testing.assert_allclose(lat, service_ms / 1000.0, rtol=0, atol=1e-12)


def test_deterministic_arrivals_exact_on_a_dyadic_grid() -> None:
    # service exactly equal to the period: each query arrives at the instant the previous one frees the replica
    arrivals = np.arange(1000) / 64.0
    lat, _ = latencies(arrivals, [(1, GRID_MS)], batch=1, replicas=1)
    assert np.all(lat == 1 / 64.0)


# (b) M/D/1 and (d) M/D/k at batch 1 ------------------------------------------------------------


def erlang_c(k: int, offered: float) -> float:
    """Probability that an arrival waits in M/M/k with offered load a = λ/μ (< k)."""
    head = sum(offered**i / math.factorial(i) for i in range(k))
    tail = offered**k / math.factorial(k) * k / (k - offered)
    return tail / (head + tail)


def md_k_mean_wait(k: int, lam: float, service_s: float) -> float:
    """Mean queueing delay of M/D/k: exact Pollaczek-Khinchine for k = 1, Cosmetatos's approximation
    (M/M/k wait scaled by 1/2 and a correction term; within ~1-2 % at moderate load) for k > 1."""
    rho = lam * service_s / k
    wq_mmk = erlang_c(k, lam * service_s) / (k / service_s - lam)
    correction = 1.0 + (1.0 - rho) * (k - 1) * (math.sqrt(4.0 + 5.0 * k) - 2.0) / (16.0 * rho * k)
    return 0.5 * correction * wq_mmk


def test_md_k_formula_reduces_to_pollaczek_khinchine() -> None:
    s, rho = 0.01, 0.6
    assert md_k_mean_wait(1, rho / s, s) == pytest.approx(rho * s / (2 * (1 - rho)), rel=1e-12)


@pytest.mark.parametrize(
    ("replicas", "rho", "wait_tol"),
    [(1, 0.5, 0.04), (1, 0.7, 0.04), (2, 0.6, 0.06), (3, 0.7, 0.06)],
)
def test_poisson_arrivals_deterministic_service_mean_latency(replicas: int, rho: float, wait_tol: float) -> None:
    service_s = 0.01
    lam = rho * replicas / service_s
    rng = np.random.default_rng(2)
    arrivals = np.cumsum(rng.exponential(1.0 / lam, size=200_000))
    lat, _ = latencies(arrivals, [(1, service_s * 1000.0)], batch=1, replicas=replicas)
    wait = md_k_mean_wait(replicas, lam, service_s)
    assert lat.mean() == pytest.approx(service_s + wait, rel=0.02)
    assert lat.mean() - service_s == pytest.approx(wait, rel=wait_tol)
    assert lat.min() == pytest.approx(service_s, abs=1e-12)


# (c) bursts of simultaneous arrivals -----------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "batch", "replicas"), [(12, 4, 1), (13, 4, 1), (7, 8, 1), (1, 4, 1), (24, 4, 3), (25, 2, 2), (9, 1, 2)]
)
def test_burst_is_served_in_full_batches_in_index_order(n: int, batch: int, replicas: int) -> None:
    # profiled at 1, 2 (if batch > 2) and batch; whole multiples of the grid so everything is exact
    points = sorted({(1, 2 * GRID_MS), (2, 3 * GRID_MS), (batch, (batch + 1) * GRID_MS)})
    points = [p for p in points if p[0] <= batch]
    arrivals = np.full(n, 5.0)
    lat, option = latencies(arrivals, points, batch, replicas)
    full = option.service_s[batch]
    last = n % batch
    expected = np.empty(n)
    for q in range(n):
        wave = q // (batch * replicas)  # batches that start at the same instant, one per replica
        size = batch if q // batch < n // batch else last
        expected[q] = wave * full + option.service_s[size]
    assert np.array_equal(lat, expected)
    if last == 0:
        # ceil-multiples of the batch service time
        waves = np.ceil((np.arange(n) + 1) / (batch * replicas))
        assert np.array_equal(lat, waves * full)


def test_burst_arriving_while_busy_waits_for_the_replica() -> None:
    # one query at t=0 (service 4/64 s) then 10 simultaneous at t=1/64: batches of 4, 4, 2 from t=4/64
    points = [(1, 4 * GRID_MS), (4, 10 * GRID_MS)]
    arrivals = np.array([0.0] + [1 / 64] * 10)
    lat, option = latencies(arrivals, points, batch=4, replicas=1)
    s4, s2 = option.service_s[4], option.service_s[2]
    assert s2 == 6 / 64  # interpolated: 4 + (10 - 4) * (2 - 1) / 3 grid units
    start = 4 / 64 - 1 / 64
    expected = [4 / 64] + [start + s4] * 4 + [start + 2 * s4] * 4 + [start + 2 * s4 + s2] * 2
    assert lat.tolist() == expected


def test_service_times_are_linearly_interpolated_and_held_below_the_smallest_size() -> None:
    _, table = single_stage([(2, 10.0), (4, 14.0), (8, 30.0)])
    service = table[0].option("cpu").service_s
    np.testing.assert_allclose(service * 1000.0, [0, 10, 10, 12, 14, 18, 22, 26, 30], rtol=0, atol=1e-12)
    lat, _ = latencies(np.full(3, 1.0), [(2, 10.0), (4, 14.0), (8, 30.0)], batch=8, replicas=1)
    np.testing.assert_allclose(lat, 0.012, rtol=0, atol=1e-12)
    lat, _ = latencies(np.array([1.0]), [(2, 10.0), (4, 14.0), (8, 30.0)], batch=2, replicas=1)
    np.testing.assert_allclose(lat, 0.010, rtol=0, atol=1e-12)


# (e) conditional edges and visit rates ---------------------------------------------------------

PROFILE = {"m": {"cpu": [{"batch_size": 1, "latency_ms": {"mean": GRID_MS}}]}}
STEP = 1 / 64  # the service time of every stage below; arrivals 1/8 s apart never queue
QUERIES = 200_000


def _check_frequencies(visits: NDArray[np.bool_], rates: NDArray[np.float64]) -> None:
    freq = visits.mean(axis=1)
    sigma = np.sqrt(np.maximum(rates * (1 - rates), 1e-12) / visits.shape[1])
    assert np.all(np.abs(freq - rates) <= 5 * sigma + 1e-12), (freq, rates)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 1.0])
def test_chain_second_stage_visited_with_its_probability(p: float) -> None:
    model, table = build_pipeline(
        [{"name": "a", "model": "m"}, {"name": "b", "model": "m", "after": ["a"], "probability": p}], PROFILE
    )
    np.testing.assert_allclose(model.visit_rates(), [1.0, p], rtol=0, atol=1e-12)
    arrivals = np.arange(QUERIES) / 8.0  # no queueing: one STEP per visited stage
    est = Estimator(model, table, arrivals, slo_s=math.inf, seed=7)
    lat, completions = est.latencies_s((StageConfig("cpu", 1, 1),) * 2)
    visited_b = np.isfinite(completions[1])
    assert np.array_equal(visited_b, est.visits[1])
    assert np.all(np.isfinite(completions[0]))
    _check_frequencies(est.visits, model.visit_rates())
    assert np.all(lat[visited_b] == 2 * STEP)
    assert np.all(lat[~visited_b] == STEP)


def test_diamond_join_visit_rates_with_correlated_parents() -> None:
    p_a, p_b, p_c, p_d, p_e = 0.8, 0.6, 0.3, 0.7, 0.5
    stages: list[dict[str, Any]] = [
        {"name": "root", "model": "m"},
        {"name": "a", "model": "m", "after": ["root"], "probability": p_a},
        {"name": "b", "model": "m", "after": ["a"], "probability": p_b},
        {"name": "c", "model": "m", "after": ["a"], "probability": p_c},
        {"name": "d", "model": "m", "after": ["b", "c"], "probability": p_d},
        {"name": "e", "model": "m", "after": ["d"], "probability": p_e},
    ]
    model, table = build_pipeline(stages, PROFILE)
    assert model.names == ("root", "a", "b", "c", "d", "e")
    reach_d = p_a * (1 - (1 - p_b) * (1 - p_c))  # b and c are correlated through a
    expected = [1.0, p_a, p_a * p_b, p_a * p_c, reach_d * p_d, reach_d * p_d * p_e]
    np.testing.assert_allclose(model.visit_rates(), expected, rtol=0, atol=1e-12)
    visits = sample_visits(model, QUERIES, np.random.default_rng(11))
    _check_frequencies(visits, np.asarray(expected))
    # join semantics on the same queries: d starts when every visited parent has finished
    arrivals = np.arange(QUERIES) / 8.0
    est = Estimator(model, table, arrivals, slo_s=math.inf, seed=11)
    assert np.array_equal(est.visits, visits)
    lat, _ = est.latencies_s((StageConfig("cpu", 1, 1),) * model.size)
    depth = 1 + visits[1] + (visits[2] | visits[3]) + visits[4] + visits[5]  # stages on the longest visited path
    assert np.array_equal(lat, depth * STEP)


def test_two_entry_stages_join() -> None:
    stages: list[dict[str, Any]] = [
        {"name": "x", "model": "m"},
        {"name": "y", "model": "m", "probability": 0.4},
        {"name": "z", "model": "m", "after": ["x", "y"], "probability": 0.5},
    ]
    model, _ = build_pipeline(stages, PROFILE)
    np.testing.assert_allclose(model.visit_rates(), [1.0, 0.4, 0.5], rtol=0, atol=1e-12)
    _check_frequencies(sample_visits(model, QUERIES, np.random.default_rng(3)), model.visit_rates())


def test_visit_rates_monte_carlo_path_for_large_pipelines() -> None:
    probs = [1.0] + [0.97] * 19
    stages: list[dict[str, Any]] = [
        {"name": f"s{i}", "model": "m", "after": [f"s{i - 1}"] if i else [], "probability": p}
        for i, p in enumerate(probs)
    ]
    model, _ = build_pipeline(stages, PROFILE)
    assert model.size > 16
    rates = model.visit_rates()
    np.testing.assert_allclose(rates, np.cumprod(probs), rtol=0, atol=5 * 0.5 / math.sqrt(200_000))
