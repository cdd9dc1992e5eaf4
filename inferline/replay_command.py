"""`inferline replay`: open-loop load from a trace against a running pipeline, measured next to the estimate.

It finds the pipeline that `inferline up` started (or takes --endpoint and --plan), sends one
query per trace arrival with the open-loop engine (`router/replay.py`), and reports measured P99,
SLO-miss rate, throughput and errors beside the estimate for the same plan and trace (closed-loop
with the same tuner and its measured replica start-up when a tuner runs, else the estimator's), the
tuner's decisions during the run and the cost of the replicas it held.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from inferline.adapters.base import TensorSpec, random_inputs
from inferline.calibration import (
    LiveStage,
    calibrate_profiles,
    calibration_record,
    hypervisor_took,
    live_stages,
    read_metrics,
    replica_cpu_s,
    with_router_work_per_call,
)
from inferline.catalog import DEFAULT_CATALOG, HardwareCatalog, load_catalog
from inferline.errors import InferlineError
from inferline.heap import freeze_long_lived
from inferline.interference import InterferenceFit
from inferline.output_paths import check_creatable_dir, check_writable_file, write_text
from inferline.outside import added_outside_ms, measured_outside_ms
from inferline.plan import Plan, load_plan
from inferline.planner.estimator import p99
from inferline.process_cpu import MachineCpu, machine_cpu, process_cpu_s
from inferline.profiles import ModelProfile, load_profiles, require_profiles
from inferline.router.client import AsyncKServeClient, ServerOverloaded
from inferline.router.http_client import AsyncKServeHttpClient
from inferline.router.prediction import predicted_latencies_and_outside_ms, routes_taken
from inferline.router.replay import ReplayProgress, ReplayResult, miss_rate, replay, run_results
from inferline.runs import simulate_plan
from inferline.sensitivity import Sensitivity, sensitivity, slower_profiles
from inferline.spec import PipelineSpec, StageSpec, load_spec
from inferline.startup import DEFAULT_STARTUP_S, LIVE_TICK_S, measured_startup_s
from inferline.validation import check_cores

INPUT_POOL = 64
"""Distinct random queries cycled through (enough to exercise routes, cheap to build)."""


@dataclass(frozen=True)
class Target:
    endpoint: str
    pipeline: str
    plan: Plan | None
    spec: PipelineSpec | None
    decisions_path: Path | None
    tuner: str | None = None
    """The live tuner the pipeline runs (`none` or None: a static plan)."""
    protocol: str = "http"
    """How `endpoint` is called: "http" or "grpc" (KServe v2 either way)."""
    cores: float | None = None
    """The cores all replicas share (a local deployment); None: each has its own, as planned."""
    router_pid: int | None = None
    """The process running the router, where it runs on this machine (its CPU shares the cores)."""
    router_metrics: str | None = None
    """The router's /metrics URL, where `inferline up` started it."""


@dataclass(frozen=True)
class CpuReading:
    """CPU seconds used so far by the router's process (where it runs here), by its replicas'
    own work (from its metrics), and by this load generator."""

    router_s: float | None
    client_s: float
    replicas_s: float | None = None
    metrics_text: str | None = None
    """The router's Prometheus text at the reading (None: not readable)."""
    machine: MachineCpu | None = None
    """This machine's CPU time so far, the hypervisor's steal among it (None: not known)."""

    @classmethod
    def now(cls, router_pid: int | None, router_metrics: str | None = None) -> CpuReading:
        replicas, text = None, None
        if router_metrics is not None:
            try:
                text = read_metrics(router_metrics)
                replicas = replica_cpu_s(text)
            except (InferlineError, ValueError):
                replicas = None  # the replay's measurements stand without it
        router = process_cpu_s(router_pid) if router_pid is not None else None
        return cls(router, time.process_time(), replicas, text, machine_cpu())

    def stolen_share(self, later: CpuReading) -> float | None:
        """The share of this machine's CPU its hypervisor gave to others between the two readings
        (`MachineCpu.stolen_since`; None: not known)."""
        if self.machine is None or later.machine is None:
            return None
        return later.machine.stolen_since(self.machine)

    def live_since(self, earlier: CpuReading) -> dict[str, LiveStage]:
        """What the router measured per stage between the two readings (empty where unreadable)."""
        if self.metrics_text is None or earlier.metrics_text is None:
            return {}
        try:
            return live_stages(self.metrics_text, since=earlier.metrics_text)
        except InferlineError:
            return {}

    def per_query_s(self, later: CpuReading, queries: int) -> dict[str, float]:
        """CPU seconds per query since this reading: the router's, the part of it outside its
        replicas' own work (its frontends and the rest), the load generator's, and the whole
        machine's busy time (every process and the kernel, the model servers included)."""
        if queries <= 0:
            return {}
        out = {"load generator": (later.client_s - self.client_s) / queries}
        if self.machine is not None and later.machine is not None:
            out[MACHINE] = (later.machine.busy_s - self.machine.busy_s) / queries
        if self.router_s is None or later.router_s is None:
            return out
        router = (later.router_s - self.router_s) / queries
        out = {"router": router} | out
        if self.replicas_s is not None and later.replicas_s is not None:
            out[OUTSIDE_REPLICAS] = max(router - (later.replicas_s - self.replicas_s) / queries, 0.0)
        return out


