"""The three tuner baselines (AutoScale/HPA utilization, Ray Serve ongoing requests, Knative KPA), each step alone
and over virtual-time scenarios, plus one scenario shared with InferLine's envelope tuner.

The scenario plant is a fluid model, deterministic and cheap: a stage with `ready` replicas of throughput μ under
offered load λ·s has d = λ·s/μ replicas' worth of work; busy replicas b = min(ready, d + backlog/(μ·tick)), the
backlog grows by (d − b)·μ·tick, each busy replica holds 2 queries in flight. Added replicas are ready after
`startup_s`; removed ones are the newest first.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np
import pytest
from numpy.typing import NDArray
from pydantic import BaseModel, ValidationError

from inferline.plan import EnvelopePoint, TunerInfo, TunerStage
from inferline.planner.tuning.autoscale import (
    AutoscaleConfig,
    UtilizationAutoscaler,
    desired_replicas,
    record,
    stabilize,
)
from inferline.planner.tuning.context import Decision, StageStatus, TunerContext
from inferline.planner.tuning.envelope_tuner import EnvelopeTuner
from inferline.planner.tuning.kpa import (
    KpaAutoscaler,
    KpaConfig,
    KpaStageState,
    apply_rate_limits,
    estimate,
    update_panic,
)
from inferline.planner.tuning.ray_serve import (
    RayServeAutoscaler,
    RayServeConfig,
    RayServeStageState,
    apply_delay,
    apply_scaling_factors,
)

TICK_S = 0.25
MU_QPS = 10.0
IN_FLIGHT_PER_BUSY_REPLICA = 2


class Policy(Protocol):
    @property
    def name(self) -> str: ...  # read-only, as on the frozen policy dataclasses

    def initial_state(self) -> Any: ...

    def decide(self, ctx: TunerContext, state: Any) -> tuple[list[Decision], Any]: ...


# --- scenario plant ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageSpec:
    name: str = "model"
    replicas: int = 4
    visit_rate: float = 1.0


Phases = tuple[tuple[float, float], ...]
"""(start_s, pipeline rate in qps), ascending; the last phase lasts until the scenario ends."""


def rate_at(phases: Phases, t_s: float) -> float:
    return [rate for start, rate in phases if start <= t_s][-1]


def arrivals_for(phases: Phases, duration_s: float) -> NDArray[np.float64]:
    """Evenly spaced arrivals at each phase's rate."""
    ends = [start for start, _ in phases[1:]] + [duration_s]
    parts = [np.arange(start, end, 1.0 / rate) for (start, rate), end in zip(phases, ends, strict=True) if rate > 0]
    return np.concatenate(parts) if parts else np.zeros(0)


@dataclass(frozen=True)
class Trace:
    decisions: tuple[tuple[float, Decision], ...]
    replicas: tuple[tuple[float, dict[str, int]], ...]
    """(time_s, provisioned replicas per stage) after each tick's decisions."""

    def of(self, stage: str = "model") -> list[tuple[float, Decision]]:
        return [(t, d) for t, d in self.decisions if d.stage == stage]

    def final(self, stage: str = "model") -> int:
        return self.replicas[-1][1][stage]


def run_scenario(
    policy: Policy,
    phases: Phases,
    duration_s: float,
    stages: Sequence[StageSpec] = (StageSpec(),),
    startup_s: float = 0.0,
) -> Trace:
    arrivals = arrivals_for(phases, duration_s)
    ready_at = {s.name: [0.0] * s.replicas for s in stages}
    backlog = {s.name: 0.0 for s in stages}
    state = policy.initial_state()
    decisions: list[tuple[float, Decision]] = []
    replicas: list[tuple[float, dict[str, int]]] = []
    now = 0.0
    while now < duration_s - 1e-9:
        horizon = now + TICK_S
        rate = rate_at(phases, now)
        statuses = []
        for s in stages:
            ready = sum(t <= horizon for t in ready_at[s.name])
            demand = rate * s.visit_rate / MU_QPS
            busy = min(float(ready), demand + backlog[s.name] / (MU_QPS * TICK_S))
            backlog[s.name] = max(0.0, backlog[s.name] + (demand - busy) * MU_QPS * TICK_S)
            statuses.append(
                StageStatus(
                    name=s.name,
                    replicas=len(ready_at[s.name]),
                    ready_replicas=ready,
                    queue_length=round(backlog[s.name]),
                    in_flight=round(IN_FLIGHT_PER_BUSY_REPLICA * busy),
                    busy_fraction=busy / ready if ready else 0.0,
                    arrivals=round(rate * s.visit_rate * TICK_S),
                    planned_replicas=s.replicas,
                    throughput_qps=MU_QPS,
                    visit_rate=s.visit_rate,
                )
            )
        lo, prev, upto = np.searchsorted(arrivals, [horizon - 60.0, now, horizon], side="left")
        ctx = TunerContext(horizon, TICK_S, tuple(statuses), arrivals[lo:upto], int(upto - max(prev, lo)))
        changes, state = policy.decide(ctx, state)
        for d in changes:
            times = sorted(ready_at[d.stage])
            if d.replicas > len(times):
                times += [horizon + startup_s] * (d.replicas - len(times))
            ready_at[d.stage] = times[: max(d.replicas, 1)]
            decisions.append((horizon, d))
        replicas.append((horizon, {name: len(times) for name, times in ready_at.items()}))
        now = horizon
    return Trace(tuple(decisions), tuple(replicas))


