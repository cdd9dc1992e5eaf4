"""The closed-loop simulator with every replica sharing cores (`simulate_run(cores=...)`).

Where the cores suffice it is the one-unit-per-replica run, query for query, whatever a tuner
does (added replicas starting, busy and idle ones removed, batch caps changed); without a tuner it
is the shared-core prediction; and a tuner's changes take effect in the shared event loop as in
the design's closed loop (a removed busy replica finishes its batch, a new one serves once started).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from inferline.planner.closedloop import RunResult, simulate_run
from inferline.planner.estimator import Estimator
from inferline.planner.pipeline import StageConfig, sample_visits
from inferline.planner.shared_cores import (
    SharedRun,
    advance_shared,
    shared_core_latencies_s,
    shared_core_run,
    start_shared,
)
from inferline.planner.tuning.context import Decision, StageStatus, TunerContext
from tests.reference_sim import build_pipeline
from tests.unit.test_estimator_reference import SEEDS, make_case


@dataclass
class ScriptedPolicy:
    """Random replica counts and batch caps for random stages at random ticks (seeded), whatever
    the pipeline does: both runs get the same decisions as long as they tick alike."""

    caps: dict[str, int]
    seed: int
    name: str = "scripted"
    seen: list[tuple[StageStatus, ...]] = field(default_factory=list)
    """What the policy was shown at each tick."""

    def initial_state(self) -> Any:
        return np.random.default_rng(self.seed)

    def decide(self, ctx: TunerContext, rng: Any) -> tuple[list[Decision], Any]:
        self.seen.append(ctx.stages)
        out = []
        for stage in ctx.stages:
            if rng.random() < 0.3:
                cap = int(rng.integers(1, self.caps[stage.name] + 1)) if rng.random() < 0.5 else None
                out.append(Decision(stage.name, int(rng.integers(1, 5)), "Scripted", "a test's change", cap))
        return out, rng


def assert_same_run(got: RunResult, expected: RunResult) -> None:
    np.testing.assert_array_equal(got.latencies_s, expected.latencies_s)
    np.testing.assert_allclose(got.outside_s, expected.outside_s, rtol=0, atol=1e-12)
    assert got.decisions == expected.decisions
    assert got.cost == expected.cost
    np.testing.assert_array_equal(got.tick_times_s, expected.tick_times_s)
    for name, replicas in expected.replicas.items():
        np.testing.assert_array_equal(got.replicas[name], replicas)
    for name, mean in expected.mean_batch.items():
        assert got.mean_batch[name] == mean or (math.isnan(mean) and math.isnan(got.mean_batch[name]))


@pytest.mark.parametrize("seed", SEEDS[:40])
def test_equals_a_core_per_replica_when_the_cores_suffice_whatever_the_tuner_does(seed: int) -> None:
    case = make_case(seed)
    config = case.configs[0]
    caps = {
        name: case.table[s].option(c.hardware).service_s.size - 1
        for s, (name, c) in enumerate(zip(case.model.names, config, strict=True))
    }
    span = float(case.arrivals[-1] - case.arrivals[0])
    for startup_factor in (0.0, 1.5):
        tick = span / 20
        args = (case.model, case.table, config, case.arrivals, math.inf)
        kwargs = {"tick_s": tick, "startup_s": startup_factor * tick, "seed": seed}
        alone_policy, shared_policy = ScriptedPolicy(caps, seed), ScriptedPolicy(caps, seed)
        alone = simulate_run(*args, alone_policy, **kwargs)  # type: ignore[arg-type]
        # Far more cores than batches can ever be under way (removed replicas finish theirs too).
        shared = simulate_run(*args, shared_policy, cores=1e9, **kwargs)  # type: ignore[arg-type]
        assert alone.decisions, "the scripted tuner changed nothing"
        assert_same_run(shared, alone)
        # The policy saw the same stages at every tick (busy time is summed in another order).
        assert len(shared_policy.seen) == len(alone_policy.seen)
        for got, expected in zip(shared_policy.seen, alone_policy.seen, strict=True):
            for g, e in zip(got, expected, strict=True):
                assert g.busy_fraction == pytest.approx(e.busy_fraction, abs=1e-9)
                assert dataclasses.replace(g, busy_fraction=0.0) == dataclasses.replace(e, busy_fraction=0.0)


@pytest.mark.parametrize("seed", SEEDS[:40])
def test_without_a_tuner_equals_the_shared_core_prediction(seed: int) -> None:
    case = make_case(seed)
    config = case.configs[0]
    cores = max(0.5, sum(c.replicas for c in config) / 3)  # crowded in bursts
    # Every other case's stages interfere too (planner/shared_cores.py), each by its own amount.
    rng = np.random.default_rng(seed)
    g = rng.uniform(0.0, 0.6, len(case.table)) if seed % 2 else np.zeros(len(case.table))
    table = tuple(
        dataclasses.replace(
            t, options={hw: dataclasses.replace(o, interference=float(g[s])) for hw, o in t.options.items()}
        )
        for s, t in enumerate(case.table)
    )
    est = Estimator(case.model, table, case.arrivals, math.inf, seed=seed)
    expected, _ = shared_core_latencies_s(est, config, cores, background_s=(1e-4,))
    tick = float(case.arrivals[-1] - case.arrivals[0]) / 7
    run = simulate_run(
        case.model, table, config, case.arrivals, math.inf, None, tick_s=tick, seed=seed, cores=cores,
        background_s=(1e-4,),
    )  # fmt: skip
    np.testing.assert_array_equal(run.latencies_s, expected)
    whole = shared_core_run(est, config, cores, background_s=(1e-4,))
    np.testing.assert_array_equal(run.outside_s, whole.outside_s())


# --- a tuner's changes in the shared event loop: closed forms ---------------------------------------


def one_stage_run(arrivals: list[float], replicas: int, service_s: float = 0.010, cores: float = 8.0) -> SharedRun:
    profile = {"cpu": [{"batch_size": 1, "latency_ms": {"mean": 1000 * service_s}}]}
    model, table = build_pipeline([{"name": "only", "model": "m"}], {"m": profile})
    option = table[0].option("cpu")
    times = np.asarray(arrivals, dtype=np.float64)
    visits = sample_visits(model, times.size, np.random.default_rng(0))
    config = (StageConfig("cpu", 1, replicas),)
    return start_shared(model, [option.service_s], [option.cpu_share], config, times, visits, cores)


def completions_ms(run: SharedRun) -> list[float]:
    return [round(1000 * t, 9) for t in run.completions()[0]]


def test_a_removed_busy_replica_finishes_its_batch_and_serves_no_more() -> None:
    run = one_stage_run([0.0, 0.001, 0.002, 0.002], replicas=2)
    advance_shared(run, 0.005)  # busy until 10 and 11 ms
    run.remove_replicas(0, 1)  # the one free soonest: busy until 10 ms
    assert advance_shared(run, math.inf)
    assert completions_ms(run) == [10.0, 11.0, 21.0, 31.0]  # the rest one after another on the other


def test_an_idle_replica_is_removed_before_a_busy_one() -> None:
    run = one_stage_run([0.0, 0.006], replicas=2)
    advance_shared(run, 0.005)
    run.remove_replicas(0, 1)
    assert advance_shared(run, math.inf)
    assert completions_ms(run) == [10.0, 20.0]  # the second waits for the busy one


def test_an_added_replica_serves_once_started() -> None:
    run = one_stage_run([0.0, 0.0, 0.0], replicas=1)
    advance_shared(run, 0.005)
    run.add_replicas(0, 1, ready_s=0.015)
    assert advance_shared(run, math.inf)
    assert completions_ms(run) == [10.0, 20.0, 25.0]


def test_an_added_replica_shares_the_cores_while_it_computes() -> None:
    # One core: two batches at once take twice as long. The second replica starts at 5 ms and
    # takes the second query; both share the core until the first finishes.
    run = one_stage_run([0.0, 0.0], replicas=1, cores=1.0)
    advance_shared(run, 0.001)
    run.add_replicas(0, 1, ready_s=0.005)
    assert advance_shared(run, math.inf)
    # 0-5 ms: query 0 alone (half done); then both at half speed until query 0 finishes at 15 ms
    # (query 1 has 5 ms of work done), then query 1 alone for its last 5 ms.
    assert completions_ms(run) == [15.0, 20.0]


def test_batch_caps_beyond_the_service_table_are_refused() -> None:
    run = one_stage_run([0.0], replicas=1)
    run.max_batch[0] = 4
    with pytest.raises(ValueError, match=r"stage 0's batch cap 4 exceeds its service table \(up to 1\)"):
        advance_shared(run, math.inf)


def test_a_cap_beyond_one_stages_table_is_refused_though_another_stage_covers_it() -> None:
    small = {"cpu": [{"batch_size": 1, "latency_ms": {"mean": 10.0}}]}
    large = {"cpu": [{"batch_size": b, "latency_ms": {"mean": 10.0 + b}} for b in (1, 2, 4, 8)]}
    model, table = build_pipeline(
        [{"name": "a", "model": "m"}, {"name": "b", "model": "n", "after": ["a"]}], {"m": small, "n": large}
    )
    options = [table[s].option("cpu") for s in range(2)]
    times = np.zeros(4)
    visits = sample_visits(model, times.size, np.random.default_rng(0))
    config = (StageConfig("cpu", 1, 1), StageConfig("cpu", 8, 1))
    run = start_shared(
        model, [o.service_s for o in options], [o.cpu_share for o in options], config, times, visits, 8.0
    )
    run.max_batch[0] = 4  # within stage b's table, beyond stage a's
    with pytest.raises(ValueError, match=r"stage 0's batch cap 4 exceeds its service table \(up to 1\)"):
        advance_shared(run, math.inf)