OUTSIDE_REPLICAS = "router outside its replicas"
MACHINE = "machine"


@dataclass(frozen=True)
class QueryWay:
    """Where a shared-core estimate puts the CPU work of the processes beside the replicas."""

    beside: Mapping[str, float]
    """CPU seconds per query of the single-threaded processes in each query's way, in the order a
    query passes them (planner/shared_cores.py), each named for the part counted."""
    in_calls_ms: Mapping[str, float] = field(default_factory=dict)
    """Per stage whose profile is offline, the router's own CPU ms per call, which goes in its calls
    in place of the profiler client's (`calibration.with_router_work_per_call`)."""


def in_each_querys_way(
    measured: Mapping[str, float],
    spec: PipelineSpec | None,
    plan: Plan | None,
    profiles: Mapping[str, ModelProfile] | None,
    live: Mapping[str, LiveStage] | None,
) -> QueryWay:
    """Where the load generator's and the router's CPU, measured during a replay, go in a shared-core
    estimate: the load generator in each query's way; the router's part outside its replicas (its
    frontends) after it, and its replicas' own work in their stages' calls.

    The router's event loop runs its frontends and also its coroutine replicas' own work (forming
    each request, reading each answer: Triton's adapter, as `inferline up` connects it). A replica
    does that work between sending a batch and passing it on, so it is part of the replica's cycle.
    A profile calibrated from the router's call times holds it already. An offline profile timed the
    model from a client of its own and holds that client's work instead: each call of its stage gets
    the router's measured CPU per call on that stage in its place (the mean over the stages that
    share the profile's model and hardware). Where that share is not measured, all of the router's
    CPU goes in each query's way ("router"), unless every profile is calibrated: then none does (it
    would be counted twice)."""
    out = {k: measured[k] for k in ("load generator",) if k in measured}
    if "router" not in measured:
        return QueryWay(out)
    whole, outside = measured["router"], measured.get(OUTSIDE_REPLICAS)
    if spec is None or plan is None:
        return QueryWay(out | {"router": whole})
    offline = [s for s in spec.stages if not _calibrated(profiles, *plan.profile_key(s))]
    called = [s for s in offline if live is not None and s.name in live and live[s.name].calls]
    if not offline or (
        outside is not None and live is not None and all(live[s.name].router_cpu_ms is not None for s in called)
    ):
        # A stage never called cost nothing; where every profile is calibrated, its calls hold it all.
        return QueryWay(
            out | ({OUTSIDE_REPLICAS: outside} if outside is not None else {}), _per_call_ms(called, plan, live)
        )
    return QueryWay(out | {"router": whole})


def _per_call_ms(stages: Sequence[StageSpec], plan: Plan, live: Mapping[str, LiveStage] | None) -> dict[str, float]:
    """The router's CPU ms per call on each of `stages`, averaged over those serving one profile."""
    groups: dict[tuple[str, str], list[LiveStage]] = {}
    for s in stages:
        groups.setdefault(plan.profile_key(s), []).append((live or {})[s.name])
    mean = {
        key: sum((st.router_cpu_ms or 0.0) * st.call_count for st in group) / sum(st.call_count for st in group)
        for key, group in groups.items()
    }
    return {s.name: mean[plan.profile_key(s)] for s in stages}