def status(**overrides: Any) -> StageStatus:
    base = StageStatus(
        name="model",
        replicas=4,
        ready_replicas=4,
        queue_length=0,
        in_flight=0,
        busy_fraction=0.0,
        arrivals=0,
        planned_replicas=4,
        throughput_qps=MU_QPS,
        visit_rate=1.0,
    )
    return replace(base, **overrides)


def context(now_s: float, *stages: StageStatus) -> TunerContext:
    return TunerContext(now_s=now_s, tick_s=TICK_S, stages=stages or (status(),))


def changes(trace: Trace, stage: str = "model", initial: int = 4) -> list[tuple[float, int, Decision]]:
    """(time_s, replicas before, decision) for each of the stage's decisions."""
    out: list[tuple[float, int, Decision]] = []
    current = initial
    for t, d in trace.of(stage):
        out.append((t, current, d))
        current = d.replicas
    return out


CAMEL_CASE = re.compile(r"^(?:[A-Z][a-z]+){2,}$")


def assert_well_formed(trace: Trace, initial: int = 4) -> None:
    """Every decision changes the count, says why in CamelCase and names old and new counts."""
    current: dict[str, int] = {}
    for _, d in trace.decisions:
        old = current.get(d.stage, initial)
        assert d.replicas != old
        assert CAMEL_CASE.match(d.reason), d.reason
        assert f"{old} -> {d.replicas} replicas" in d.message, d.message
        current[d.stage] = d.replicas


# --- AutoScale / HPA utilization ---------------------------------------------------------------------------


def test_autoscale_steps() -> None:
    cfg = AutoscaleConfig()
    assert desired_replicas(2.8, 4, cfg) == 4  # exactly on target
    assert desired_replicas(3.0, 4, cfg) == 4  # u = 1.07, inside the 0.1 band
    assert desired_replicas(4.0, 4, cfg) == 6  # u = 1.43: ceil(4 / 0.7)
    assert desired_replicas(0.7, 4, cfg) == 1  # u = 0.25: ceil(0.7 / 0.7)
    assert desired_replicas(0.0, 4, cfg) == 0  # clamped by the caller
    hist = record(record(record((), 0.0, 10.0, 1.0), 5.0, 10.0, 2.0), 10.0, 10.0, 3.0)
    assert hist == ((5.0, 2.0), (10.0, 3.0))  # the entry at exactly now − window has left
    assert stabilize(((0.0, 5), (1.0, 3), (2.0, 4))) == 5


def test_autoscale_scales_up_on_the_first_hot_tick() -> None:
    policy = UtilizationAutoscaler()
    decisions, _ = policy.decide(context(0.25, status(busy_fraction=1.0)), policy.initial_state())
    assert [(d.replicas, d.reason) for d in decisions] == [(6, "ScaleUpUtilization")]
    assert "4 -> 6 replicas" in decisions[0].message


def test_autoscale_steady_load_inside_the_band_makes_no_decision() -> None:
    trace = run_scenario(UtilizationAutoscaler(), ((0.0, 28.0),), 120.0)
    assert trace.decisions == ()


def test_autoscale_overload_scales_up_without_delay() -> None:
    trace = run_scenario(UtilizationAutoscaler(), ((0.0, 28.0), (60.0, 80.0)), 150.0, startup_s=5.0)
    assert_well_formed(trace)
    ups = trace.of()
    assert ups and all(d.reason == "ScaleUpUtilization" for _, d in ups)
    # The 10 s mean leaves the tolerance band within a couple of seconds; then there is no hold.
    assert 60.0 < ups[0][0] <= 63.0
    assert trace.final() >= math.ceil(8.0 / 0.7)  # more while the backlog built before the scale-up drains


