"""What a tuner policy sees and says. Time is passed in (`now_s`), never read from a clock,
so the same policy code runs in the simulator's virtual time and live."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray


@dataclass(frozen=True)
class StageStatus:
    """One stage as observed at the end of a control tick."""

    name: str
    replicas: int
    """Provisioned replicas, including those still starting."""
    ready_replicas: int
    queue_length: int
    """Queries waiting in the stage's queue."""
    in_flight: int
    """Queries in batches being processed."""
    busy_fraction: float
    """Busy replica-seconds over ready replica-seconds in the last tick (0..1)."""
    arrivals: int
    """Queries that arrived at this stage during the last tick."""
    planned_replicas: int
    throughput_qps: float
    """μ: one replica's throughput at the planned batch size."""
    visit_rate: float
    """s: fraction of pipeline queries that visit this stage."""

    @property
    def ongoing(self) -> int:
        """Queued plus in-flight queries (Ray Serve's "ongoing requests")."""
        return self.queue_length + self.in_flight


@dataclass(frozen=True)
class TunerContext:
    now_s: float
    tick_s: float
    stages: tuple[StageStatus, ...]
    recent_arrivals_s: NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    """Pipeline arrival times of the last 60 s, ascending."""
    new_arrivals: int = 0
    """How many of `recent_arrivals_s` (the last ones) arrived during the last tick."""


@dataclass(frozen=True)
class Decision:
    """A replica change for one stage, with a machine reason (CamelCase) and a sentence."""

    stage: str
    replicas: int
    reason: str
    message: str
    max_batch_size: int | None = None
    """A new batch size for the stage (a scale-ladder step); None keeps the current one."""


def clamp(replicas: int, low: int, high: int) -> int:
    return max(low, min(high, replicas))