def with_router_work(
    profiles: Mapping[str, ModelProfile], spec: PipelineSpec, plan: Plan, in_calls_ms: Mapping[str, float]
) -> dict[str, ModelProfile]:
    """The profiles with the router's own work on each call of the stages in `in_calls_ms` in place of
    the profiler client's (a model without a profile stays without: the estimate that needs it says so)."""
    out = dict(profiles)
    added = {plan.profile_key(s): in_calls_ms[s.name] for s in spec.stages if s.name in in_calls_ms}
    for (model, hardware), ms in added.items():  # one value per profile's model and hardware (`_per_call_ms`)
        if model in out:
            out[model] = with_router_work_per_call(out[model], hardware, ms)
    return out


def _profiles_of(plan: Plan | None) -> Mapping[str, ModelProfile] | None:
    """The plan's profiles, or None where it names none or they cannot be read (the estimate that
    needs them says why; one given by the caller does not)."""
    if plan is None or plan.profiles is None:
        return None
    try:
        return load_profiles(plan.profiles)
    except InferlineError:
        return None


def _calibrated(profiles: Mapping[str, ModelProfile] | None, model: str, hardware: str) -> bool:
    profile = (profiles or {}).get(model)
    return profile is not None and hardware in calibration_record(profile)


def client_for(target: Target) -> AsyncKServeClient | AsyncKServeHttpClient:
    return AsyncKServeHttpClient(target.endpoint) if target.protocol == "http" else AsyncKServeClient(target.endpoint)


def classify(exc: BaseException) -> str:
    if isinstance(exc, ServerOverloaded):
        return "overloaded"
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return "timeout"
    return "failed"


def random_queries(specs: Sequence[TensorSpec], count: int, seed: int) -> list[dict[str, NDArray[np.generic]]]:
    """`count` single-query inputs of the pipeline's entry tensors."""
    rng = np.random.default_rng(seed)
    return [random_inputs(specs, 1, rng) for _ in range(count)]


async def replay_against(
    target: Target,
    arrivals_s: NDArray[np.float64],
    slo_ms: float | None,
    inputs: Sequence[TensorSpec],
    timeout_s: float,
    seed: int,
    on_progress: Any = None,
    answered: list[tuple[str, ...] | None] | None = None,
) -> ReplayResult:
    """`answered`, where given (one entry per query), gets each answered query's output names: the
    stages it visited (`prediction.routes_taken`)."""
    client = client_for(target)
    queries = random_queries(inputs, INPUT_POOL, seed)
    try:

        async def send(i: int) -> None:
            outputs = await client.infer(target.pipeline, queries[i % len(queries)], timeout_s=timeout_s)
            if answered is not None:
                answered[i] = tuple(outputs)

        return await replay(send, arrivals_s, slo_ms, timeout_s=timeout_s, on_progress=on_progress, classify=classify)
    finally:
        await client.close()


def decisions_between(path: Path | None, start_unix: float, end_unix: float) -> list[dict[str, Any]]:
    if path is None or not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            d = json.loads(line)
            if start_unix <= d.get("unix_time", 0.0) <= end_unix:
                out.append(d | {"time_s": round(d["unix_time"] - start_unix, 3)})
    return out


def replica_cost(
    plan: Plan, catalog: HardwareCatalog, decisions: Sequence[Mapping[str, Any]], duration_s: float
) -> float:
    """Dollars for the replicas held over the run: the plan's, changed at each decision's time."""
    replicas = {name: s.replicas for name, s in plan.stages.items()}
    price = {name: catalog.price(s.hardware) for name, s in plan.stages.items()}
    cost, last = 0.0, 0.0
    for d in sorted(decisions, key=lambda d: float(d["time_s"])):
        t = min(max(float(d["time_s"]), 0.0), duration_s)
        cost += sum(replicas[s] * price[s] for s in replicas) * (t - last) / 3600.0
        replicas[str(d["stage"])] = int(d["replicas"])
        last = t
    cost += sum(replicas[s] * price[s] for s in replicas) * (duration_s - last) / 3600.0
    return cost


def plan_catalog(plan: Plan) -> HardwareCatalog:
    """The catalog a plan was made with (the built-in AWS prices when it names none)."""
    return load_catalog(plan.hardware_catalog) if plan.hardware_catalog else DEFAULT_CATALOG


