"""InferLine's tuner: traffic envelopes detect when live traffic exceeds what the plan was sized for.

At plan time the sample trace's envelope r̂_j (max rate in any window ΔT_j = T_s·2^j up to 60 s)
is recorded with each stage's μ (replica throughput at the planned batch), s (visit rate) and
planned replicas k̂. The planned provisioning ratio per window is ρ_j = r̂_j·s / (k̂·μ).

- Scale up at once when a live window's rate needs more replicas than a stage has:
  k = ceil(r_j·s / (μ·ρ_j)) = ceil(k̂·r_j / r̂_j), the largest over windows j. (With k = k̂ this is
  "a live window's rate exceeds the planned one"; after a scale-down it compares against what
  the current replicas were sized for.)
- Scale down conservatively: after `quiet_period_s` with no scale-up, to
  k = ceil(r_5·s / (μ·ρ_5)) = ceil(k̂·r_5 / r̂_5), where r_5 is the max 5 s rate over the last 30 s,
  but never below what the scale-up rule asked for within those 30 s (that would flap).

Only replica counts change; batch sizes and hardware stay as planned. When the live mean rate
drifts far from the plan's, a `ReplanRecommended` note is emitted (replicas unchanged).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from inferline.plan import TunerInfo
from inferline.planner.tuning.context import Decision, TunerContext, clamp


class EnvelopeTunerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    quiet_period_s: float = Field(default=15.0, ge=0, description="No scale-down until this long after a scale-up.")
    downscale_lookback_s: float = Field(default=30.0, gt=0, description="History the scale-down rate is taken over.")
    downscale_rate_window_s: float = Field(default=5.0, gt=0, description="Window of the scale-down rate.")
    max_replicas: int = Field(default=1000, ge=1)
    replan_drift_ratio: float = Field(
        default=2.0, gt=1, description="Live/planned mean-rate ratio that advises re-planning."
    )


@dataclass(frozen=True)
class EnvelopeTunerState:
    started_s: float | None = None
    """When the tuner first ran: scale-down waits for a full look-back of observations."""
    last_scale_up_s: float = -math.inf
    replan_noted: bool = False
    ratios: tuple[tuple[float, float], ...] = ()
    """(time_s, envelope ratio) of each tick within the scale-down look-back."""
    batches: tuple[tuple[str, int], ...] = ()
    """Each stage's current batch size (0: as planned, for plans without recorded batch sizes)."""
    step: float = 1.0
    """Rate multiplier of the ladder step the batch sizes come from (1: the plan itself)."""


Placement = dict[str, tuple[int, int]]
"""{stage: (batch size, replicas)}."""


def _falls_short(steps: list[tuple[float, Placement]], step: float, ratio: float, current: Placement) -> bool:
    """Whether the current replicas fall short of `ratio`, sized as the step they came from was."""
    for m, placement in steps:
        if m == step:
            return any(_scaled(k, ratio, m) > current[n][1] for n, (_, k) in placement.items())
    return True


def _step_of(steps: list[tuple[float, Placement]], placement: Placement) -> float:
    """The step whose batch sizes a placement has (the largest such multiplier)."""
    batches = {n: b for n, (b, _) in placement.items()}
    for m, step in reversed(steps):
        if all(step[n][0] == batches[n] for n in batches):
            return m
    return 1.0


def _scaled(replicas: int, ratio: float, multiplier: float) -> int:
    """Replicas of a configuration sized for `multiplier` x the sample's rate, at `ratio` x it:
    in proportion past its multiplier (the paper's rule), below it as sized (but in proportion
    below the plan's own rate, as the paper scales down)."""
    if multiplier == 1.0:
        return math.ceil(replicas * ratio - 1e-9)
    return math.ceil(replicas * max(ratio / multiplier, 1.0) - 1e-9)


