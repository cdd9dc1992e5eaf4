"""Baseline: the Knative Pod Autoscaler (KPA) on concurrency, with its stable and panic windows, per stage.

Mirrors `knative.dev/serving/pkg/autoscaler/scaling/autoscaler.go` (`Scale`). Concurrency c = queue_length
+ in_flight (what a revision's queue-proxies count) is recorded on every call; the autoscaler itself
evaluates every `tick_interval_s` (Knative's `tickInterval`, 2 s):

1. Stable and panic concurrency: the mean of c over the last `stable_window_s` and over the last
   panic window = stable_window_s · panic_window_percentage / 100.
2. With R = max(1, ready replicas) and the per-replica target v = target_concurrency_per_replica ·
   target_utilization_percentage / 100: dspc = ceil(stable / v), dppc = ceil(panic / v).
3. Rate limits: each is kept within [floor(R / max_scale_down_rate), ceil(max_scale_up_rate · R)].
4. Panic: over threshold when dppc / R ≥ panic_threshold_percentage / 100. Crossing it starts panic; each
   tick over it extends panic; panic ends at the first tick not over it once a stable window has passed
   since the last tick over it. In panic the count is max(dspc, dppc), and it only ever grows (Knative's
   `maxPanicPods`); out of panic it is dspc.
5. Clamp to [min_replicas, max_replicas] (the revision's min/max scale), then emit a change if the count
   differs from the provisioned replicas; in panic a count below them is not applied ("we do not scale
   down while in panic mode").

Like Knative's `newAutoscaler`, a stage first seen with more than one ready replica starts in panic at its
ready count, so the policy holds the plan's scale until it has a stable window of history.

Defaults are Knative's `config-autoscaler` ones: stable-window 60 s, panic-window-percentage 10 (6 s),
panic-threshold-percentage 200, max-scale-up-rate 1000, max-scale-down-rate 2, target utilization
(container-concurrency-target-percentage) 70, the 2 s tick, scale-down-delay 0 (so not modelled).
`target_concurrency_per_replica` is 2 queries rather than container-concurrency-target-default's 100, which
is sized for HTTP handlers that serve many requests at once; 2 matches Ray Serve's
`target_ongoing_requests`, so the two concurrency baselines aim at the same load. `min_replicas` 1 (no
scale to zero); `max_replicas` 1000 (Knative's max-scale 0 means unbounded).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from pydantic import BaseModel, ConfigDict, Field, model_validator

from inferline.planner.tuning.context import Decision, StageStatus, TunerContext, clamp

_EPS = 1e-9  # keeps ceil() of a value that should be an integer, and time sums, from rounding the wrong way


class KpaConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    target_concurrency_per_replica: float = Field(
        default=2.0, gt=0, description="Concurrent (queued + in-flight) queries per replica to aim for."
    )
    target_utilization_percentage: float = Field(
        default=70.0, gt=0, le=100, description="Share of the target concurrency actually aimed for."
    )
    stable_window_s: float = Field(
        default=60.0, gt=0, description="Window of the stable concurrency; also how long panic lasts at least."
    )
    panic_window_percentage: float = Field(
        default=10.0, ge=1, le=100, description="Panic window as a percentage of the stable window."
    )
    panic_threshold_percentage: float = Field(
        default=200.0,
        ge=110,
        le=1000,
        description="Panic when the panic-window count reaches this percentage of the ready replicas.",
    )
    max_scale_up_rate: float = Field(
        default=1000.0, gt=1, description="At most this many times the ready replicas per decision."
    )
    max_scale_down_rate: float = Field(
        default=2.0, gt=1, description="At least the ready replicas divided by this per decision."
    )
    tick_interval_s: float = Field(default=2.0, ge=0, description="How often the autoscaler evaluates.")
    min_replicas: int = Field(default=1, ge=1, description="Fewest replicas per stage.")
    max_replicas: int = Field(default=1000, ge=1, description="Most replicas per stage.")

    @model_validator(mode="after")
    def _check_bounds(self) -> KpaConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must not exceed max_replicas ({self.max_replicas})")
        return self

    @property
    def panic_window_s(self) -> float:
        return self.stable_window_s * self.panic_window_percentage / 100.0

    @property
    def target_value(self) -> float:
        """v: the concurrency per replica aimed for (Knative's `TargetValue`, at least 0.01)."""
        return max(0.01, self.target_concurrency_per_replica * self.target_utilization_percentage / 100.0)


@dataclass(frozen=True)
class KpaStageState:
    concurrency: tuple[tuple[float, int], ...] = ()
    """(time_s, concurrency) within the stable window."""
    last_tick_s: float | None = None
    """When the autoscaler last evaluated this stage."""
    panic_s: float | None = None
    """The last evaluation over the panic threshold (Knative's `panicTime`); None out of panic."""
    max_panic_replicas: int = 0


@dataclass(frozen=True)
class KpaState:
    stages: tuple[tuple[str, KpaStageState], ...] = ()


@dataclass(frozen=True)
class KpaEstimate:
    """One evaluation's numbers, kept for the decision's message."""

    stable: float
    panic: float
    ready: int
    stable_needed: int
    """dspc = ceil(stable / v), before the rate limits."""
    panic_needed: int
    """dppc = ceil(panic / v), before the rate limits."""
    stable_replicas: int
    panic_replicas: int
    over_threshold: bool


def record_concurrency(
    history: tuple[tuple[float, int], ...], now_s: float, window_s: float, value: int
) -> tuple[tuple[float, int], ...]:
    """Append (now_s, value) and drop entries older than the window (kept: (now_s − window_s, now_s])."""
    horizon = now_s - window_s
    return (*(e for e in history if e[0] > horizon), (now_s, value))


def window_mean(history: tuple[tuple[float, int], ...], now_s: float, window_s: float) -> float:
    values = [v for t, v in history if t > now_s - window_s]
    return sum(values) / len(values) if values else 0.0


def estimate(
    history: tuple[tuple[float, int], ...], now_s: float, ready_replicas: int, config: KpaConfig
) -> KpaEstimate:
    """Steps 1-3 and the panic test: windowed concurrency -> rate-limited stable and panic counts."""
    stable = window_mean(history, now_s, config.stable_window_s)
    panic = window_mean(history, now_s, config.panic_window_s)
    ready = max(1, ready_replicas)
    dspc = math.ceil(stable / config.target_value - _EPS)
    dppc = math.ceil(panic / config.target_value - _EPS)
    return KpaEstimate(
        stable=stable,
        panic=panic,
        ready=ready,
        stable_needed=dspc,
        panic_needed=dppc,
        stable_replicas=apply_rate_limits(dspc, ready, config),
        panic_replicas=apply_rate_limits(dppc, ready, config),
        over_threshold=dppc / ready >= config.panic_threshold_percentage / 100.0,
    )


def apply_rate_limits(replicas: int, ready: int, config: KpaConfig) -> int:
    """Keep a count within [floor(R / max_scale_down_rate), ceil(max_scale_up_rate · R)]."""
    low = math.floor(ready / config.max_scale_down_rate + _EPS)
    high = math.ceil(config.max_scale_up_rate * ready - _EPS)
    return min(max(replicas, low), high)


def update_panic(state: KpaStageState, est: KpaEstimate, now_s: float, config: KpaConfig) -> KpaStageState:
    """Knative's panic bookkeeping: enter or extend when over threshold, leave a stable window after."""
    if est.over_threshold:
        return replace(state, panic_s=now_s)
    if state.panic_s is not None and state.panic_s + config.stable_window_s < now_s:
        return replace(state, panic_s=None, max_panic_replicas=0)
    return state


def desired_replicas(state: KpaStageState, est: KpaEstimate) -> tuple[int, KpaStageState]:
    """In panic the larger of the two counts, never below the panic's high-water mark; else the stable one."""
    if state.panic_s is None:
        return est.stable_replicas, state
    high = max(state.max_panic_replicas, est.stable_replicas, est.panic_replicas)
    return high, replace(state, max_panic_replicas=high)


@dataclass(frozen=True)
class KpaAutoscaler:
    config: KpaConfig = field(default_factory=KpaConfig)
    name: str = "kpa"

    def initial_state(self) -> KpaState:
        return KpaState()

    def decide(self, ctx: TunerContext, state: KpaState) -> tuple[list[Decision], KpaState]:
        previous = dict(state.stages)
        decisions: list[Decision] = []
        stages: list[tuple[str, KpaStageState]] = []
        for st in ctx.stages:
            stage_state = previous.get(st.name)
            if stage_state is None:
                # Knative starts a revision with more than one ready pod in panic at that count.
                stage_state = (
                    KpaStageState(panic_s=ctx.now_s, max_panic_replicas=st.ready_replicas)
                    if st.ready_replicas > 1
                    else KpaStageState()
                )
            decision, stage_state = self._decide_stage(st, stage_state, ctx.now_s)
            stages.append((st.name, stage_state))
            if decision is not None:
                decisions.append(decision)
        return decisions, KpaState(tuple(stages))

    def _decide_stage(
        self, st: StageStatus, state: KpaStageState, now_s: float
    ) -> tuple[Decision | None, KpaStageState]:
        cfg = self.config
        state = replace(
            state, concurrency=record_concurrency(state.concurrency, now_s, cfg.stable_window_s, st.ongoing)
        )
        if state.last_tick_s is not None and now_s - state.last_tick_s < cfg.tick_interval_s - _EPS:
            return None, state
        state = replace(state, last_tick_s=now_s)
        est = estimate(state.concurrency, now_s, st.ready_replicas, cfg)
        state = update_panic(state, est, now_s, cfg)
        wanted, state = desired_replicas(state, est)
        wanted = clamp(wanted, cfg.min_replicas, cfg.max_replicas)
        in_panic = state.panic_s is not None
        if wanted == st.replicas or (in_panic and wanted < st.replicas):
            return None, state
        up = wanted > st.replicas
        capped = f" (capped at max_replicas {cfg.max_replicas})" if up and wanted == cfg.max_replicas else ""
        if in_panic:
            reason = "ScaleUpPanic"
            observed = (
                f"panic: mean concurrency {est.panic:.1f} over the last {cfg.panic_window_s:g} s needs "
                f"{est.panic_needed} replicas at {cfg.target_value:g} per replica, "
                f"{est.panic_needed / est.ready:.1f}x the {est.ready} ready "
                f"(panic threshold {cfg.panic_threshold_percentage / 100:g}x)"
            )
        else:
            reason = "ScaleUpStable" if up else "ScaleDownStable"
            limited = not up and est.stable_replicas > est.stable_needed
            limit = (
                f" (no fewer than 1/{cfg.max_scale_down_rate:g} of the {est.ready} ready per decision)"
                if limited
                else ""
            )
            observed = (
                f"mean concurrency {est.stable:.1f} over the last {cfg.stable_window_s:g} s needs "
                f"{est.stable_replicas} replicas at {cfg.target_value:g} per replica{limit}"
            )
        return Decision(st.name, wanted, reason, f"{observed}; {st.replicas} -> {wanted} replicas{capped}"), state
