"""Baseline: Ray Serve's default autoscaling policy (`target_ongoing_requests`), per stage.

Mirrors `ray/serve/autoscaling_policy.py` (`replica_queue_length_autoscaling_policy` wrapped by
`_apply_autoscaling_config`), one small step per function:

1. Metric: ongoing requests n = queue_length + in_flight, averaged over the last `look_back_period_s` → n̄
   (Ray averages the replicas' and handles' reported ongoing requests over the look-back period).
2. Desired (`_core_replica_queue_length_policy`): d = n̄ / target_ongoing_requests (a float).
3. Scaling factors (`_apply_scaling_factors`): with r the running (ready) replicas,
   k' = ceil(r + factor · (d − r)), factor = upscaling_factor above r and downscaling_factor below; a
   scale-down that the factor would leave stuck at r goes to r − 1.
4. Bounds (`_apply_bounds`): clamp to [min_replicas, max_replicas].
5. Delay (`_apply_delay_logic`): against the target replicas k (starting ones included), a change is made
   only once k' has stayed above k for `upscale_delay_s` (below for `downscale_delay_s`); a tick in the
   other direction or at k restarts the wait. Ray counts consecutive 0.1 s control loops; here the streak's
   start time is kept, so the same rule holds at any tick length.

Defaults are Ray Serve's `AutoscalingConfig` ones: `target_ongoing_requests` 2, `upscale_delay_s` 30,
`downscale_delay_s` 600, `look_back_period_s` 30, upscaling and downscaling factors 1.0 (the default
`smoothing_factor`), `min_replicas` 1. `max_replicas` is 1000 rather than Ray's 1 (which would switch
autoscaling off). Ray's target counts requests per replica; our replicas batch, so a replica at the planned
batch holds more than 2 queries and a target of 2 scales generously: it stays a field for that reason, at
Ray's default. With the 600 s downscale delay a 10-minute trace shows almost no scale-down: that is Ray's
behaviour, not a bug. Scale-to-zero (`downscale_to_zero_delay_s`, the cold-start path) does not apply with
at least one replica.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from pydantic import BaseModel, ConfigDict, Field, model_validator

from inferline.planner.tuning.context import Decision, StageStatus, TunerContext, clamp

_EPS = 1e-9  # keeps ceil() of a value that should be an integer, and time sums, from rounding the wrong way


class RayServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    target_ongoing_requests: float = Field(
        default=2.0, gt=0, description="Ongoing (queued + in-flight) queries per replica to aim for."
    )
    upscale_delay_s: float = Field(
        default=30.0, ge=0, description="How long more replicas must be wanted before scaling up."
    )
    downscale_delay_s: float = Field(
        default=600.0, ge=0, description="How long fewer replicas must be wanted before scaling down."
    )
    look_back_period_s: float = Field(default=30.0, gt=0, description="Window the ongoing requests are averaged over.")
    upscaling_factor: float = Field(
        default=1.0, gt=0, description="Gain on the distance to the desired count when scaling up."
    )
    downscaling_factor: float = Field(
        default=1.0, gt=0, description="Gain on the distance to the desired count when scaling down."
    )
    min_replicas: int = Field(default=1, ge=1, description="Fewest replicas per stage.")
    max_replicas: int = Field(default=1000, ge=1, description="Most replicas per stage.")

    @model_validator(mode="after")
    def _check_bounds(self) -> RayServeConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must not exceed max_replicas ({self.max_replicas})")
        return self


@dataclass(frozen=True)
class RayServeStageState:
    ongoing: tuple[tuple[float, int], ...] = ()
    """(time_s, ongoing requests) within the look-back period."""
    direction: int = 0
    """+1 while more replicas are wanted, −1 while fewer, 0 otherwise (Ray's decision counter's sign)."""
    since_s: float = 0.0
    """When the current direction's streak began."""


@dataclass(frozen=True)
class RayServeState:
    stages: tuple[tuple[str, RayServeStageState], ...] = ()


def record_ongoing(
    history: tuple[tuple[float, int], ...], now_s: float, window_s: float, value: int
) -> tuple[tuple[float, int], ...]:
    """Append (now_s, value) and drop entries older than the window (kept: (now_s − window_s, now_s])."""
    horizon = now_s - window_s
    return (*(e for e in history if e[0] > horizon), (now_s, value))