def run_estimate(
    plan: Plan | None,
    spec: PipelineSpec | None,
    arrivals_s: NDArray[np.float64],
    tuner: str | None,
    decisions: Sequence[Mapping[str, Any]],
    fallback_decisions: Sequence[Mapping[str, Any]] = (),
    cores: float | None = None,
    background_s: Mapping[str, float] | None = None,
    routes: tuple[NDArray[np.bool_], int] | None = None,
    in_calls_ms: Mapping[str, float] | None = None,
    profiles: Mapping[str, ModelProfile] | None = None,
    outside_ms: float | None = None,
) -> dict[str, Any]:
    """The estimate keys of a replay's results, for the same plan and trace as the run, and with the
    conditional edges its queries took where `routes` gives them (`prediction.routes_taken`).

    A run with a tuner is estimated by the closed-loop simulator with the same policy, the live
    tuner's tick and the replica start-up measured in `decisions` (median; else in
    `fallback_decisions`; else the simulator's default). A static run keeps the estimator's
    prediction. Either way the replicas share `cores` cores where given, beside processes that cost
    `background_s` CPU seconds per query, and each call of the stages in `in_calls_ms` takes that
    many ms longer (`QueryWay`). `profiles`: the plan's, where the caller has read them already.
    `outside_ms`: the run's measured mean latency per query outside its stages, of which every
    query gets what the simulation lacks (`inferline/outside.py`).
    """
    if plan is None or spec is None or plan.profiles is None:
        return no_estimate("no plan with its profiles and spec to estimate from")
    planned = profiles if profiles is not None else load_profiles(plan.profiles)
    profiles = with_router_work(planned, spec, plan, in_calls_ms or {})
    beside = tuple((background_s or {}).values())
    visits = routes[0] if routes is not None else None
    how, taken = _sharing(cores, background_s, in_calls_ms), _routes_taken(routes)
    if tuner is None or tuner == "none":
        latencies_ms, simulated_ms = predicted_latencies_and_outside_ms(
            spec, profiles, plan_catalog(plan), plan, arrivals_s, cores=cores, background_s=beside, visits=visits
        )
        added = added_outside_ms(outside_ms, simulated_ms)
        return {
            "estimated_p99_ms": p99(latencies_ms + added),
            "estimated_slo_miss_rate": _rate(miss_rate(latencies_ms + added, plan.slo_ms)),
            "estimated_startup_s": None,
            "estimated_outside_added_ms": _added(outside_ms, added),
            "estimate": f"static plan{how}{_outside(outside_ms, simulated_ms, added)}{taken}",
        }
    measured = measured_startup_s(decisions)
    if measured is None:
        measured = measured_startup_s(fallback_decisions)
    startup_s = measured if measured is not None else DEFAULT_STARTUP_S
    run = simulate_plan(
        spec, plan, arrivals_s, tuner, profiles=profiles, tick_s=LIVE_TICK_S, startup_s=startup_s, cores=cores,
        background_s=beside, visits=visits,
    )  # fmt: skip
    startup = "measured" if measured is not None else "default, none measured"
    simulated_ms = run.outside_s * 1000.0
    added = added_outside_ms(outside_ms, simulated_ms)
    latencies_ms = run.latencies_s * 1000.0 + added
    return {
        "estimated_p99_ms": p99(latencies_ms),
        "estimated_slo_miss_rate": _rate(miss_rate(latencies_ms, plan.slo_ms)),
        "estimated_startup_s": round(startup_s, 3),
        "estimated_outside_added_ms": _added(outside_ms, added),
        "estimate": f"closed-loop tuner {tuner}, start-up {startup_s:.3g} s {startup}{how}"
        + f"{_outside(outside_ms, simulated_ms, added)}{taken}",
    }


def _added(measured_ms: float | None, added_ms: float) -> float | None:
    """The ms added to every query for the time outside the stages (None: none measured)."""
    return round(added_ms, 3) if measured_ms is not None else None


def _outside(measured_ms: float | None, simulated_ms: NDArray[np.float64], added_ms: float) -> str:
    """What the estimate added for the time outside the stages, for its description ("": none measured)."""
    if measured_ms is None:
        return ""
    simulated = float(simulated_ms.mean()) if simulated_ms.size else 0.0
    return (
        f", and {added_ms:.2f} ms per query outside the stages added to each"
        f" (measured {measured_ms:.2f} ms, simulated {simulated:.2f} ms)"
    )


def _routes_taken(routes: tuple[NDArray[np.bool_], int] | None) -> str:
    """What the estimate knew of the conditional edges, for its description ("": sampled, as planned)."""
    if routes is None:
        return ""
    visits, known = routes
    every = "" if known == visits.shape[1] else f" ({known} of {visits.shape[1]} queries; sampled for the rest)"
    return f", conditional edges as the queries took them{every}"


