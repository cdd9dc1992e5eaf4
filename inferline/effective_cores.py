"""The cores a local deployment's replicas effectively had: fitted to how crowding slowed their calls.

The prediction for replicas sharing a machine (`planner/shared_cores.py`) slows a call by the
fluid sharing rule: while calls demanding D cores are under way, a call with share u of a core
advances at rate 1 / (1 + u * (max(1, D / cores) - 1)). With the machine's own count of cores the
rule undershoots on a small VM: calls also wait for a core behind the router, the load generator,
the model server's own threads and whatever the hypervisor runs, in slices the fluid rule smooths
away (on the 2-core bench VM the cascade's calls had tails of 2-6 ms the rule does not make, and
the estimate from each run's own service times ran 4-17% low).

The router keeps, for each group of a stage's calls (grouped by their mean count of calls under
way), the seconds they spent with each count n under way (`router/crowding.py`). By the rule, the
work a group's calls did, each call's time alone, is

    work(group) = sum over n of seconds at n / (1 + u * (max(1, (u + (n - 1) * mean u) / cores) - 1))

and is the same per call in every group of a stage (its base: what a call takes alone). The cores
whose rule makes the groups' work per call agree best are the effective cores: a least-squares fit
of the relative spread of each group's work per call around the stage's base, each group weighted
by its calls, over a grid of cores from 1 (below the demand of one call alone, fewer cores only
scale every call alike) to the machine's. Where several fit alike (calls never crowded past some
count), the most cores among them. A stage whose calls never crowded says nothing; where none did,
or every count of cores fits alike (calls that compute nothing, such as sleeps), there is no fit.

Calls after an idle spell also take what the gap added (a profile's after_idle term), and those
fall mostly on calls alone: they have a base of their own.

The fit is a diagnostic, not what estimates share by default. On the 2-core bench VM the cascade's
calls slow gradually from the second call under way on (by about 20% with two, 40% with three),
where the rule has a knee at the cores: one count cannot follow both. The fit (1.35-1.43 cores in
three quiet replays) sets the knee low enough for the mean slowdown, and an estimate from each run's
own service times with it ran 3-20% high; with the machine's 2 it ran 5-16% low, and the count that
matched each replay's P99 was 1.5-1.8.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from inferline.planner.shared_cores import slowdown

FEWEST = 1.0
"""The fewest cores the fit considers."""
STEP = 0.01
MIN_CALLS = 50
"""Calls in groups crowded past one call that a fit needs: fewer say too little."""
TIE = 1e-9
"""Relative loss within which counts of cores fit alike."""


@dataclass(frozen=True)
class CrowdedCalls:
    """One stage's calls by how crowded they were."""

    share: float
    """The share of a call spent on a core (1: compute-bound)."""
    groups: Mapping[tuple[float, bool], tuple[int, Mapping[int, float]]]
    """(Mean count of calls under way, whether the replica sat idle before them) -> (calls, count
    under way -> seconds the calls spent with it)."""


@dataclass(frozen=True)
class CoreFit:
    cores: float
    """The effective cores: the rule's slowdown with these follows the calls best."""
    of: float
    """The cores the replicas ran on (the machine's)."""
    calls: int
    """Calls fitted (of stages whose calls crowded)."""
    error: float
    """Root-mean-square relative spread of the groups' work per call around their stage's, at the fit."""
    error_at_machine: float
    """The same with the machine's own cores."""


def _grid(machine_cores: float) -> NDArray[np.float64]:
    grid = np.arange(FEWEST, machine_cores + STEP / 2, STEP)
    return grid if grid.size and grid[-1] >= machine_cores - 1e-9 else np.append(grid, machine_cores)


def _factors(
    share: float, mean_share: float, counts: NDArray[np.float64], cores: NDArray[np.float64]
) -> NDArray[np.float64]:
    """The rule's slowdown [cores, count] of a call with `share` while `counts` calls are under way."""
    demand = share + (counts - 1.0) * mean_share
    crowd = np.maximum(1.0, demand[None, :] / cores[:, None])
    factors: NDArray[np.float64] = slowdown(share, crowd)  # type: ignore[arg-type, assignment]  # numba: arrays too
    return factors


def fit_cores(stages: Sequence[CrowdedCalls], mean_share: float, machine_cores: float) -> CoreFit | None:
    """The effective cores of replicas that shared `machine_cores` cores, from their crowded calls."""
    grid = _grid(machine_cores)
    loss = np.zeros_like(grid)
    fitted, crowded = 0, 0
    # Calls after an idle spell also take what the gap added: a base of their own.
    alike = [
        (stage.share, {k: v for k, v in stage.groups.items() if k[1] == idle})
        for stage in stages
        for idle in (False, True)
    ]
    for share, by_group in alike:
        groups = sorted(k for k, (n, _) in by_group.items() if n > 0)
        if len(groups) < 2:
            continue
        counts = np.array(sorted({c for k in groups for c in by_group[k][1]}), dtype=np.float64)
        calls = np.array([by_group[k][0] for k in groups], dtype=np.float64)
        seconds = np.array([[by_group[k][1].get(int(c), 0.0) for c in counts] for k in groups])
        per_call = (seconds / _factors(share, mean_share, counts, grid)[:, None, :]).sum(axis=2) / calls
        # The base minimising the calls' relative spread: sum n w^2 / sum n w.
        base = (calls * per_call**2).sum(axis=1) / (calls * per_call).sum(axis=1)
        loss += (calls * (per_call / base[:, None] - 1.0) ** 2).sum(axis=1)
        fitted += int(calls.sum())
        crowded += int(calls[np.array([k[0] for k in groups]) > 1.0].sum())
    if crowded < MIN_CALLS or np.ptp(loss) <= TIE * max(1e-12, float(loss.max())):
        return None
    best = int(np.flatnonzero(loss <= loss.min() * (1.0 + TIE) + 1e-15)[-1])
    return CoreFit(
        cores=round(float(grid[best]), 2),
        of=machine_cores,
        calls=fitted,
        error=float(np.sqrt(loss[best] / fitted)),
        error_at_machine=float(np.sqrt(loss[-1] / fitted)),
    )


def crowding_slowdown(calls: CrowdedCalls, mean_share: float, cores: float) -> float | None:
    """How much longer these calls took than alone under the rule with `cores`: their seconds over
    their work (None: no seconds)."""
    counts = np.array(sorted({c for _, at in calls.groups.values() for c in at}), dtype=np.float64)
    if counts.size == 0:
        return None
    seconds = np.array([sum(at.get(int(c), 0.0) for _, at in calls.groups.values()) for c in counts])
    if seconds.sum() <= 0:
        return None
    work = (seconds / _factors(calls.share, mean_share, counts, np.array([cores]))[0]).sum()
    return float(seconds.sum() / work)
