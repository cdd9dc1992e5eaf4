"""`inferline demo`: the whole loop on this machine, with real Triton processes.

1. start Triton with the example models and profile them (real measurements);
2. plan the bundled pipeline for its SLO on a sample trace;
3. deploy the plan (Triton instances per stage, the router and its endpoints);
4. replay a bursty trace open-loop, once with the live tuner and once with the static plan;
5. print SLO, estimated and measured P99, SLO-miss rate, cost and scaling decisions, and write a
   report (JSON, and plots: latency CDF measured vs estimated, arrival rate and replicas over time).

The pipeline is `local-emulated`: its models are emulated (they sleep a + b·n ms), because a
2-core machine cannot host the replicas a burst needs of models that really compute.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from prometheus_client import generate_latest
from rich.console import Console
from rich.table import Table

from inferline.adapters.registry import connect, embedded_server
from inferline.agent.profiler import ProfileSettings, profile_to_directory
from inferline.calibration import hypervisor_took, live_stages, stolen_share
from inferline.catalog import load_catalog
from inferline.deployment import Endpoints, LocalDeployment
from inferline.errors import InferlineError
from inferline.heap import freeze_long_lived
from inferline.live_tuner import LiveTuner
from inferline.output_paths import make_dir
from inferline.plan import Plan
from inferline.planner.planning import make_plan
from inferline.planner.tuning.registry import make_policy
from inferline.process_cpu import available_cores, group_clock
from inferline.profiles import load_profiles
from inferline.replay_command import Target, progress_printer, replay_against, results_for
from inferline.router.prediction import predicted_latencies_ms
from inferline.router.replay import ReplayResult
from inferline.spec import PipelineSpec, load_spec
from inferline.traces import load_trace

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PIPELINE = "local-emulated"
SAMPLE_TRACE = "gamma:rate=80,cv=2,duration=120,seed=1"
BURSTY_TRACE = "step:rate=80/200/80,cv=2,every=20,seed=2"
BATCH_SIZES = (1, 2, 4, 8, 16, 32)


def run_live_demo(out_dir: Path, console: Console) -> int:
    if not EXAMPLES.is_dir():
        raise InferlineError(f"the bundled examples are not at {EXAMPLES}", "run the demo from a source checkout")
    make_dir(out_dir, "the demo's output folder")
    spec = load_spec(EXAMPLES / "pipelines" / f"{PIPELINE}.yaml")
    repository = EXAMPLES / "models"
    catalog_path = EXAMPLES / "catalog-local.yaml"
    models = sorted({s.model for s in spec.stages})

    console.rule(f"1/4 profile {models} on a real Triton server")
    profiles_dir = out_dir / "profiles"
    with embedded_server("triton", repository, models) as handle:
        console.print(f"Triton ready in {handle.startup_s:.2f} s")
        adapter = connect("triton", handle.address, **handle.options)
        try:
            settings = ProfileSettings(BATCH_SIZES, warmup=3, samples=10, budget_s=5.0)
            cpu = group_clock(handle.pid)
            for written in profile_to_directory(adapter, models, "cpu", settings, profiles_dir, server_cpu=cpu):
                console.print(f"profiled {written.model} in {written.wall_s:.1f} s -> {written.path}")
        finally:
            adapter.close()

    console.rule("2/4 plan")
    profiles = load_profiles(profiles_dir)
    catalog = load_catalog(catalog_path)
    assert spec.slo_ms is not None
    plan = make_plan(spec, profiles, catalog, load_trace(SAMPLE_TRACE), spec.slo_ms, ladder=True)
    if not plan.feasible:
        raise InferlineError(f"the demo pipeline is infeasible on this machine: {plan.reason}")
    plan = plan.model_copy(
        update={"profiles": str(profiles_dir), "hardware_catalog": str(catalog_path), "spec": str(spec_path(spec))}
    )
    (out_dir / "plan.json").write_text(plan.to_json() + "\n")
    console.print(
        f"plan: {', '.join(f'{n} b{s.max_batch_size}×{s.replicas}' for n, s in plan.stages.items())}, "
        f"${plan.cost_per_hour:.4f}/h, estimated P99 {plan.estimated_p99_ms:.1f} ms (SLO {plan.slo_ms:g} ms)"
    )

    arrivals = load_trace(BURSTY_TRACE)
    # The static plan's estimate for the plots, as the run's own is made: every replica on this machine.
    estimated = predicted_latencies_ms(spec, profiles, catalog, plan, arrivals, cores=float(available_cores()))
    runs: dict[str, dict[str, Any]] = {}
    raw: dict[str, ReplayResult] = {}
    for tuner in ("inferline", "none"):
        console.rule(f"3/4 deploy and replay {BURSTY_TRACE} with tuner {tuner!r}")
        metrics_out = out_dir / f"router-metrics-{tuner}.txt"
        runs[tuner], raw[tuner] = deploy_and_replay(spec, plan, repository, tuner, arrivals, console, metrics_out)

    console.rule("4/4 report")
    # What provisioning for the burst up front would cost: the bar the tuner's cost is held to.
    peak = make_plan(spec, profiles, catalog, arrivals, spec.slo_ms)
    report = {"plan": json.loads(plan.to_json()), "trace": BURSTY_TRACE, "runs": runs,
              "peak_plan_cost_per_hour": peak.cost_per_hour}  # fmt: skip
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    console.print(_summary(plan, runs))
    if peak.cost_per_hour is not None:
        console.print(
            f"a static plan made for the whole bursty trace (its peak included) costs ${peak.cost_per_hour:.4f}/h"
        )
    try:
        from inferline.live_plots import plot_live

        added = runs["none"].get("estimated_outside_added_ms") or 0.0  # as the static run's estimate
        plot_live(raw, estimated + added, runs, plan, out_dir / "report.png")
        console.print(f"report: {out_dir / 'report.json'}, plots: {out_dir / 'report.png'}")
    except InferlineError as exc:  # no matplotlib: the report still stands
        console.print(f"report: {out_dir / 'report.json'} (no plots: {exc.one_line()})")
    console.print(
        f"router metrics of each run: {out_dir}/router-metrics-*.txt (`inferline calibrate "
        f"{out_dir / 'plan.json'} --metrics FILE --out DIR` rewrites the profiles from them)"
    )
    return 0


def spec_path(spec: Any) -> Path:
    return EXAMPLES / "pipelines" / f"{spec.name}.yaml"


def deploy_and_replay(
    spec: Any,
    plan: Plan,
    repository: Path,
    tuner: str,
    arrivals: NDArray[np.float64],
    console: Console,
    metrics_out: Path | None = None,
) -> tuple[dict[str, Any], ReplayResult]:
    """Deploy, replay, stop. `metrics_out` keeps the router's Prometheus text of the run, for
    `inferline calibrate` to read after the deployment is gone."""
    deployment = LocalDeployment(spec, plan, repository).start()
    live: LiveTuner | None = None
    try:
        assert deployment.router is not None and deployment.endpoints is not None
        policy = make_policy(tuner, plan.tuner)
        if policy is not None:
            live = LiveTuner(deployment.router, deployment, policy, plan, tick_s=1.0).start()
        inputs = deployment.router.input_specs()
        cores = float(available_cores())  # every replica runs on this machine
        target = load_generator_target(deployment.endpoints, spec.name, plan, spec, tuner, cores)
        freeze_long_lived()  # the router runs in this process: no collector pause mid-replay
        before = generate_latest(deployment.router.metrics_registry).decode()
        started = time.time()
        answered: list[tuple[str, ...] | None] = [None] * arrivals.size
        replaying = replay_against(target, arrivals, plan.slo_ms, inputs, 30.0, 0, progress_printer(console), answered)
        result = asyncio.run(replaying)
        after = generate_latest(deployment.router.metrics_registry).decode()
        measured = live_stages(after, since=before)
        stolen = stolen_share(after, since=before)
        if metrics_out is not None:
            metrics_out.write_text(after)
    finally:
        if live is not None:
            live.stop()
        deployment.stop()
    decisions = [d.as_json() for d in (live.decisions if live is not None else [])]
    # The router runs in this process, beside the load generator: their CPU cannot be told apart, so
    # the estimate counts neither (calibration puts the router's into the service times).
    results = results_for(target, result, arrivals, started, decisions, live=measured, answered=answered)
    results["tuner"] = tuner
    results["machine_stolen"] = round(stolen, 4) if stolen is not None else None
    results["batch_sizes"] = deployment.router.batch_sizes() if deployment.router else {}
    results["service_ms"] = deployment.router.service_times_ms() if deployment.router else {}
    dispatch = deployment.router.dispatch_ms() if deployment.router else {}
    results["router_ms_per_batch"] = {s: round(ms, 3) for s, ms in dispatch.items() if not math.isnan(ms)}
    return results, result


def load_generator_target(
    endpoints: Endpoints, name: str, plan: Plan, spec: PipelineSpec, tuner: str, cores: float
) -> Target:
    """The demo's load generator calls the router over HTTP, not gRPC: both run in this process, and
    grpc.aio delivers a call's events through whichever of the process's event loops wakes first.
    After a Ctrl-C the replay's loop closes with calls still cancelled in flight, and the gRPC
    frontend's loop then hands their late events to the closed loop, printing a traceback per call.
    HTTP is also the cheaper client (less CPU taken from the replicas beside it)."""
    return Target(endpoints.http, name, plan, spec, None, tuner, protocol="http", cores=cores)


def _summary(plan: Plan, runs: dict[str, dict[str, Any]]) -> Table:
    def percent(rate: Any) -> str:
        return f"{100 * rate:.2f}%" if rate is not None else "-"

    table = Table(title=f"{plan.pipeline}: live replay of {BURSTY_TRACE}, SLO {plan.slo_ms:g} ms (times in ms)")
    # Short headers: the table fits an 80-column terminal.
    columns = ("run", "est P99", "P99", "est miss", "miss", "errors", "$/hour", "changes")
    for column in columns:
        table.add_column(column, justify="right")
    estimates, from_run, slowed = [], [], []
    for name, r in runs.items():
        label = "tuner" if name == "inferline" else "static"
        table.add_row(
            label,
            f"{r['estimated_p99_ms']:.1f}" if r.get("estimated_p99_ms") is not None else "-",
            f"{r['p99_ms']:.1f}" if r.get("p99_ms") is not None else "inf (>1% errors)",
            percent(r.get("estimated_slo_miss_rate")),
            percent(r.get("slo_miss_rate")),
            str(r["errors"]),
            f"{r['cost_per_hour']:.4f}" if r.get("cost_per_hour") is not None else "-",
            str(len(r["decisions"])),
        )
        if r.get("estimate"):
            estimates.append(f"{label}: {r['estimate']}")
        if r.get("estimated_from_run_p99_ms") is not None:
            from_run.append(f"{label} {r['estimated_from_run_p99_ms']:.1f} ms")
        said = hypervisor_took(r.get("machine_stolen"), f"during the {label} run")
        if said is not None:
            slowed.append(f"{said}: the latency measured then is not the pipeline's alone")
    lines = []
    if estimates:
        lines.append("estimates: " + "; ".join(estimates) + "; changes: the tuner's decisions")
    if from_run:
        lines.append("est P99 again from each run's own service times: " + ", ".join(from_run))
    lines += slowed
    table.caption = "\n".join(lines) if lines else None
    return table
