"""The compiled estimator against the event-by-event reference simulator, query by query.

Random small pipelines (chains, forks, joins with two parents, diamonds, several entry stages),
random profiles, random provisioning and bursty traces with duplicated timestamps. Half of the cases
put every time on a dyadic grid (1/64 s) so that sums are exact in floating point and arrivals
coincide with batch completions, which exercises the tie rules; the other half use arbitrary floats.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import numpy as np
import pytest
from numpy.typing import NDArray

from inferline.planner.costtable import CostTable
from inferline.planner.estimator import Estimator
from inferline.planner.pipeline import Config, PipelineModel, StageConfig, sample_visits
from tests.reference_sim import ReferenceResult, build_pipeline, nearest_rank_p99, simulate

HARDWARE = ("cpu", "k80", "v100")
BATCH_SIZES = (1, 2, 3, 4, 5, 6, 8, 12, 16)
GRID_MS = 1000.0 / 64.0  # 15.625 ms = 1/64 s, exact in binary
CASES = 80
SHAPES = ("random", "chain", "diamond", "two_roots_join", "fork")


@dataclass
class Case:
    seed: int
    shape: str
    dyadic: bool
    model: PipelineModel
    table: CostTable
    parents: list[list[int]]
    arrivals: NDArray[np.float64]
    configs: list[Config]


def _stages(rng: np.random.Generator, shape: str) -> list[dict[str, object]]:
    """Stage dicts (name, after, probability) in topological order; model names filled in later."""

    def prob(always: float = 0.35) -> float:
        return 1.0 if rng.random() < always else float(rng.uniform(0.15, 1.0))

    if shape == "chain":
        n = int(rng.integers(1, 6))
        return [
            {"name": f"s{i}", "after": [f"s{i - 1}"] if i else [], "probability": prob() if i else 1.0}
            for i in range(n)
        ]
    if shape == "diamond":
        stages: list[dict[str, object]] = [
            {"name": "s0", "after": [], "probability": 1.0},
            {"name": "s1", "after": ["s0"], "probability": prob()},
            {"name": "s2", "after": ["s0"], "probability": prob()},
            {"name": "s3", "after": ["s1", "s2"], "probability": prob()},
        ]
        if rng.random() < 0.5:
            stages.append({"name": "s4", "after": ["s3"], "probability": prob()})
        return stages
    if shape == "two_roots_join":
        return [
            {"name": "s0", "after": [], "probability": 1.0},
            {"name": "s1", "after": [], "probability": prob(0.5)},
            {"name": "s2", "after": ["s0", "s1"], "probability": prob()},
        ]
    if shape == "fork":
        n = int(rng.integers(2, 6))
        return [{"name": f"s{i}", "after": ["s0"] if i else [], "probability": prob() if i else 1.0} for i in range(n)]
    n = int(rng.integers(1, 6))
    stages = []
    for i in range(n):
        r = rng.random()
        if i == 0:
            after: list[str] = []
        elif r < 0.12:
            after = []  # another entry stage
        elif r < 0.55 or i < 2:
            after = [f"s{int(rng.integers(0, i))}"]
        else:
            picks = rng.choice(i, size=2, replace=False)
            after = [f"s{int(p)}" for p in sorted(picks)]
        # The first entry stage is always visited so that every query visits some stage.
        stages.append({"name": f"s{i}", "after": after, "probability": 1.0 if i == 0 else prob()})
    return stages


def _profile(rng: np.random.Generator, dyadic: bool) -> dict[str, object]:
    doc: dict[str, object] = {}
    k = int(rng.integers(1, 4))
    for hw in sorted(rng.choice(HARDWARE, size=k, replace=False)):
        m = int(rng.integers(1, 5))
        sizes = sorted(int(b) for b in rng.choice(BATCH_SIZES, size=m, replace=False))
        if dyadic:
            lat = [GRID_MS * int(rng.integers(1, 7))]
            for a, b in itertools.pairwise(sizes):
                # integer multiples of the grid per extra query, so interpolation stays on the grid
                lat.append(lat[-1] + GRID_MS * int(rng.integers(0, 3)) * (b - a))
        else:
            lat = [float(rng.uniform(2.0, 60.0))]
            for a, b in itertools.pairwise(sizes):
                growth = float(rng.uniform(0.05, 1.0)) * (b - a) / a
                if rng.random() < 0.1:
                    growth = -0.3 * float(rng.random())  # a non-monotone profile is legal too
                lat.append(lat[-1] * (1.0 + growth))
        doc[str(hw)] = [{"batch_size": b, "latency_ms": {"mean": x}} for b, x in zip(sizes, lat, strict=True)]
    return doc


def _config(rng: np.random.Generator, table: CostTable) -> Config:
    out = []
    for st in table:
        hw = str(rng.choice(sorted(st.options)))
        b = int(rng.choice(st.option(hw).batch_sizes))
        out.append(StageConfig(hw, b, int(rng.integers(1, 5))))
    return tuple(out)


def _trace(rng: np.random.Generator, rate: float, dyadic: bool) -> NDArray[np.float64]:
    n = int(rng.integers(50, 401))
    gaps = rng.exponential(1.0 / rate, size=n)
    gaps[rng.random(n) < 0.1] = 0.0  # duplicated timestamps
    for _ in range(int(rng.integers(0, 4))):  # bursts of simultaneous arrivals
        at = int(rng.integers(0, n))
        gaps[at : at + int(rng.integers(2, 25))] = 0.0
    gaps[0] = float(rng.uniform(0.0, 1.0))
    times = np.cumsum(gaps)
    if dyadic:
        times = np.round(times * 64.0) / 64.0
    elif rng.random() < 0.5:
        times = np.round(times, 3)  # millisecond-resolution trace: more duplicates
    return np.asarray(times, dtype=np.float64)


@functools.cache
def make_case(seed: int) -> Case:
    rng = np.random.default_rng(1000 + seed)
    shape = SHAPES[seed % len(SHAPES)]
    dyadic = seed % 2 == 0
    stages = _stages(rng, shape)
    profiles: dict[str, dict[str, object]] = {}
    for i, st in enumerate(stages):
        # Sometimes two stages serve the same model (one profile for both).
        name = f"m{int(rng.integers(0, i))}" if i and rng.random() < 0.15 else f"m{i}"
        st["model"] = name
        if name not in profiles:
            profiles[name] = _profile(rng, dyadic)
    listed = list(stages)
    if rng.random() < 0.5:
        rng.shuffle(listed)  # the spec may list stages in any order
    model, table = build_pipeline(listed, profiles, name=f"case{seed}")
    # Parents, computed here from the stage dicts (not from pipeline_model), in the model's order.
    after = {str(st["name"]): list(st["after"]) for st in stages}  # type: ignore[call-overload]
    parents = [sorted(model.names.index(p) for p in after[name]) for name in model.names]
    first = _config(rng, table)
    second = list(first)
    s = int(rng.integers(0, model.size))
    second[s] = _config(rng, table)[s]
    configs = [first, tuple(second), _config(rng, table)]
    # Offered load relative to the first entry stage's capacity in the first configuration.
    c0 = first[0]
    capacity = c0.replicas * c0.max_batch_size / table[0].option(c0.hardware).service_time_s(c0.max_batch_size)
    rate = capacity * float(rng.uniform(0.3, 1.5))
    arrivals = _trace(rng, rate, dyadic)
    return Case(seed, shape, dyadic, model, table, parents, arrivals, configs)


@functools.cache
def reference(seed: int, which: int) -> ReferenceResult:
    case = make_case(seed)
    config = case.configs[which]
    visits = sample_visits(case.model, case.arrivals.size, np.random.default_rng(seed))
    return simulate(
        case.arrivals,
        case.parents,
        visits,
        [case.table[s].option(c.hardware).service_s for s, c in enumerate(config)],
        [c.max_batch_size for c in config],
        [c.replicas for c in config],
    )


def estimator(case: Case, slo_s: float) -> Estimator:
    return Estimator(case.model, case.table, case.arrivals, slo_s, seed=case.seed)


SEEDS = list(range(CASES))


def test_cases_cover_the_interesting_shapes() -> None:
    joins = diamonds = ties = partial_batches = arrival_free_ties = 0
    for seed in SEEDS:
        case = make_case(seed)
        joins += any(len(p) >= 2 for p in case.parents)
        diamonds += case.shape == "diamond"
        ties += bool(np.any(np.diff(case.arrivals) == 0.0))
        ref = reference(seed, 0)
        for s, c in enumerate(case.configs[0]):
            sizes = ref.batch_sizes[s][ref.batch_sizes[s] > 0]
            partial_batches += bool(np.any((sizes > 1) & (sizes < c.max_batch_size)))
            # a query arrived at the very instant a replica of the stage freed (a tie between events)
            arrivals = ref.arrival_s[s][~np.isnan(ref.arrival_s[s])]
            ends = ref.completions_s[s][~np.isnan(ref.completions_s[s])]
            arrival_free_ties += bool(np.intersect1d(arrivals, ends).size)
    assert joins >= 20 and diamonds >= 10 and ties >= 60
    assert partial_batches >= 10 and arrival_free_ties >= 10


@pytest.mark.parametrize("seed", SEEDS)
def test_latencies_match_reference(seed: int) -> None:
    case = make_case(seed)
    est = estimator(case, slo_s=math.inf)
    assert np.array_equal(est.visits, sample_visits(case.model, case.arrivals.size, np.random.default_rng(seed)))
    for which, config in enumerate(case.configs):
        ref = reference(seed, which)
        latencies, completions = est.latencies_s(config)
        np.testing.assert_allclose(latencies, ref.latencies_s, rtol=0, atol=1e-12, err_msg=f"config {config}")
        if case.dyadic:
            np.testing.assert_array_equal(latencies, ref.latencies_s)
        for s in range(case.model.size):
            visited = est.visits[s]
            np.testing.assert_allclose(completions[s][visited], ref.completions_s[s][visited], rtol=0, atol=1e-12)
            assert np.all(completions[s][~visited] == -np.inf)
        estimate = est.estimate(config)
        assert estimate.feasible and estimate.stopped_at is None
        assert estimate.p99_s == pytest.approx(nearest_rank_p99(ref.latencies_s), rel=0, abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_feasibility_and_early_stop_match_reference(seed: int) -> None:
    case = make_case(seed)
    for which, config in enumerate(case.configs):
        ref = reference(seed, which)
        ref_p99 = nearest_rank_p99(ref.latencies_s)
        lat = np.sort(ref.latencies_s)
        slos = {
            ref_p99,  # exactly at the P99: feasible
            ref_p99 - 1e-9,  # just below: infeasible (maybe decided late)
            float(lat[len(lat) // 2]),  # the median: certainly infeasible, typically stopped early
            float(lat[0]) / 2.0,  # below every latency: infeasible at the first stage
            float(lat[-1]) * 2.0,  # above every latency
        }
        for slo in sorted(slos):
            result = estimator(case, slo).estimate(config)
            if math.isinf(result.p99_s):
                assert not result.feasible and result.stopped_at in case.model.names
                assert ref_p99 > slo, f"stopped early at {result.stopped_at} but reference P99 {ref_p99} <= {slo}"
            else:
                assert result.stopped_at is None
                assert result.p99_s == pytest.approx(ref_p99, rel=0, abs=1e-12)
                assert result.feasible == (ref_p99 <= slo)
            assert result.feasible == (ref_p99 <= slo)


def test_early_stop_is_exercised_on_both_sides() -> None:
    stopped = late_infeasible = feasible = 0
    for seed in SEEDS[:40]:
        case = make_case(seed)
        ref_p99 = nearest_rank_p99(reference(seed, 0).latencies_s)
        for slo in (ref_p99, ref_p99 * 0.999, ref_p99 * 0.5):
            result = estimator(case, slo).estimate(case.configs[0])
            stopped += result.stopped_at is not None
            late_infeasible += not result.feasible and result.stopped_at is None
            feasible += result.feasible
    assert stopped >= 20 and feasible >= 40 and late_infeasible >= 1


@pytest.mark.parametrize("seed", SEEDS[::4])
def test_cached_estimates_match_reference(seed: int) -> None:
    """One estimator evaluating configurations that share stages (the per-stage cache in use)."""
    case = make_case(seed)
    p99s = [nearest_rank_p99(reference(seed, w).latencies_s) for w in range(len(case.configs))]
    for slo in (math.inf, p99s[0], p99s[1] - 1e-9):
        est = estimator(case, slo)
        for which in (0, 1, 2, 0, 1, 1, 2, 0):
            result = est.estimate(case.configs[which])
            assert result.feasible == (p99s[which] <= slo), (slo, which)
            if not math.isinf(result.p99_s):
                assert result.p99_s == pytest.approx(p99s[which], rel=0, abs=1e-12)
        assert est.stage_runs <= 3 * case.model.size
