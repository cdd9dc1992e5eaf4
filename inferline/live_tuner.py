"""The tuner, live: the same policy code as in simulation, fed from the router, acting through the actuator.

Every tick it reads the router's per-stage counters (queue, in flight, busy time, arrivals) and
the pipeline's recent arrival times, builds the same `TunerContext` the closed-loop simulator
builds, asks the policy, and applies each decision with the deployment's `scale`, logging the
decision with its reason and the measured start-up time of the new replicas.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from inferline.plan import Plan
from inferline.planner.tuning.context import Decision, StageStatus, TunerContext
from inferline.router.core import PipelineRouter, StageSnapshot

log = logging.getLogger(__name__)

HISTORY_S = 60.0
"""Arrival history handed to the policy (the envelope tuner's longest window)."""


class Actuator(Protocol):
    def scale(self, stage: str, replicas: int, max_batch_size: int | None = None) -> Any: ...


@dataclass(frozen=True)
class LiveDecision:
    time_s: float
    stage: str
    replicas: int
    reason: str
    message: str
    startup_s: float
    max_batch_size: int | None = None
    """The stage's new batch size, when the decision changed it (a scale-ladder step)."""

    def as_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


class LiveTuner:
    def __init__(
        self,
        router: PipelineRouter,
        actuator: Actuator,
        policy: Any,
        plan: Plan,
        tick_s: float = 1.0,
        on_decision: Callable[[LiveDecision], None] | None = None,
    ) -> None:
        if plan.tuner is None:
            raise ValueError("the plan has no tuner section")
        self.router, self.actuator, self.policy, self.plan = router, actuator, policy, plan
        self.tick_s = tick_s
        self.on_decision = on_decision
        self.decisions: list[LiveDecision] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="live-tuner", daemon=True)
        self._t0 = 0.0

    def start(self) -> LiveTuner:
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        state = self.policy.initial_state()
        previous = {s.name: s for s in self.router.snapshot()}
        while not self._stop.wait(self.tick_s):
            now = time.perf_counter()
            snaps = self.router.snapshot()
            recent = self.router.arrivals_since(now - HISTORY_S) - self._t0
            new = int(recent.size - np.searchsorted(recent, now - self._t0 - self.tick_s, side="right"))
            ctx = TunerContext(
                now - self._t0, self.tick_s, tuple(self._status(s, previous[s.name]) for s in snaps), recent, new
            )
            previous = {s.name: s for s in snaps}
            try:
                decisions, state = self.policy.decide(ctx, state)
            except Exception:  # a policy bug must not take the pipeline down: log and keep serving
                log.exception("the tuner policy failed; keeping the current replicas")
                continue
            for d in decisions:
                self._apply(ctx.now_s, d)

    def _status(self, snap: StageSnapshot, before: StageSnapshot) -> StageStatus:
        assert self.plan.tuner is not None
        info = self.plan.tuner.stages[snap.name]
        ready = max(snap.ready_replicas, 1)
        return StageStatus(
            name=snap.name,
            replicas=snap.replicas,
            ready_replicas=snap.ready_replicas,
            queue_length=snap.queue_length,
            in_flight=snap.in_flight,
            busy_fraction=min(1.0, (snap.busy_s - before.busy_s) / (ready * self.tick_s)),
            arrivals=snap.arrivals - before.arrivals,
            planned_replicas=self.plan.stage(snap.name).replicas,
            throughput_qps=info.throughput_qps,
            visit_rate=info.visit_rate,
        )

    def _apply(self, now_s: float, decision: Decision) -> None:
        current = {s.name: s.replicas for s in self.router.snapshot()}
        if current.get(decision.stage) == decision.replicas and decision.max_batch_size is None:
            return
        event = self.actuator.scale(decision.stage, decision.replicas, decision.max_batch_size)
        applied = LiveDecision(
            round(now_s, 3), decision.stage, decision.replicas, decision.reason, decision.message,
            round(float(getattr(event, "startup_s", 0.0)), 3), decision.max_batch_size,
        )  # fmt: skip
        self.decisions.append(applied)
        log.info("%s -> %d replicas (%s: %s)", decision.stage, decision.replicas, decision.reason, decision.message)
        if self.on_decision is not None:
            self.on_decision(applied)