def _sharing(
    cores: float | None, background_s: Mapping[str, float] | None, in_calls_ms: Mapping[str, float] | None = None
) -> str:
    """How the estimate placed the replicas, for its description ("" : a core each, as planned)."""
    if cores is None:
        return ""
    calls = ", ".join(f"{stage} {ms:.2f} ms" for stage, ms in (in_calls_ms or {}).items())
    return (
        f", replicas sharing {cores:g} core{'' if cores == 1 else 's'}"
        + "".join(
            f" {'with' if i == 0 else 'and'} the {name} ({1000 * s:.2f} ms CPU per query, one query at a time)"
            for i, (name, s) in enumerate((background_s or {}).items())
        )
        + (f", the router's own work on each call in place of the profiler client's ({calls})" if calls else "")
    )


def estimate_from_run(
    target: Target,
    arrivals_s: NDArray[np.float64],
    live: Mapping[str, LiveStage],
    cpu_s_per_query: Mapping[str, float],
    startup_s: float | None = None,
    visits: NDArray[np.bool_] | None = None,
    profiles: Mapping[str, ModelProfile] | None = None,
    outside_ms: float | None = None,
) -> tuple[float | None, dict[str, InterferenceFit]]:
    """The run's estimate again, with the service times the router measured in this run in place
    of the profiles' (calibrated as `inferline calibrate` would): P99 ms, or None where there is
    no plan with profiles or the run measured too few calls; and, where the replicas shared cores,
    each model's interference fitted to this run's crowded calls where they can tell it
    (`inferline/interference.py`, used in the estimate). A tuned run is
    simulated closed-loop with its tuner and `startup_s`, as its estimate was; `visits` are the
    conditional edges taken, `profiles` the plan's where the caller has read them already, and
    `outside_ms` the time outside the stages measured, added as in the estimate (`run_estimate`).

    Beside the estimate from the profiles it tells a user why an estimate missed: if this one
    holds, the servers have drifted from their profiles (recalibrate); if it misses too, the
    estimator's model of the deployment does.
    """
    plan, spec = target.plan, target.spec
    if plan is None or spec is None or plan.profiles is None or not live:
        return None, {}
    if profiles is None:
        profiles = load_profiles(plan.profiles)
    require_profiles(sorted({s.model for s in spec.stages}), profiles)
    cores = target.cores
    own, done = calibrate_profiles(spec, plan, profiles, live, cores=cores)
    fits = {c.model: c.interference_fit for c in done if c.interference_fit is not None}
    if all(c.ratio is None for c in done):
        return None, fits
    way = in_each_querys_way(cpu_s_per_query, spec, plan, own, live)
    own = with_router_work(own, spec, plan, way.in_calls_ms)  # stages called too little to calibrate
    beside = tuple(way.beside.values())
    if target.tuner not in (None, "none"):
        startup = startup_s if startup_s is not None else DEFAULT_STARTUP_S
        tuner = str(target.tuner)
        run = simulate_plan(
            spec, plan, arrivals_s, tuner, profiles=own, tick_s=LIVE_TICK_S, startup_s=startup, cores=cores,
            background_s=beside, visits=visits,
        )  # fmt: skip
        return run.p99_s * 1000.0 + added_outside_ms(outside_ms, run.outside_s * 1000.0), fits
    latencies, simulated = predicted_latencies_and_outside_ms(
        spec, own, plan_catalog(plan), plan, arrivals_s, cores=cores, background_s=beside, visits=visits
    )
    return p99(latencies) + added_outside_ms(outside_ms, simulated), fits


def fit_record(fits: Mapping[str, InterferenceFit]) -> dict[str, Any] | None:
    """Each model's interference fitted to a run, for its results (None: none fitted)."""
    return {
        model: asdict(fit) | {"error": round(fit.error, 4), "error_without": round(fit.error_without, 4)}
        for model, fit in sorted(fits.items())
    } or None


def no_estimate(why: str) -> dict[str, Any]:
    return {
        "estimated_p99_ms": None,
        "estimated_slo_miss_rate": None,
        "estimated_startup_s": None,
        "estimated_outside_added_ms": None,
        "estimate": f"none: {why}",
    }


def _rate(value: float | None) -> float | None:
    return round(value, 6) if value is not None else None