@dataclass(frozen=True)
class EnvelopeTuner:
    info: TunerInfo
    config: EnvelopeTunerConfig = field(default_factory=EnvelopeTunerConfig)
    name: str = "inferline"

    def initial_state(self) -> EnvelopeTunerState:
        return EnvelopeTunerState()

    def decide(self, ctx: TunerContext, state: EnvelopeTunerState) -> tuple[list[Decision], EnvelopeTunerState]:
        steps = self._steps(ctx)
        if state.started_s is None:  # batch sizes start as planned: the first step is the plan itself
            state = replace(state, started_s=ctx.now_s, batches=tuple((n, b) for n, (b, _) in steps[0][1].items()))
        ratio, window = self._upscale_ratio(ctx)
        horizon = ctx.now_s - self.config.downscale_lookback_s
        state = replace(state, ratios=(*(r for r in state.ratios if r[0] > horizon), (ctx.now_s, ratio)))
        batches = dict(state.batches)
        current = {st.name: (batches[st.name], st.replicas) for st in ctx.stages}
        need = self._cheapest(steps, ratio, current, up=True)
        if need != current and _falls_short(steps, state.step, ratio, current):
            up = self._decisions(
                need, current, "ScaleUpEnvelope",
                f"rate over {window:.3g} s windows is {ratio:.2f}x the planned envelope",
            )  # fmt: skip
            return up, replace(
                state, last_scale_up_s=ctx.now_s, batches=tuple((n, need[n][0]) for n in need),
                step=_step_of(steps, need),
            )  # fmt: skip
        decisions: list[Decision] = []
        observed_s = ctx.now_s - (state.started_s if state.started_s is not None else ctx.now_s)
        quiet = ctx.now_s - state.last_scale_up_s >= self.config.quiet_period_s
        if quiet and observed_s >= max(self.config.quiet_period_s, self.config.downscale_lookback_s):
            # Never below what the envelope rule asked for within the look-back: that would flap.
            down_ratio = max(self._downscale_ratio(ctx), max(r for _, r in state.ratios))
            fit = self._cheapest(steps, down_ratio, current, up=False)
            if self._cost(fit) < self._cost(current) - 1e-12:
                decisions = self._decisions(
                    fit, current, "ScaleDownQuiet",
                    f"max {self.config.downscale_rate_window_s:g} s rate over the last "
                    f"{self.config.downscale_lookback_s:g} s is {down_ratio:.2f}x the plan's",
                )  # fmt: skip
                state = replace(state, batches=tuple((n, fit[n][0]) for n in fit), step=_step_of(steps, fit))
        return decisions, self._note_drift(ctx, state, decisions)

    # -- the plan and its ladder as candidate configurations ---------------------------------------
    def _planned_batch(self, stage: str) -> int:
        """The planned batch size; 0 stands for "as planned" in plans made before batch sizes were
        recorded (they have no ladder, so the batch never changes)."""
        tuned = self.info.stages.get(stage)
        return tuned.max_batch_size if tuned is not None and tuned.max_batch_size is not None else 0

    def _steps(self, ctx: TunerContext) -> list[tuple[float, Placement]]:
        """(rate multiplier, {stage: (batch, replicas)}): the plan itself, then its ladder."""
        steps = [(1.0, {st.name: (self._planned_batch(st.name), st.planned_replicas) for st in ctx.stages})]
        names = {st.name for st in ctx.stages}
        for step in self.info.ladder:
            if set(step.stages) >= names:
                placement = {n: (step.stages[n].max_batch_size, step.stages[n].replicas) for n in names}
                steps.append((step.rate_multiplier, placement))
        return steps

    def _cheapest(self, steps: list[tuple[float, Placement]], ratio: float, current: Placement, up: bool) -> Placement:
        """The cheapest step for this rate ratio, ties to the one sized for the least (the smallest
        batches: the shortest service times that carry the load); a stage that keeps
        its batch keeps at least (up) or at most (down) its current replicas."""
        best: Placement | None = None
        best_key: tuple[float, float] = (math.inf, 0.0)
        for m, placement in steps:
            fitted = {}
            for name, (batch, replicas) in placement.items():
                wanted = clamp(_scaled(replicas, ratio, m), 1, self.config.max_replicas)
                if batch == current[name][0]:
                    wanted = max(wanted, current[name][1]) if up else min(wanted, current[name][1])
                fitted[name] = (batch, wanted)
            key = (self._cost(fitted), -m)
            if key < best_key:
                best, best_key = fitted, key
        assert best is not None
        return best

    def _cost(self, placement: Placement) -> float:
        prices = {name: (t.price_per_hour or 1.0) for name, t in self.info.stages.items()}
        return sum(prices.get(name, 1.0) * replicas for name, (_, replicas) in placement.items())

    def _decisions(self, target: Placement, current: Placement, reason: str, why: str) -> list[Decision]:
        decisions = []
        for name, (batch, replicas) in target.items():
            old_batch, old_replicas = current[name]
            if batch == old_batch and replicas == old_replicas:
                continue
            new_batch = batch if batch != old_batch else None
            change = f"{old_replicas} -> {replicas} replicas" + (
                f", batch {old_batch} -> {batch}" if new_batch is not None else ""
            )
            decisions.append(Decision(name, replicas, reason, f"{why}; {change}", new_batch))
        return decisions

    def _upscale_ratio(self, ctx: TunerContext) -> tuple[float, float]:
        """max_j r_j / r̂_j over windows ending at this tick's arrivals (earlier ends were seen before)."""
        arrivals = ctx.recent_arrivals_s
        if ctx.new_arrivals == 0 or arrivals.size == 0:
            return 0.0, 0.0
        ends = arrivals[arrivals.size - ctx.new_arrivals :]
        end_index = np.arange(arrivals.size - ctx.new_arrivals, arrivals.size) + 1
        best, best_window = 0.0, 0.0
        for point in self.info.envelope:
            if point.rate_qps <= 0:
                continue
            starts = np.searchsorted(arrivals, ends - point.window_s, side="right")
            rate = float(np.max(end_index - starts)) / point.window_s
            if rate / point.rate_qps > best:
                best, best_window = rate / point.rate_qps, point.window_s
        return best, best_window

    def _downscale_ratio(self, ctx: TunerContext) -> float:
        arrivals = ctx.recent_arrivals_s
        recent = arrivals[arrivals >= ctx.now_s - self.config.downscale_lookback_s]
        if recent.size == 0 or self.info.rate_5s_qps <= 0:
            return 0.0
        w = self.config.downscale_rate_window_s
        ends = np.searchsorted(recent, recent + w, side="left")
        rate = float(np.max(ends - np.arange(recent.size))) / w
        return rate / self.info.rate_5s_qps

    def _note_drift(
        self, ctx: TunerContext, state: EnvelopeTunerState, decisions: list[Decision]
    ) -> EnvelopeTunerState:
        planned = self.info.envelope[-1].rate_qps if self.info.envelope else 0.0
        arrivals = ctx.recent_arrivals_s
        if state.replan_noted or planned <= 0 or arrivals.size < 2 or ctx.now_s < 60.0:
            return state
        live = arrivals.size / 60.0
        drift = max(live / planned, planned / max(live, 1e-9))
        if drift >= self.config.replan_drift_ratio and ctx.stages:
            first = ctx.stages[0]
            decisions.append(
                Decision(
                    first.name, first.replicas, "ReplanRecommended",
                    f"live mean rate {live:.0f} qps is {drift:.1f}x off the plan's {planned:.0f} qps; re-plan",
                )
            )  # fmt: skip
            return replace(state, replan_noted=True)
        return state
