"""Baseline: an AutoScale-style target-utilization autoscaler, with the Kubernetes HPA's replica arithmetic.

AutoScale (Gandhi et al., TOCS 2012) adds capacity as soon as load needs it and releases a server only
after it has stayed unneeded for a while; the Kubernetes HPA on CPU is the common form of that idea.
Per stage, on every control tick:

1. Record b = busy_fraction · ready_replicas, the busy replicas of the last tick, with its time.
2. Average b over the last `utilization_window_s` → b̄ (the HPA sees CPU through metrics-server, whose
   kubelet samples are averaged over a window of about this length).
3. Replica arithmetic (HPA `replica_calculator.go`): usage ratio u = b̄ / (k · target) over the k
   provisioned replicas (replicas still starting count as idle: the HPA's conservative rule for unready
   pods). If |u − 1| ≤ tolerance, desired = k; else desired = ceil(b̄ / target), which is
   ceil(ready · ū / target) while the ready count is steady. (Averaging busy replicas rather than the
   utilization keeps a window that straddles a scale-up from counting the old, hotter utilization against
   the new, larger ready count.)
4. Clamp to [min_replicas, max_replicas].
5. Stabilize (HPA `stabilizeRecommendation`): act on the highest desired count of the last
   `downscale_stabilization_s`. A scale-up therefore happens at once; a scale-down only goes as low as every
   tick of the window agreed on. Until the policy has watched a full window it does not scale down (a fresh
   HPA would act on an empty history).

Defaults and where they come from:
- `target_utilization` 0.7: the customary HPA CPU target; the 30 % headroom is the spare capacity for
  bursts that AutoScale argues for.
- `tolerance` 0.1: the HPA's `--horizontal-pod-autoscaler-tolerance`.
- `utilization_window_s` 10 s: the order of the metrics window behind the HPA's CPU utilization.
- `downscale_stabilization_s` 60 s instead of the HPA's 300 s
  (`--horizontal-pod-autoscaler-downscale-stabilization`): 300 s is half of a 10-minute trace, so the
  baseline would never get to show a scale-down. AutoScale sized its wait timer against its servers' setup
  time; 60 s is twelve 5 s replica startups here (a released replica is not needed again moments later)
  and equals Knative's stable window, so the three baselines hold capacity for comparable times.
- `min_replicas` 1; `max_replicas` 1000 (as the envelope tuner; the HPA requires an explicit maximum).

Not imitated: the HPA's 15 s sync period and its scale-up rate policy (at most double, or +4 pods, per
15 s): AutoScale reacts on every control tick, and a utilization capped at 1 asks for at most k / target
replicas anyway.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from inferline.planner.tuning.context import Decision, StageStatus, TunerContext, clamp

T = TypeVar("T")
_EPS = 1e-9  # keeps ceil() of a product that should be an integer from rounding up


class AutoscaleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    target_utilization: float = Field(
        default=0.7, gt=0, le=1, description="Busy fraction of the replicas to aim for (HPA CPU target)."
    )
    tolerance: float = Field(
        default=0.1, ge=0, lt=1, description="No change while |utilization / target − 1| is within this (HPA)."
    )
    utilization_window_s: float = Field(default=10.0, gt=0, description="Window the busy replicas are averaged over.")
    downscale_stabilization_s: float = Field(
        default=60.0, ge=0, description="A scale-down goes only as low as the highest recommendation in this window."
    )
    min_replicas: int = Field(default=1, ge=1, description="Fewest replicas per stage.")
    max_replicas: int = Field(default=1000, ge=1, description="Most replicas per stage.")

    @model_validator(mode="after")
    def _check_bounds(self) -> AutoscaleConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must not exceed max_replicas ({self.max_replicas})")
        return self


@dataclass(frozen=True)
class AutoscaleStageState:
    busy: tuple[tuple[float, float], ...] = ()
    """(time_s, busy replicas) within the utilization window."""
    recommendations: tuple[tuple[float, int], ...] = ()
    """(time_s, desired replicas) within the stabilization window."""


@dataclass(frozen=True)
class AutoscaleState:
    started_s: float | None = None
    """When the policy first ran: no scale-down before a full stabilization window was watched."""
    stages: tuple[tuple[str, AutoscaleStageState], ...] = ()


def record(
    history: tuple[tuple[float, T], ...], now_s: float, window_s: float, value: T
) -> tuple[tuple[float, T], ...]:
    """Append (now_s, value) and drop entries older than the window (kept: (now_s − window_s, now_s])."""
    horizon = now_s - window_s
    return (*(e for e in history if e[0] > horizon), (now_s, value))


def mean_busy_replicas(history: tuple[tuple[float, float], ...]) -> float:
    return sum(v for _, v in history) / len(history) if history else 0.0


def usage_ratio(busy_replicas: float, replicas: int, config: AutoscaleConfig) -> float:
    """u = b̄ / (k · target): above 1 the stage is hotter than the target."""
    return busy_replicas / (max(replicas, 1) * config.target_utilization)


def desired_replicas(busy_replicas: float, replicas: int, config: AutoscaleConfig) -> int:
    """HPA arithmetic: k inside the tolerance band, else ceil(b̄ / target); not yet clamped."""
    if abs(usage_ratio(busy_replicas, replicas, config) - 1.0) <= config.tolerance:
        return replicas
    return math.ceil(busy_replicas / config.target_utilization - _EPS)


def stabilize(recommendations: tuple[tuple[float, int], ...]) -> int:
    """HPA downscale stabilization: the highest recommendation in the window."""
    return max(r for _, r in recommendations)


@dataclass(frozen=True)
class UtilizationAutoscaler:
    config: AutoscaleConfig = field(default_factory=AutoscaleConfig)
    name: str = "autoscale"

    def initial_state(self) -> AutoscaleState:
        return AutoscaleState()

    def decide(self, ctx: TunerContext, state: AutoscaleState) -> tuple[list[Decision], AutoscaleState]:
        started_s = ctx.now_s if state.started_s is None else state.started_s
        watched_window = ctx.now_s - started_s >= self.config.downscale_stabilization_s
        previous = dict(state.stages)
        decisions: list[Decision] = []
        stages: list[tuple[str, AutoscaleStageState]] = []
        for st in ctx.stages:
            decision, stage_state = self._decide_stage(
                st, previous.get(st.name, AutoscaleStageState()), ctx.now_s, watched_window
            )
            stages.append((st.name, stage_state))
            if decision is not None:
                decisions.append(decision)
        return decisions, AutoscaleState(started_s, tuple(stages))

    def _decide_stage(
        self, st: StageStatus, state: AutoscaleStageState, now_s: float, watched_window: bool
    ) -> tuple[Decision | None, AutoscaleStageState]:
        cfg = self.config
        busy = record(state.busy, now_s, cfg.utilization_window_s, st.busy_fraction * st.ready_replicas)
        mean_busy = mean_busy_replicas(busy)
        desired = clamp(desired_replicas(mean_busy, st.replicas, cfg), cfg.min_replicas, cfg.max_replicas)
        recommendations = record(state.recommendations, now_s, cfg.downscale_stabilization_s, desired)
        wanted = stabilize(recommendations)
        if not watched_window:
            wanted = max(wanted, st.replicas)
        wanted = clamp(wanted, cfg.min_replicas, cfg.max_replicas)
        new_state = AutoscaleStageState(busy, recommendations)
        if wanted == st.replicas:
            return None, new_state
        u = usage_ratio(mean_busy, st.replicas, cfg)
        observed = (
            f"mean busy replicas over the last {cfg.utilization_window_s:g} s is {mean_busy:.2f}, "
            f"{u:.2f}x the {cfg.target_utilization:.0%} target on {st.replicas} replicas"
        )
        if wanted > st.replicas:
            capped = f" (capped at max_replicas {cfg.max_replicas})" if wanted == cfg.max_replicas else ""
            message = f"{observed}; {st.replicas} -> {wanted} replicas{capped}"
            return Decision(st.name, wanted, "ScaleUpUtilization", message), new_state
        message = (
            f"{observed}; highest recommendation over the last {cfg.downscale_stabilization_s:g} s is {wanted}; "
            f"{st.replicas} -> {wanted} replicas"
        )
        return Decision(st.name, wanted, "ScaleDownUtilization", message), new_state