def results_for(
    target: Target,
    result: ReplayResult,
    arrivals_s: NDArray[np.float64],
    started_unix: float,
    decisions: list[dict[str, Any]] | None = None,
    cpu_s_per_query: Mapping[str, float] | None = None,
    live: Mapping[str, LiveStage] | None = None,
    answered: Sequence[tuple[str, ...] | None] | None = None,
) -> dict[str, Any]:
    """Run results; `decisions` default to the tuner's log in the state dir.

    `cpu_s_per_query`: the CPU seconds per query of the router and the load generator, measured
    during the run (`CpuReading`), are reported. Where the replicas share this machine's cores, the
    estimate puts the load generator and the router in each query's way, as single-threaded
    processes on the same cores (`in_each_querys_way`).

    The estimate (`run_estimate`) is closed-loop with the target's tuner, or the static estimator's
    for a static plan. With `live`, the router's measurements of this run, the run is also estimated
    from them (`estimate_from_run`). With `answered` (`replay_against`), both estimates take the
    conditional edges each query took.
    """
    plan = target.plan
    fallback: list[dict[str, Any]] = []
    if decisions is None:
        decisions = decisions_between(target.decisions_path, started_unix, started_unix + result.duration_s + 1.0)
        fallback = decisions_between(target.decisions_path, 0.0, math.inf)  # the whole log
    cost_per_hour = None
    if plan is not None:
        cost = replica_cost(plan, plan_catalog(plan), decisions, result.duration_s)
        cost_per_hour = cost * 3600.0 / max(result.duration_s, 1e-9)
    # The load generator shares the replicas' cores only where the deployment runs here, too.
    local = target.router_pid is not None
    measured = (cpu_s_per_query or {}) if local else {}
    way = QueryWay({})
    routes = routes_taken(target.spec, answered) if answered is not None and target.spec is not None else None
    planned = _profiles_of(plan)  # read once for the estimates below (None: they read and say why)
    outside = measured_outside_ms(result.latencies_ms, live) if live else None
    try:
        if measured:
            way = in_each_querys_way(measured, target.spec, plan, planned, live)
        estimate = run_estimate(
            plan, target.spec, arrivals_s, target.tuner, decisions, fallback, target.cores, way.beside, routes,
            way.in_calls_ms, planned, outside,
        )  # fmt: skip
    except InferlineError as exc:  # what was measured stands without an estimate
        estimate = no_estimate(exc.one_line())
    sensitive = _sensitivity(target, arrivals_s, estimate, decisions, fallback, way, routes, planned, outside)
    out = run_results(
        result,
        slo_ms=plan.slo_ms if plan else None,
        estimated_p99_ms=estimate.pop("estimated_p99_ms"),
        cost_per_hour=cost_per_hour,
        decisions=decisions,
    )
    if cpu_s_per_query:
        out["cpu_ms_per_query"] = {name: round(1000 * s, 4) for name, s in cpu_s_per_query.items()}
    from_run: float | None = None
    fits: dict[str, InterferenceFit] = {}
    if live:
        try:
            from_run, fits = estimate_from_run(
                target, arrivals_s, live, measured, estimate.get("estimated_startup_s"),
                routes[0] if routes is not None else None, planned, outside,
            )  # fmt: skip
        except (InferlineError, ValueError):  # e.g. measurements no profile can take
            from_run = None  # what was measured stands without it
    out["estimated_from_run_p99_ms"] = round(from_run, 3) if from_run is not None else None
    out["outside_stages_ms"] = round(outside, 3) if outside is not None else None
    out["interference"] = fit_record(fits)
    out["estimate_sensitivity"] = sensitive.record() if sensitive is not None else None
    return out | estimate


def _sensitivity(
    target: Target,
    arrivals_s: NDArray[np.float64],
    estimate: Mapping[str, Any],
    decisions: Sequence[Mapping[str, Any]],
    fallback: Sequence[Mapping[str, Any]],
    way: QueryWay,
    routes: tuple[NDArray[np.bool_], int] | None,
    planned: Mapping[str, ModelProfile] | None,
    outside_ms: float | None = None,
) -> Sensitivity | None:
    """The estimate again with every server `SLOWER_BY` slower (`inferline/sensitivity.py`), where
    there is an estimate to compare it with."""
    plan, spec, p99_ms = target.plan, target.spec, estimate.get("estimated_p99_ms")
    if plan is None or spec is None or planned is None or p99_ms is None or not p99_ms > 0:
        return None
    slower = run_estimate(
        plan, spec, arrivals_s, target.tuner, decisions, fallback, target.cores, way.beside, routes,
        way.in_calls_ms, slower_profiles(planned, spec, plan), outside_ms,
    )  # fmt: skip
    return sensitivity(p99_ms, slower["estimated_p99_ms"])


