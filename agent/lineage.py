"""Lineage profiling: replay sample queries through a pipeline and measure each edge's real rate.

Entry stages get random inputs of their declared shapes; a child's inputs are its parents'
outputs of the same name (or, when names differ, the one parent output of the right shape), else
its other ancestors' outputs or the query's own inputs, as the router feeds them;
routed edges are decided by the spec's route on the parents' real outputs, the others are
sampled with the spec's probability as the router would. The result says, per stage, how many
queries reached it and how many continued into it: the measured probability to check or fill in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from inferline.adapters.base import Adapter, ModelInfo, example_inputs, feed_inputs
from inferline.routes import resolve_route
from inferline.spec import PipelineSpec, StageSpec

Batch = dict[str, NDArray[np.generic]]


@dataclass(frozen=True)
class EdgeMeasure:
    stage: str
    routed: bool
    reached: int
    """Queries whose parents ran (all queries for an entry stage)."""
    continued: int
    spec_probability: float

    @property
    def measured(self) -> float:
        return self.continued / self.reached if self.reached else float("nan")


def measure_lineage(spec: PipelineSpec, adapter: Adapter, samples: int, seed: int = 0) -> list[EdgeMeasure]:
    """All stages' models must be served by `adapter`'s server."""
    rng = np.random.default_rng(seed)
    visited: dict[str, NDArray[np.bool_]] = {}
    outputs: dict[str, Batch] = {}
    query: Batch = {}
    """What the queries themselves carry: the entry stages' inputs."""
    ancestors: dict[str, set[str]] = {}
    measures = []
    for stage in spec.topological_order():
        ancestors[stage.name] = set(stage.after).union(*(ancestors[p] for p in stage.after))
        info = adapter.model_info(stage.model)
        if stage.after:
            reached = np.logical_or.reduce([visited[p] for p in stage.after])
            go = _decide(stage, reached, outputs, rng)
        else:
            reached = np.ones(samples, dtype=np.bool_)
            go = reached.copy()
        visited[stage.name] = go
        inputs = _inputs(stage, info, samples, outputs, query, ancestors[stage.name], spec, seed)
        if not stage.after:
            query.update(inputs)
        outputs[stage.name] = _run(adapter, info, inputs, go)
        measures.append(
            EdgeMeasure(stage.name, stage.route is not None, int(reached.sum()), int(go.sum()), stage.probability)
        )
    return measures


def _decide(
    stage: StageSpec, reached: NDArray[np.bool_], outputs: Mapping[str, Batch], rng: np.random.Generator
) -> NDArray[np.bool_]:
    if stage.route is None:
        return reached & (rng.random(reached.size) < stage.probability)
    route = resolve_route(stage.route, stage.name)
    merged = {k: v for p in stage.after for k, v in outputs[p].items()}
    return np.array([bool(r) and bool(route({k: v[i] for k, v in merged.items()})) for i, r in enumerate(reached)])


def _inputs(
    stage: StageSpec,
    info: ModelInfo,
    samples: int,
    outputs: Mapping[str, Batch],
    query: Batch,
    ancestors: set[str],
    spec: PipelineSpec,
    seed: int,
) -> Batch:
    fresh = example_inputs(info, samples, seed)
    if not stage.after:
        return fresh
    wider = dict(query)
    for a in (s.name for s in spec.topological_order() if s.name in ancestors):
        wider.update(outputs[a])
    parents = {k: v for p in stage.after for k, v in outputs[p].items()}
    return feed_inputs(info, parents, feed_inputs(info, wider, fresh))


def _run(adapter: Adapter, info: ModelInfo, inputs: Batch, go: NDArray[np.bool_]) -> Batch:
    """Outputs for every query (zeros where the query skipped the stage), sent in allowed batch sizes."""
    limit = info.config.max_batch_size if info.config else 1
    rows = np.flatnonzero(go)
    results: dict[str, NDArray[np.generic]] = {}
    for start in range(0, rows.size, limit):
        chunk = rows[start : start + limit]
        answer = adapter.infer(info.name, {k: v[chunk] for k, v in inputs.items()})
        for name, value in answer.items():
            if name not in results:
                results[name] = np.zeros((go.size, *value.shape[1:]), dtype=value.dtype)
            results[name][chunk] = value
    return results