def mean_ongoing(history: tuple[tuple[float, int], ...]) -> float:
    return sum(v for _, v in history) / len(history) if history else 0.0


def desired_replicas(mean_ongoing_requests: float, config: RayServeConfig) -> float:
    """d = n̄ / target (Ray: r · n̄ / (r · target))."""
    return mean_ongoing_requests / config.target_ongoing_requests


def apply_scaling_factors(desired: float, running: int, config: RayServeConfig) -> int:
    """k' = ceil(r + factor · (d − r)); a scale-down the factor leaves stuck at r goes to r − 1."""
    delta = desired - running
    factor = config.upscaling_factor if delta > 0 else config.downscaling_factor
    scaled = math.ceil(running + factor * delta - _EPS)
    if math.ceil(desired - _EPS) < running and scaled == running:
        scaled -= 1
    return scaled


def apply_delay(
    wanted: int, target: int, state: RayServeStageState, now_s: float, config: RayServeConfig
) -> tuple[int, RayServeStageState, float]:
    """Ray's delay logic: (replicas to set, new state, how long the direction has held).

    The wanted count is applied once it has been above (below) the target replicas for
    `upscale_delay_s` (`downscale_delay_s`); then the streak restarts.
    """
    direction = (wanted > target) - (wanted < target)
    if direction == 0:
        return target, replace(state, direction=0, since_s=now_s), 0.0
    since_s = state.since_s if state.direction == direction else now_s
    held_s = now_s - since_s
    delay_s = config.upscale_delay_s if direction > 0 else config.downscale_delay_s
    if held_s >= delay_s - _EPS:
        return wanted, replace(state, direction=0, since_s=now_s), held_s
    return target, replace(state, direction=direction, since_s=since_s), held_s


@dataclass(frozen=True)
class RayServeAutoscaler:
    config: RayServeConfig = field(default_factory=RayServeConfig)
    name: str = "ray"

    def initial_state(self) -> RayServeState:
        return RayServeState()

    def decide(self, ctx: TunerContext, state: RayServeState) -> tuple[list[Decision], RayServeState]:
        previous = dict(state.stages)
        decisions: list[Decision] = []
        stages: list[tuple[str, RayServeStageState]] = []
        for st in ctx.stages:
            decision, stage_state = self._decide_stage(st, previous.get(st.name, RayServeStageState()), ctx.now_s)
            stages.append((st.name, stage_state))
            if decision is not None:
                decisions.append(decision)
        return decisions, RayServeState(tuple(stages))

    def _decide_stage(
        self, st: StageStatus, state: RayServeStageState, now_s: float
    ) -> tuple[Decision | None, RayServeStageState]:
        cfg = self.config
        ongoing = record_ongoing(state.ongoing, now_s, cfg.look_back_period_s, st.ongoing)
        mean = mean_ongoing(ongoing)
        desired = desired_replicas(mean, cfg)
        running = max(st.ready_replicas, 1)
        wanted = clamp(apply_scaling_factors(desired, running, cfg), cfg.min_replicas, cfg.max_replicas)
        replicas, new_state, held_s = apply_delay(wanted, st.replicas, replace(state, ongoing=ongoing), now_s, cfg)
        if replicas == st.replicas:
            return None, new_state
        up = replicas > st.replicas
        delay = f"upscale_delay_s {cfg.upscale_delay_s:g}" if up else f"downscale_delay_s {cfg.downscale_delay_s:g}"
        capped = f" (capped at max_replicas {cfg.max_replicas})" if up and replicas == cfg.max_replicas else ""
        message = (
            f"mean ongoing requests over the last {cfg.look_back_period_s:g} s is {mean:.1f}, "
            f"{desired:.2f} replicas at {cfg.target_ongoing_requests:g} per replica, "
            f"{'above' if up else 'below'} {st.replicas} for {held_s:.1f} s ({delay}); "
            f"{st.replicas} -> {replicas} replicas{capped}"
        )
        return Decision(st.name, replicas, "ScaleUpOngoing" if up else "ScaleDownOngoing", message), new_state