def target_from(
    state_dir: str | None,
    endpoint: str | None,
    plan_path: str | None,
    pipeline: str | None,
    protocol: str = "http",
    cores: float | None = None,
) -> Target:
    """The pipeline to replay against: given by address, or the one `inferline up` started from `state_dir`.

    The replicas of a local deployment share its machine's cores (as `up` recorded them), unless
    `cores` says otherwise.
    """
    check_cores(cores)
    from inferline.serve_command import DECISIONS_FILE, read_up

    up = read_up(state_dir) if endpoint is None and state_dir is not None else None
    plan_file = plan_path or (up or {}).get("plan")
    plan = load_plan(plan_file) if plan_file else None
    spec = load_spec(plan.spec) if plan is not None and plan.spec else None
    address = endpoint or (up["endpoints"][protocol] if up else None)
    name = pipeline or (up or {}).get("pipeline") or (plan.pipeline if plan else None)
    if address is None:
        raise InferlineError("no pipeline to replay against", "start one with `inferline up PLAN` or pass --endpoint")
    if name is None:
        raise InferlineError(
            f"the pipeline to call at {address} is not named", "pass --pipeline NAME, or --plan PLAN for its pipeline"
        )
    decisions = Path(state_dir) / DECISIONS_FILE if up is not None and state_dir is not None else None
    shared = cores if cores is not None else (up or {}).get("cores")
    router_pid = int(up["pid"]) if up is not None and up.get("pid") else None
    metrics = (up.get("endpoints") or {}).get("metrics") if up is not None else None
    return Target(address, name, plan, spec, decisions, (up or {}).get("tuner"), protocol, shared, router_pid, metrics)


async def entry_inputs(target: Target) -> list[TensorSpec]:
    """The pipeline's entry tensors, per query (its metadata's shapes without the batch axis)."""
    client = client_for(target)
    try:
        meta = await client.model_metadata(target.pipeline)
    finally:
        await client.close()
    return [TensorSpec(t.name, t.dtype, tuple(t.shape[1:])) for t in meta.inputs]


def progress_printer(console: Any) -> Any:
    last = [0.0]

    def show(p: ReplayProgress) -> None:
        if time.monotonic() - last[0] >= 5.0:
            last[0] = time.monotonic()
            console.print(f"  {p.elapsed_s:5.1f} s: sent {p.sent}/{p.total}, answered {p.answered}, errors {p.errors}")

    return show


def run_replay(args: Any, console: Any) -> int:
    from inferline.traces import load_trace

    target = target_from(args.state_dir, args.endpoint, args.plan, args.pipeline, args.protocol, args.cores)
    arrivals = load_trace(args.trace)
    if args.timeout_s <= 0:
        raise InferlineError(f"--timeout-s must be positive, got {args.timeout_s:g}", "pass seconds")
    metrics_out = metrics_directory(args.metrics_out, target)
    out = check_writable_file(args.out, "results file") if args.out else None
    inputs = asyncio.run(entry_inputs(target))
    slo_ms = args.slo_ms if args.slo_ms is not None else (target.plan.slo_ms if target.plan else None)
    console.print(f"replaying {arrivals.size} queries ({args.trace}) against {target.pipeline!r} at {target.endpoint}")
    freeze_long_lived()  # a collector pause mid-replay would show up as the pipeline's latency
    started = time.time()
    before = CpuReading.now(target.router_pid, target.router_metrics)
    answered: list[tuple[str, ...] | None] = [None] * arrivals.size
    result = asyncio.run(
        replay_against(target, arrivals, slo_ms, inputs, args.timeout_s, args.seed, progress_printer(console), answered)
    )
    after = CpuReading.now(target.router_pid, target.router_metrics)
    cpu = before.per_query_s(after, result.sent)
    live = after.live_since(before)
    results = results_for(target, result, arrivals, started, cpu_s_per_query=cpu, live=live, answered=answered)
    stolen = before.stolen_share(after)
    results["machine_stolen"] = round(stolen, 4) if stolen is not None else None
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        console.print(replay_table(target.pipeline, results))
    if metrics_out is not None:
        console.print(save_router_metrics(metrics_out, before.metrics_text, after.metrics_text))
    if out is not None:  # last: the results are printed above whatever befell the folder meanwhile
        write_text(out, json.dumps(results, indent=2) + "\n", "results file")
    return 0


