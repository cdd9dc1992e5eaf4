"""A scale ladder: configurations planned ahead for the sample trace sped up 1.5x, 2x, 3x, 4x.

The paper's tuner scales a stage's replicas in proportion to the rate at the planned batch size.
When a bigger batch would absorb a burst at a lower cost (batching is cheap on accelerators, and
on the emulated models), that over-provisions: three replicas at batch 2 where one at batch 8
meets the SLO. The design lets a drift far from the plan trigger re-planning; the ladder is that
re-planning done at plan time, with the same estimator and greedy search on the sample trace
compressed in time, so the tuner only looks up a step when live traffic exceeds the plan's.

Each step keeps every stage on its planned hardware (the tuner never moves a stage to other
hardware); only batch sizes and replica counts differ.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from numpy.typing import NDArray

from inferline.planner.costtable import CostTable
from inferline.planner.estimator import Estimator
from inferline.planner.pipeline import Config, PipelineModel
from inferline.planner.search import plan_greedy

MULTIPLIERS = (1.5, 2.0, 3.0, 4.0)


@dataclass(frozen=True)
class Step:
    rate_multiplier: float
    config: Config
    cost_per_hour: float


def scale_ladder(
    model: PipelineModel,
    table: CostTable,
    planned: Config,
    arrivals_s: NDArray[np.float64],
    slo_s: float,
    multipliers: tuple[float, ...] = MULTIPLIERS,
    seed: int = 0,
) -> tuple[Step, ...]:
    """One step per multiplier the planner finds feasible; stops at the first it cannot meet."""
    pinned = tuple(
        replace(stage_table, options={c.hardware: stage_table.option(c.hardware)})
        for stage_table, c in zip(table, planned, strict=True)
    )
    arrivals = np.ascontiguousarray(arrivals_s, dtype=np.float64)
    start = float(arrivals[0]) if arrivals.size else 0.0
    steps = []
    for m in multipliers:
        faster = start + (arrivals - start) / m
        result = plan_greedy(model, pinned, Estimator(model, pinned, faster, slo_s, seed=seed))
        if result.config is None or not result.feasible:
            break
        steps.append(Step(m, result.config, result.cost_per_hour))
    return tuple(steps)
