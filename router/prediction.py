"""The estimator's prediction for a plan and a trace, to print beside what a replay measured.

Pure (planner, spec, profiles, catalog and plan only; no network), though it lives with the data
plane because only the replay tool needs it. It runs the very simulation the planner ran
(`Estimator.latencies_s`, same seed for the conditional edges), so for the plan's own trace the
P99 here equals the plan's `estimated_p99_ms`. Where the replicas share a machine's cores (a local
deployment), `cores` predicts with that sharing instead (`planner/shared_cores.py`).

A replay knows more than the plan did: which conditional edges each of its queries took (the router
answers every stage a query visited, `routes_taken`). Over a replay's few thousand queries, one
sample of the edges moves the P99 by as much as the estimator's other errors (6-12% over seeds on
the emulated pipeline, 20% in one replay), so the replay predicts with the routes its queries took.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import NDArray

from inferline.catalog import HardwareCatalog
from inferline.errors import PlanError
from inferline.plan import Plan
from inferline.planner.costtable import build_cost_table
from inferline.planner.estimator import Estimator, p99
from inferline.planner.pipeline import (
    Config,
    PipelineModel,
    check_visits,
    pipeline_model,
    sample_visits,
    time_outside_stages_s,
)
from inferline.planner.planning import plan_config
from inferline.planner.shared_cores import shared_core_run
from inferline.profiles import ModelProfile
from inferline.spec import PipelineSpec


def with_replicas(config: Config, names: tuple[str, ...], replicas: Mapping[str, int]) -> Config:
    """The config with some stages' replica counts replaced (the live tuner changes only those)."""
    unknown = sorted(set(replicas) - set(names))
    if unknown:
        raise PlanError(f"replica override for unknown stages {unknown}", f"use stages of the pipeline: {list(names)}")
    bad = sorted(name for name, k in replicas.items() if k < 1)
    if bad:
        raise PlanError(f"replica override below 1 for stages {bad}", "give every stage at least one replica")
    return tuple(
        dataclasses.replace(c, replicas=replicas[name]) if name in replicas else c
        for name, c in zip(names, config, strict=True)
    )


def has_conditional_edges(spec: PipelineSpec) -> bool:
    return any(s.after and (s.route is not None or s.probability < 1.0) for s in spec.stages)


def routes_taken(
    spec: PipelineSpec, answered: Sequence[Sequence[str] | None], seed: int = 0
) -> tuple[NDArray[np.bool_], int] | None:
    """Which stages each query visited, read from its answer's output names (`stage.tensor` for every
    stage it visited), with the estimator's sampled routes (`seed`) for queries not answered: the
    (stages, queries) visits in the estimator's stage order, and how many queries' routes were read.

    None where the pipeline has no conditional edge (every query visits every stage) or no query's
    routes could be read. An answer that lacks an entry stage (the router runs every one: e.g. the
    answers of another pipeline) or names a stage without any of its parents counts as not
    answered. A stage without outputs cannot be seen: where it ends a route, it reads as not visited.
    """
    if not has_conditional_edges(spec):
        return None
    model = pipeline_model(spec)
    visits = sample_visits(model, len(answered), np.random.default_rng(seed))
    prefixes = [f"{name}." for name in model.names]
    read: dict[tuple[str, ...], NDArray[np.bool_] | None] = {}
    known = 0
    for q, names in enumerate(answered):
        if names is None:
            continue
        key = tuple(names)
        if key not in read:  # a pipeline's answers come in few shapes
            read[key] = _stages_of(model, prefixes, key)
        column = read[key]
        if column is not None:
            visits[:, q] = column
            known += 1
    return (visits, known) if known else None


def _stages_of(model: PipelineModel, prefixes: list[str], names: tuple[str, ...]) -> NDArray[np.bool_] | None:
    column = np.array([any(n.startswith(p) for n in names) for p in prefixes], dtype=np.bool_)
    if not all(column[s] for s, parents in enumerate(model.parents) if not parents):
        return None
    try:
        check_visits(model, column[:, np.newaxis], 1)
    except ValueError:
        return None
    return column


def predicted_latencies_ms(
    spec: PipelineSpec,
    profiles: Mapping[str, ModelProfile],
    catalog: HardwareCatalog,
    plan: Plan,
    arrivals_s: NDArray[np.float64],
    seed: int = 0,
    replicas: Mapping[str, int] | None = None,
    cores: float | None = None,
    background_s: tuple[float, ...] = (),
    visits: NDArray[np.bool_] | None = None,
) -> NDArray[np.float64]:
    """Every query's end-to-end latency (ms) as the estimator simulates the plan over the trace.

    `replicas` overrides the plan's replica counts per stage (e.g. what the live tuner chose).
    `seed` samples the conditional edges (`make_plan` uses 0 by default), unless `visits` gives
    them (`routes_taken`). `cores`: every replica shares that many cores (None: each has its own
    hardware, as planned), with the processes beside them that cost `background_s` CPU seconds per
    query each (e.g. the load generator).
    """
    latencies, _ = predicted_latencies_and_outside_ms(
        spec, profiles, catalog, plan, arrivals_s, seed, replicas, cores, background_s, visits
    )
    return latencies


def predicted_latencies_and_outside_ms(
    spec: PipelineSpec,
    profiles: Mapping[str, ModelProfile],
    catalog: HardwareCatalog,
    plan: Plan,
    arrivals_s: NDArray[np.float64],
    seed: int = 0,
    replicas: Mapping[str, int] | None = None,
    cores: float | None = None,
    background_s: tuple[float, ...] = (),
    visits: NDArray[np.bool_] | None = None,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """`predicted_latencies_ms`, and each query's part of it outside every stage's queue and calls
    (`time_outside_stages_s`: its way through the processes beside replicas that share cores)."""
    model = pipeline_model(spec)
    table = build_cost_table(model, profiles, catalog)
    config = plan_config(model, table, plan)
    if replicas:
        config = with_replicas(config, model.names, replicas)
    arrivals = np.asarray(arrivals_s, dtype=np.float64)
    estimator = Estimator(model, table, arrivals, plan.slo_ms / 1000.0, seed=seed, visits=visits)
    if cores is not None:
        run = shared_core_run(estimator, config, cores, background_s)
        return run.latencies_s() * 1000.0, run.outside_s() * 1000.0
    latencies_s, completions = estimator.latencies_s(config)
    outside_s = time_outside_stages_s(
        model.parents, estimator.visits, estimator.arrivals_s, np.array(completions), latencies_s
    )
    return latencies_s * 1000.0, outside_s * 1000.0


def predicted_p99_ms(
    spec: PipelineSpec,
    profiles: Mapping[str, ModelProfile],
    catalog: HardwareCatalog,
    plan: Plan,
    arrivals_s: NDArray[np.float64],
    seed: int = 0,
    replicas: Mapping[str, int] | None = None,
    cores: float | None = None,
    background_s: tuple[float, ...] = (),
) -> float:
    """The estimator's nearest-rank P99 (ms) of the plan over the trace (see `predicted_latencies_ms`)."""
    return p99(predicted_latencies_ms(spec, profiles, catalog, plan, arrivals_s, seed, replicas, cores, background_s))