METRICS_BEFORE, METRICS_AFTER = "router-metrics-before.txt", "router-metrics-after.txt"


def metrics_directory(directory: str | None, target: Target) -> Path | None:
    """Where `--metrics-out` keeps the router's metrics around the replay, checked before it runs."""
    if directory is None:
        return None
    if target.router_metrics is None:
        raise InferlineError(
            "--metrics-out needs the router's metrics, which a pipeline started by `inferline up` tells",
            "replay it with --state-dir, or leave out --metrics-out",
        )
    return check_creatable_dir(directory, "--metrics-out folder")


def save_router_metrics(directory: Path, before: str | None, after: str | None) -> str:
    """Write the router's metrics from before and after the replay; what was done, for the console."""
    if before is None or after is None:
        return "[yellow]the router's metrics could not be read around the replay: none written[/yellow]"
    try:  # checked before the replay; a folder that changed since costs these files, not the results
        directory.mkdir(parents=True, exist_ok=True)
        (directory / METRICS_BEFORE).write_text(before)
        (directory / METRICS_AFTER).write_text(after)
    except OSError as exc:
        return f"[yellow]the router's metrics could not be written to {directory}: {exc.strerror}[/yellow]"
    return (
        f"the router's metrics before and after the replay are in {directory}: `inferline calibrate PLAN "
        f"--metrics {directory / METRICS_AFTER} --since {directory / METRICS_BEFORE} --out DIR` calibrates "
        "from this replay alone"
    )


def replay_table(pipeline: str, r: Mapping[str, Any]) -> Any:
    from rich.table import Table

    def ms(v: Any) -> str:
        return "-" if v is None else f"{v:.1f}"

    caption = f"estimate: {r.get('estimate') or '-'}"
    slowed = hypervisor_took(r.get("machine_stolen"), "during the run")
    if slowed is not None:
        caption += f"\n{slowed}: the latency measured is not the pipeline's alone"
    from_run = r.get("estimated_from_run_p99_ms")
    if from_run is not None:
        caption += f"\nthe same estimate from this run's own service times: P99 {from_run:.1f} ms"
        fits = r.get("interference")
        if fits:
            caption += "; calls beside them slowed this run's calls, per core's worth: " + ", ".join(
                f"{model} +{fit['interference']:.0%}" for model, fit in fits.items()
            )
        if not r.get("errors") and drifted(r.get("estimated_p99_ms"), from_run, r.get("p99_ms")):
            caption += " (the servers no longer match their profiles: `inferline calibrate` rewrites them)"
    sensitive = r.get("estimate_sensitivity")
    if sensitive:
        caption += "\n" + Sensitivity.from_record(sensitive).line()
    table = Table(title=f"{pipeline}: open-loop replay", caption=caption)
    for column in ("sent", "answered", "errors", "throughput q/s", "P99 ms", "estimated P99 ms", "SLO miss", "$/hour"):
        table.add_column(column, justify="right")
    table.add_row(
        str(r["sent"]), str(r["answered"]), str(r["errors"]), f"{r['throughput_qps']:.1f}", ms(r["p99_ms"]),
        ms(r.get("estimated_p99_ms")),
        "-" if r.get("slo_miss_rate") is None else f"{100 * r['slo_miss_rate']:.2f}%",
        "-" if r.get("cost_per_hour") is None else f"{r['cost_per_hour']:.4f}",
    )  # fmt: skip
    return table


FIDELITY_TOLERANCE = 0.10
"""How far from the measured P99 an estimate may be and still count as holding (the design's target)."""


def drifted(from_profiles_ms: float | None, from_run_ms: float, measured_ms: float | None) -> bool:
    """Whether the estimate from the profiles misses the measured P99 where the one from the run's
    own service times holds: the servers, not the estimator's model, changed."""
    if from_profiles_ms is None or measured_ms is None or measured_ms <= 0:
        return False
    off = abs(from_profiles_ms - measured_ms) / measured_ms
    return off > FIDELITY_TOLERANCE and abs(from_run_ms - measured_ms) / measured_ms <= FIDELITY_TOLERANCE
