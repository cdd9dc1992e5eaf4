"""The cores a local deployment's replicas effectively had: fitted to how much crowding slowed their calls.

The prediction for replicas sharing a machine (`planner/shared_cores.py`) slows a call by the
fluid sharing rule, 1 + u * (max(1, D / cores) - 1), with u the call's share of a core and D the
cores the calls under way demand. With the machine's own count of cores the rule undershoots on a
small VM: the calls also wait for a core behind the router, the load generator, the model
server's own threads and whatever the hypervisor runs, in slices the fluid rule smooths away (on
the 2-core bench VM the cascade's calls had tails of 2-6 ms the rule does not make, and the
estimate ran 4-17% low; with 1.3-1.6 cores a simulation made both the tails and the P99).

The router bins every call by the mean number of calls under way over its length
(`router/crowding.py`). Within a stage, calls at a higher crowd took longer, and the cores that
make the rule's slowdown follow the measured means best are the effective cores:

    mean call time at crowd k  ~  base * (1 + u * (max(1, (u + (k - 1) * mean u) / cores) - 1))

fitted by least squares over the cores (a grid up to the machine's own) with one base per stage
(what a call takes alone, including what idle gaps add: a term alike at every crowd), each bin
weighted by its calls. A stage whose calls never crowded says nothing and only the others count;
where none does, or every core count fits alike (calls that compute nothing, such as sleeps),
there is no fit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from inferline.planner.shared_cores import slowdown

FEWEST = 1.0
"""The fewest cores the fit considers: below the demand of one call alone, fewer cores only scale
every call alike, which the stage's base (its time alone) takes up."""
STEP = 0.01
MIN_CALLS = 50
"""Calls under a crowd above one that a fit needs: fewer say too little of the slope."""


@dataclass(frozen=True)
class CrowdedCalls:
    """One stage's calls by how crowded they were."""

    share: float
    """The share of a call spent on a core (1: compute-bound)."""
    bins: Mapping[float, tuple[int, float]]
    """Mean crowd over the call -> (calls, seconds of calls)."""


@dataclass(frozen=True)
class CoreFit:
    cores: float
    """The effective cores: the rule's slowdown with these follows the calls best."""
    calls: int
    """Calls fitted (of stages whose calls crowded)."""
    error: float
    """Root-mean-square relative error of the bins' mean call times at the fit."""
    error_at_machine: float
    """The same with the machine's own cores."""


def fit_cores(stages: Sequence[CrowdedCalls], mean_share: float, machine_cores: float) -> CoreFit | None:
    """The effective cores of replicas that shared `machine_cores` cores, from their crowded calls."""
    grid = np.arange(FEWEST, machine_cores + STEP / 2, STEP)
    if grid.size == 0 or grid[-1] < machine_cores - 1e-9:
        grid = np.append(grid, machine_cores)
    loss = np.zeros_like(grid)
    fitted, crowded_calls = 0, 0
    for stage in stages:
        crowds = np.array(sorted(stage.bins), dtype=np.float64)
        calls = np.array([stage.bins[k][0] for k in crowds], dtype=np.float64)
        seconds = np.array([stage.bins[k][1] for k in crowds], dtype=np.float64)
        if crowds.size < 2 or calls.sum() == 0:
            continue
        means = seconds / np.maximum(calls, 1.0)
        demand = stage.share + (crowds - 1.0) * mean_share
        # factor[g, k]: the rule's slowdown at grid cores g for calls at crowd k (numba compiles the
        # rule for arrays as well)
        crowd = np.maximum(1.0, demand[None, :] / grid[:, None])
        factor = slowdown(stage.share, crowd)  # type: ignore[arg-type]
        base = (factor * (calls * means)).sum(axis=1) / (factor * factor * calls).sum(axis=1)
        relative = means[None, :] / (base[:, None] * factor) - 1.0
        loss += (calls * relative * relative).sum(axis=1)
        fitted += int(calls.sum())
        crowded_calls += int(calls[crowds > 1.0].sum())
    if crowded_calls < MIN_CALLS or np.ptp(loss) <= 1e-12 * max(1.0, float(loss.max())):
        return None
    best = int(np.argmin(loss))
    return CoreFit(
        cores=round(float(grid[best]), 2),
        calls=fitted,
        error=float(np.sqrt(loss[best] / fitted)),
        error_at_machine=float(np.sqrt(loss[-1] / fitted)),
    )