def test_autoscale_scales_down_only_after_the_stabilization_window() -> None:
    drop_s = 60.0
    trace = run_scenario(UtilizationAutoscaler(), ((0.0, 80.0), (drop_s, 20.0)), 200.0)
    assert_well_formed(trace)
    downs = [(t, d) for t, d in trace.of() if d.reason == "ScaleDownUtilization"]
    assert downs
    # Every recommendation of the 60 s window must be low: the pre-drop ones leave at drop + 60 s.
    assert drop_s + 60.0 <= downs[0][0] <= drop_s + 60.0 + 10.0
    assert trace.final() == math.ceil(2.0 / 0.7)


def test_autoscale_holds_until_it_has_watched_a_full_window() -> None:
    trace = run_scenario(UtilizationAutoscaler(), ((0.0, 0.5),), 90.0, stages=(StageSpec(replicas=10),))
    assert [(t, d.replicas) for t, d in trace.of()] == [(TICK_S + 60.0, 1)]  # first call at TICK_S


def test_autoscale_clamps_to_max_replicas() -> None:
    policy = UtilizationAutoscaler(AutoscaleConfig(max_replicas=7))
    trace = run_scenario(policy, ((0.0, 500.0),), 60.0)
    assert_well_formed(trace)
    assert max(d.replicas for _, d in trace.decisions) == 7 == trace.final()
    assert "capped at max_replicas 7" in trace.decisions[-1][1].message


# --- Ray Serve target_ongoing_requests -----------------------------------------------------------------------


def test_ray_scaling_factors() -> None:
    cfg = RayServeConfig()
    assert apply_scaling_factors(7.5, 4, cfg) == 8
    assert apply_scaling_factors(2.5, 4, cfg) == 3
    half = RayServeConfig(upscaling_factor=0.5, downscaling_factor=0.5)
    assert apply_scaling_factors(8.0, 4, half) == 6  # 4 + 0.5·4
    assert apply_scaling_factors(3.5, 4, half) == 4  # 3.5 needs 4: no change
    assert apply_scaling_factors(2.5, 4, half) == 3  # ceil(3.25) = 4 would be stuck: one step down


def test_ray_delay_needs_a_consistent_streak() -> None:
    cfg = RayServeConfig(upscale_delay_s=1.0, downscale_delay_s=2.0)
    s = RayServeStageState()
    replicas, s, _ = apply_delay(6, 4, s, 0.0, cfg)
    assert replicas == 4 and s.direction == 1
    replicas, s, _ = apply_delay(6, 4, s, 0.75, cfg)
    assert replicas == 4
    replicas, s, _ = apply_delay(4, 4, s, 0.9, cfg)  # back at the target: the streak restarts
    assert (replicas, s.direction) == (4, 0)
    replicas, s, _ = apply_delay(6, 4, s, 1.0, cfg)
    replicas, s, held = apply_delay(7, 4, s, 2.0, cfg)  # a full second above, at whatever is wanted now
    assert (replicas, held, s.direction) == (7, 1.0, 0)
    replicas, s, _ = apply_delay(2, 4, s, 3.0, cfg)
    replicas, s, _ = apply_delay(2, 4, s, 4.75, cfg)
    assert replicas == 4
    replicas, s, _ = apply_delay(3, 4, s, 5.0, cfg)
    assert replicas == 3
    assert apply_delay(9, 4, RayServeStageState(), 0.0, RayServeConfig(upscale_delay_s=0.0))[0] == 9


def test_ray_steady_load_makes_no_decision() -> None:
    trace = run_scenario(RayServeAutoscaler(), ((0.0, 35.0),), 120.0)  # 7 ongoing: 3.5 -> 4 replicas
    assert trace.decisions == ()


def test_ray_scales_up_only_after_upscale_delay() -> None:
    burst_s = 30.0
    trace = run_scenario(RayServeAutoscaler(), ((0.0, 35.0), (burst_s, 100.0)), 120.0, startup_s=5.0)
    assert_well_formed(trace)
    ups = trace.of()
    assert ups and all(d.reason == "ScaleUpOngoing" for _, d in ups)
    # Wanted once the 30 s mean passes 2 per replica (about a second in), applied after upscale_delay_s.
    assert burst_s + 30.0 < ups[0][0] <= burst_s + 32.0
    assert "for 30.0 s (upscale_delay_s 30)" in ups[0][1].message


