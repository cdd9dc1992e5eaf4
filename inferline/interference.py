"""How much calls computing side by side slowed each other: a stage's interference, fitted to how
crowding slowed its calls in a live run.

The prediction for replicas sharing a machine's cores (`planner/shared_cores.py`) slows a call
with share u of a core, while the calls under way (itself included) demand D cores, by

    1 + u * (max(max(1, D / cores), 1 + g * (D - u)) - 1)

where g is the stage's interference: what each core's worth of other calls' demand adds, through
what the cores share even below their count (a hyperthread's sibling, caches, memory bandwidth,
the hypervisor). With g = 0 it is the fluid sharing rule, which has no slowdown until the cores
are full; on the 2-core bench VM the cascade's calls took 1.27 times as long with a second call
under way and 1.5 with a third.

The router keeps, for each group of a stage's calls (grouped by their mean count of calls under
way), the seconds they spent with each count n under way (`router/crowding.py`). By the rule, the
work the group's calls did, each call's time alone, is

    work(group) = sum over n of seconds at n / slowdown(u, D = u + (n - 1) * mean u)

and is the same per call in every group of a stage (its base: what a call takes alone). The g
whose rule makes the groups' work per call agree best is the stage's interference: a least-squares
fit of the relative spread of each group's work per call around the stage's base, each group
weighted by its calls, on a grid from 0 to `MOST`. Where several fit alike, the least among them.
Calls after an idle spell also take what the gap added (a profile's after_idle term), and those
fall mostly on calls alone: they have a base of their own. A stage whose calls hardly crowded, or
whose calls hardly compute (sleeps: `MOST` would slow them by under `LEAST_EFFECT`), has no fit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

MOST = 2.0
"""The most interference the fit considers: each other call's core slowing a call by twice its
own time, far past what shared caches or a hyperthread's sibling do."""
STEP = 0.01
MIN_CALLS = 50
"""Calls in groups crowded past one call that a fit needs: fewer say too little."""
TIE = 1e-9
"""Relative loss within which two values fit alike."""
LEAST_EFFECT = 0.02
"""How much longer the most interference must make the calls than none for them to tell it: calls
that hardly compute (sleeps) barely feel it, and their noise would fit any value."""


@dataclass(frozen=True)
class CrowdedCalls:
    """One stage's calls by how crowded they were."""

    share: float
    """The share of a call spent on a core (1: compute-bound)."""
    groups: Mapping[tuple[float, bool], tuple[int, Mapping[int, float]]]
    """(Mean count of calls under way, whether the replica sat idle before them) -> (calls, count
    under way -> seconds the calls spent with it)."""


@dataclass(frozen=True)
class InterferenceFit:
    interference: float
    """The g whose rule follows the calls best."""
    calls: int
    """Calls fitted."""
    error: float
    """Root-mean-square relative spread of the groups' work per call around their base, at the fit."""
    error_without: float
    """The same with no interference (the fluid rule alone)."""


def _factors(
    share: float, mean_share: float, counts: NDArray[np.float64], cores: float, interference: NDArray[np.float64]
) -> NDArray[np.float64]:
    """The rule's slowdown [interference, count] of a call with `share` while `counts` calls are under way."""
    demand = share + (counts - 1.0) * mean_share
    fluid = np.where(demand <= cores * (1.0 + 1e-12), 1.0, demand / cores)  # as crowd_of
    crowd = np.maximum(fluid[None, :], 1.0 + interference[:, None] * (demand - share)[None, :])
    return 1.0 + share * (crowd - 1.0)


def fit_interference(calls: CrowdedCalls, mean_share: float, cores: float) -> InterferenceFit | None:
    """The interference of one stage's calls on `cores` shared cores (None: they cannot tell)."""
    strongest, none = (crowding_slowdown(calls, mean_share, cores, g) for g in (MOST, 0.0))
    if strongest is None or none is None or strongest < none * (1.0 + LEAST_EFFECT):
        return None
    grid = np.arange(0.0, MOST + STEP / 2, STEP)
    loss = np.zeros_like(grid)
    fitted, crowded = 0, 0
    for idle in (False, True):  # calls after an idle spell also take what the gap added: a base of their own
        by_group = {k: v for k, v in calls.groups.items() if k[1] == idle and v[0] > 0}
        groups = sorted(by_group)
        if len(groups) < 2:
            continue
        counts = np.array(sorted({c for k in groups for c in by_group[k][1]}), dtype=np.float64)
        n = np.array([by_group[k][0] for k in groups], dtype=np.float64)
        seconds = np.array([[by_group[k][1].get(int(c), 0.0) for c in counts] for k in groups])
        factors = _factors(calls.share, mean_share, counts, cores, grid)
        per_call = (seconds[None, :, :] / factors[:, None, :]).sum(axis=2) / n
        # The base minimising the calls' relative spread: sum n w^2 / sum n w.
        base = (n * per_call**2).sum(axis=1) / (n * per_call).sum(axis=1)
        loss += (n * (per_call / base[:, None] - 1.0) ** 2).sum(axis=1)
        fitted += int(n.sum())
        crowded += int(n[np.array([k[0] for k in groups]) > 1.0].sum())
    if crowded < MIN_CALLS or np.ptp(loss) <= TIE * max(1e-12, float(loss.max())):
        return None
    best = int(np.flatnonzero(loss <= loss.min() * (1.0 + TIE) + 1e-15)[0])
    return InterferenceFit(
        interference=round(float(grid[best]), 2),
        calls=fitted,
        error=float(np.sqrt(loss[best] / fitted)),
        error_without=float(np.sqrt(loss[0] / fitted)),
    )


def crowding_slowdown(calls: CrowdedCalls, mean_share: float, cores: float, interference: float = 0.0) -> float | None:
    """How much longer these calls took than alone under the rule: their seconds over their work
    (None: no seconds)."""
    counts = np.array(sorted({c for _, at in calls.groups.values() for c in at}), dtype=np.float64)
    if counts.size == 0:
        return None
    seconds = np.array([sum(at.get(int(c), 0.0) for _, at in calls.groups.values()) for c in counts])
    if seconds.sum() <= 0:
        return None
    work = (seconds / _factors(calls.share, mean_share, counts, cores, np.array([interference]))[0]).sum()
    return float(seconds.sum() / work)
