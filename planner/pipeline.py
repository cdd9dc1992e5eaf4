"""The planner's view of a pipeline: stages in topological order, as plain frozen data."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from inferline.spec import PipelineSpec


@dataclass(frozen=True)
class StageConfig:
    """How one stage is provisioned: hardware type, batch cap and replica count."""

    hardware: str
    max_batch_size: int
    replicas: int


Config = tuple[StageConfig, ...]
"""One StageConfig per stage, in the PipelineModel's topological order."""


@dataclass(frozen=True)
class PipelineModel:
    name: str
    names: tuple[str, ...]
    models: tuple[str, ...]
    parents: tuple[tuple[int, ...], ...]
    probabilities: tuple[float, ...]

    @property
    def size(self) -> int:
        return len(self.names)

    def children(self, stage: int) -> tuple[int, ...]:
        return tuple(c for c in range(self.size) if stage in self.parents[c])

    def ancestors(self, stage: int) -> tuple[int, ...]:
        """All ancestors of a stage, in topological order."""
        found: set[int] = set()
        todo = list(self.parents[stage])
        while todo:
            p = todo.pop()
            if p not in found:
                found.add(p)
                todo.extend(self.parents[p])
        return tuple(sorted(found))

    def visit_rates(self) -> NDArray[np.float64]:
        """Probability that a query visits each stage (exact, by inclusion over independent edges).

        A stage is reached when any parent was visited; parents' visits can be correlated
        through shared ancestors, so this is computed by enumerating outcomes for small
        pipelines and by Monte Carlo otherwise.
        """
        if self.size <= 16:
            return _visit_rates_exact(self)
        visits = sample_visits(self, 200_000, np.random.default_rng(0))
        return np.asarray(visits.mean(axis=1), dtype=np.float64)

    def config_of(self, stages: Mapping[str, StageConfig]) -> Config:
        return tuple(stages[n] for n in self.names)


def time_outside_stages_s(
    parents: tuple[tuple[int, ...], ...],
    visits: NDArray[np.bool_],
    entered_s: NDArray[np.float64],
    completion_s: NDArray[np.float64],
    latencies_s: NDArray[np.float64],
) -> NDArray[np.float64]:
    """Each query's latency less its time in the stages it visited, from joining a stage's queue to
    its completion there (-inf where not visited). An entry stage is joined at `entered_s` (the
    arrival, or the end of the query's way to the replicas); a later one when its last visited
    parent completed. Branches that run side by side add up, as a router's per-stage metrics do,
    so their overlap counts below zero."""
    joined = np.full_like(completion_s, -np.inf)
    for s, ps in enumerate(parents):
        if not ps:
            joined[s] = entered_s
        for p in ps:
            joined[s] = np.maximum(joined[s], completion_s[p])
    with np.errstate(invalid="ignore"):  # -inf less -inf where a stage was not visited
        in_stages = np.where(visits, completion_s - joined, 0.0).sum(axis=0)
    return np.asarray(latencies_s - in_stages, dtype=np.float64)


def pipeline_model(spec: PipelineSpec) -> PipelineModel:
    order = spec.topological_order()
    index = {s.name: i for i, s in enumerate(order)}
    return PipelineModel(
        name=spec.name,
        names=tuple(s.name for s in order),
        models=tuple(s.model for s in order),
        parents=tuple(tuple(sorted(index[p] for p in s.after)) for s in order),
        probabilities=tuple(s.probability for s in order),
    )


def sample_visits(model: PipelineModel, queries: int, rng: np.random.Generator) -> NDArray[np.bool_]:
    """Which stages each query visits: a (stages, queries) boolean array.

    Each conditional edge is sampled independently per query: a stage is reached when any of
    its parents was visited (an entry stage always), then kept with its probability.
    """
    draws = rng.random((model.size, queries))
    visits = np.empty((model.size, queries), dtype=np.bool_)
    for s in range(model.size):
        reached = np.ones(queries, dtype=np.bool_)
        if model.parents[s]:
            reached = np.logical_or.reduce([visits[p] for p in model.parents[s]])
        visits[s] = reached & (draws[s] < model.probabilities[s])
    return visits


def check_visits(model: PipelineModel, visits: NDArray[np.bool_], queries: int) -> NDArray[np.bool_]:
    """Given visits (e.g. the routes a replay's queries took) as a (stages, queries) boolean array;
    ValueError when its shape is not that or a query visits a stage without one of its parents."""
    visits = np.asarray(visits)
    if visits.shape != (model.size, queries) or visits.dtype != np.bool_:
        raise ValueError(f"visits must be a ({model.size}, {queries}) boolean array, got {visits.dtype} {visits.shape}")
    for s in range(model.size):
        if model.parents[s] and np.any(visits[s] & ~np.logical_or.reduce([visits[p] for p in model.parents[s]])):
            raise ValueError(f"some query visits stage {model.names[s]!r} but none of its parents")
    return np.ascontiguousarray(visits)


def query_visits(
    model: PipelineModel, queries: int, seed: int, given: NDArray[np.bool_] | None = None
) -> NDArray[np.bool_]:
    """The visits a simulation runs: `given` where there are (checked by `check_visits`), else sampled
    with `seed` (`sample_visits`)."""
    if given is not None:
        return check_visits(model, given, queries)
    return sample_visits(model, queries, np.random.default_rng(seed))


def _visit_rates_exact(model: PipelineModel) -> NDArray[np.float64]:
    # Each stage's own coin is independent; enumerate the 2^k coins of the stages whose
    # probability is below 1 (at most 16 stages, so at most 65536 outcomes).
    coins = [s for s in range(model.size) if model.probabilities[s] < 1.0]
    rates = np.zeros(model.size)
    for outcome in range(1 << len(coins)):
        weight = 1.0
        passed = {}
        for bit, s in enumerate(coins):
            ok = bool(outcome >> bit & 1)
            passed[s] = ok
            weight *= model.probabilities[s] if ok else 1.0 - model.probabilities[s]
        visited = [False] * model.size
        for s in range(model.size):
            reached = not model.parents[s] or any(visited[p] for p in model.parents[s])
            visited[s] = reached and passed.get(s, True)
        rates += weight * np.array(visited, dtype=np.float64)
    return rates