def test_ray_scales_down_only_after_downscale_delay() -> None:
    drop_s = 60.0
    stages = (StageSpec(replicas=10),)  # 20 ongoing at 100 qps: exactly 10 replicas wanted
    trace = run_scenario(RayServeAutoscaler(), ((0.0, 100.0), (drop_s, 10.0)), 720.0, stages=stages)
    assert_well_formed(trace, initial=10)
    downs = [(t, d) for t, d in trace.of() if d.reason == "ScaleDownOngoing"]
    assert [d.replicas for _, d in downs] == [1]
    # The 30 s look-back mean falls below the current count within the look-back; then 600 s must pass.
    assert drop_s + 600.0 <= downs[0][0] <= drop_s + 30.0 + 600.0


def test_ray_clamps_to_max_replicas() -> None:
    policy = RayServeAutoscaler(RayServeConfig(max_replicas=6, upscale_delay_s=0.0))
    trace = run_scenario(policy, ((0.0, 500.0),), 30.0)
    assert_well_formed(trace)
    assert max(d.replicas for _, d in trace.decisions) == 6 == trace.final()


# --- Knative KPA ---------------------------------------------------------------------------------------------


def test_kpa_rate_limits_and_panic_bookkeeping() -> None:
    cfg = KpaConfig()
    assert cfg.panic_window_s == 6.0 and cfg.target_value == pytest.approx(1.4)
    assert apply_rate_limits(1, 10, cfg) == 5  # at most halve
    assert apply_rate_limits(1, 3, cfg) == 1  # floor(3 / 2)
    assert apply_rate_limits(5000, 4, cfg) == 4000  # at most 1000x
    history = tuple((t * TICK_S, 5) for t in range(240)) + tuple((60.0 + t * TICK_S, 20) for t in range(1, 25))
    est = estimate(history, 66.0, 4, cfg)
    assert est.panic == 20.0 and est.panic_needed == math.ceil(20 / 1.4) and est.over_threshold
    entered = update_panic(KpaStageState(), est, 66.0, cfg)
    assert entered.panic_s == 66.0
    calm = replace(est, over_threshold=False)
    assert update_panic(entered, calm, 126.0, cfg).panic_s == 66.0  # a full stable window has not passed yet
    assert update_panic(entered, calm, 126.5, cfg).panic_s is None


def test_kpa_steady_load_makes_no_decision() -> None:
    trace = run_scenario(KpaAutoscaler(), ((0.0, 25.0),), 150.0)  # 5 in flight: ceil(5 / 1.4) = 4
    assert trace.decisions == ()


def test_kpa_evaluates_every_tick_interval() -> None:
    trace = run_scenario(KpaAutoscaler(), ((0.0, 25.0), (1.0, 400.0)), 20.0)
    assert trace.decisions
    assert all((t - TICK_S) % 2.0 == 0.0 for t, _ in trace.decisions)


def test_kpa_panics_at_once_and_never_scales_down_in_panic() -> None:
    burst_s, calm_s = 90.0, 120.0
    trace = run_scenario(KpaAutoscaler(), ((0.0, 25.0), (burst_s, 75.0), (calm_s, 25.0)), 200.0, startup_s=5.0)
    assert_well_formed(trace)
    first_t, first = trace.of()[0]
    assert first.reason == "ScaleUpPanic" and burst_s < first_t <= burst_s + KpaConfig().panic_window_s
    assert first.replicas >= 2 * 4  # the panic estimate, at least the threshold's 2x
    # In panic (until a stable window after the last tick over threshold) nothing scales down.
    last_panic_up = max(t for t, d in trace.of() if d.reason == "ScaleUpPanic")
    downs = [(t, d) for t, old, d in changes(trace) if d.replicas < old]
    assert downs and all(d.reason == "ScaleDownStable" for _, d in downs)
    assert downs[0][0] > last_panic_up + 60.0


def test_kpa_scales_down_at_most_by_half_per_decision() -> None:
    trace = run_scenario(KpaAutoscaler(), ((0.0, 400.0), (60.0, 2.0)), 300.0)
    assert_well_formed(trace)
    downs = [(old, d.replicas) for _, old, d in changes(trace) if d.replicas < old]
    assert len(downs) >= 3
    assert all(new >= old // 2 for old, new in downs)
    assert trace.final() == 1


def test_kpa_clamps_to_max_replicas() -> None:
    trace = run_scenario(KpaAutoscaler(KpaConfig(max_replicas=9)), ((0.0, 500.0),), 30.0)
    assert_well_formed(trace)
    assert max(d.replicas for _, d in trace.decisions) == 9 == trace.final()
    assert "capped at max_replicas 9" in trace.decisions[-1][1].message


# --- all baselines -------------------------------------------------------------------------------------------

BASELINES: dict[str, Policy] = {
    "autoscale": UtilizationAutoscaler(),
    "ray": RayServeAutoscaler(),
    "kpa": KpaAutoscaler(),
}


@pytest.mark.parametrize("config_type", [AutoscaleConfig, RayServeConfig, KpaConfig])
def test_baseline_config_errors_name_both_values(config_type: type[BaseModel]) -> None:
    with pytest.raises(ValidationError, match=r"min_replicas \(5\) must not exceed max_replicas \(3\)"):
        config_type(min_replicas=5, max_replicas=3)
    with pytest.raises(ValidationError, match="extra"):
        config_type(replicas=3)


@pytest.mark.parametrize("name", list(BASELINES))
def test_baseline_is_deterministic_and_pure(name: str) -> None:
    policy = BASELINES[name]
    phases: Phases = ((0.0, 25.0), (20.0, 90.0), (50.0, 10.0))
    first = run_scenario(policy, phases, 90.0, startup_s=5.0)
    second = run_scenario(policy, phases, 90.0, startup_s=5.0)
    assert first == second
    ctx = context(1.0, status(busy_fraction=1.0, queue_length=30, in_flight=8))
    state = policy.initial_state()
    assert policy.decide(ctx, state) == policy.decide(ctx, state)


@pytest.mark.parametrize("name", list(BASELINES))
def test_baseline_scales_stages_independently(name: str) -> None:
    stages = (StageSpec("hot", replicas=2), StageSpec("cold", replicas=2, visit_rate=0.1))
    trace = run_scenario(BASELINES[name], ((0.0, 15.0), (10.0, 60.0)), 80.0, stages=stages)
    assert trace.of("hot") and trace.final("hot") > 2
    assert all(d.replicas <= 2 for _, d in trace.of("cold"))


@pytest.mark.parametrize("name", list(BASELINES))
def test_baseline_state_stays_small(name: str) -> None:
    policy = BASELINES[name]
    state = policy.initial_state()
    for i in range(1, 401):  # 100 s, past every window
        _, state = policy.decide(context(i * TICK_S, status(in_flight=5, busy_fraction=0.6)), state)
    ((_, stage_state),) = state.stages
    histories = [v for v in vars(stage_state).values() if isinstance(v, tuple)]
    assert histories and max(len(h) for h in histories) <= 60.0 / TICK_S


def envelope_tuner(steady_qps: float, service_time_s: float = 0.1) -> EnvelopeTuner:
    """The envelope of evenly spaced arrivals at `steady_qps`, with one count of slack for float rounding."""
    windows = [service_time_s * 2**j for j in range(int(math.log2(60.0 / service_time_s)) + 1)]
    envelope = tuple(EnvelopePoint(window_s=w, rate_qps=(math.floor(steady_qps * w + 1e-6) + 1) / w) for w in windows)
    info = TunerInfo(
        service_time_s=service_time_s,
        envelope=envelope,
        rate_5s_qps=envelope[-1].rate_qps,
        stages={"model": TunerStage(throughput_qps=MU_QPS, visit_rate=1.0)},
    )
    return EnvelopeTuner(info)


STEADY_QPS, BURST_S, CALM_S = 25.0, 30.0, 100.0
ALL_POLICIES: dict[str, Policy] = {**BASELINES, "inferline": envelope_tuner(STEADY_QPS)}


@pytest.mark.parametrize("name", list(ALL_POLICIES))
def test_all_policies_scale_up_for_a_3x_burst(name: str) -> None:
    phases: Phases = ((0.0, STEADY_QPS), (BURST_S, 3 * STEADY_QPS), (CALM_S, STEADY_QPS))
    trace = run_scenario(ALL_POLICIES[name], phases, 160.0, startup_s=5.0)
    during_burst = [d for t, d in trace.of() if BURST_S < t <= CALM_S]
    assert any(d.replicas > 4 for d in during_burst), trace.decisions
    assert all(counts["model"] >= 1 for _, counts in trace.replicas)
    assert all(d.replicas >= 1 for _, d in trace.decisions)
    if name != "inferline":  # the envelope tuner may also note `ReplanRecommended` without a change
        assert_well_formed(trace)
