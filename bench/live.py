"""Live benchmarks on real Triton processes (`make bench-live`, a few minutes on 2 cores).

1. Estimator fidelity: profile each local example pipeline's models on this machine now, deploy
   its plan (static), replay a stationary trace open-loop, and compare measured with estimated P99
   (target: within 10% of measured); then calibrate the profiles from those runs' router metrics,
   plan and replay again.
2. Router overhead: the same queries at 250 and 500 q/s through the router's endpoint (gRPC, then HTTP), and straight
   to the same Triton server batched by the same dispatch core in the client's process; the
   difference of medians, with each path's mean batch sizes and the router process's CPU per query;
   apart from it, what the hop itself takes (the client's mean latency minus the router's own mean,
   submit to answer), how much longer replica calls take in the router's process than in the direct
   path's, and how busy the whole machine was on each path.
3. Tuner live: a rate step replayed with the live tuner and with the static plan; the tuner's
   miss rate should be lower, at a cost no higher than a static plan for the peak rate.
Prints a table per part and writes bench/results/live.json.
"""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

from inferline.adapters.registry import connect, embedded_server
from inferline.agent.lineage import measure_lineage
from inferline.calibration import STOLEN_WARN, live_stages, read_metrics
from inferline.catalog import load_catalog
from inferline.deployment import core_shortfall
from inferline.heap import freeze_long_lived
from inferline.live_demo import deploy_and_replay
from inferline.planner.planning import make_plan
from inferline.process_cpu import available_cores, process_cpu_s
from inferline.profiles import load_profiles
from inferline.replay_command import FIDELITY_TOLERANCE, METRICS_AFTER, METRICS_BEFORE
from inferline.router.client import AsyncKServeClient
from inferline.router.core import PipelineRouter, Replica
from inferline.router.event_loop import LoopThread
from inferline.router.http_client import AsyncKServeHttpClient
from inferline.router.prediction import predicted_p99_ms
from inferline.router.replay import replay
from inferline.spec import load_spec, with_probabilities, write_spec
from inferline.traces import load_trace

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
OUT = ROOT / "bench" / "results"
PROFILES = EXAMPLES / "profiles" / "measured-cpu"
CATALOG = EXAMPLES / "catalog-local.yaml"
FIDELITY = {
    "local-emulated": "gamma:rate=100,cv=2,duration=45,seed=5",
    "local-cascade": "gamma:rate=60,cv=2,duration=45,seed=6",
}
STEP = "step:rate=80/200/80,cv=2,every=20,seed=2"
LINEAGE_SAMPLES = 300
FIDELITY_REPEATS = 3
"""Replays per plan and profiles (the first also calibrates): figures are reported one by one."""
OVERHEAD_RATES, OVERHEAD_S, OVERHEAD_ROUNDS = (250, 500), 5, 8
CLIENTS = {"http": AsyncKServeHttpClient, "grpc": AsyncKServeClient}


def _plan(
    name: str,
    trace: str,
    slo_ms: float | None = None,
    measure_routes: bool = False,
    ladder: bool = False,
    profiles: Path = PROFILES,
    spec: Any = None,
) -> Any:
    spec = spec or load_spec(EXAMPLES / "pipelines" / f"{name}.yaml")
    if measure_routes and any(s.route for s in spec.stages):
        spec = _with_measured_routes(spec)
    plan = make_plan(
        spec, load_profiles(profiles), load_catalog(CATALOG), load_trace(trace), slo_ms or spec.slo_ms, ladder=ladder
    )
    extra = {
        "profiles": str(profiles),
        "hardware_catalog": str(CATALOG),
        "spec": str(EXAMPLES / "pipelines" / f"{name}.yaml"),
    }
    return spec, plan.model_copy(update=extra)


def _with_measured_routes(spec: Any) -> Any:
    """The spec with routed edges' probabilities measured on the replay's kind of inputs (lineage),
    as a user would run `inferline lineage` before planning: a route's rate depends on the data."""
    models = sorted({s.model for s in spec.stages})
    with embedded_server("triton", EXAMPLES / "models", models) as handle:
        adapter = connect("triton", handle.address, **handle.options)
        try:
            measures = measure_lineage(spec, adapter, samples=LINEAGE_SAMPLES)
        finally:
            adapter.close()
    return with_probabilities(spec, {m.stage: m.measured for m in measures if m.routed})


def fidelity(console: Console) -> list[dict[str, Any]]:
    """Each pipeline as users run it: `inferline profile` (on this machine, now), `inferline up` (the
    router in its own process) and `inferline replay` (the load generator in another), twice: planned
    from those offline profiles, then, after `inferline calibrate` rewrote them from the router's
    metrics of all those replays where the hypervisor took under 2% of the CPU during each, else of
    the quietest (as the calibrate command advises; `_calibration_window`), planned and replayed
    again with the calibrated profiles. Where the calibrated plan is the same plan,
    the second replays run at once on the same deployment, as a user would replay after
    recalibrating; a second deployment would put a minute of the machine's drift between the
    calibration and the replay."""
    rows = []
    cli = [sys.executable, "-m", "inferline.cli"]
    for name, trace in FIDELITY.items():
        with tempfile.TemporaryDirectory() as tmp:
            measured_now = _profile_now(name, Path(tmp) / "profiles")
            ratios = _batch_one_ratios(measured_now)
            console.print(f"fidelity {name}, profiled now on this machine: {_against_committed(ratios)}")
            spec, plan = _plan(name, trace, measure_routes=True, profiles=measured_now)
            spec_path = Path(tmp) / "spec.yaml"
            write_spec(spec, spec_path)
            first = plan.model_copy(update={"spec": str(spec_path)})
            state = _up(first, Path(tmp) / "deployed")
            try:
                offline = _replays(first, trace, state, Path(tmp) / "offline", console, f"{name}, offline profiles")
                first_source, source = _calibration_window(offline)
                calibrated_dir = Path(tmp) / "calibrated"
                calibrate = [*cli, "calibrate", source["plan_path"], "--metrics", source["metrics_path"]]
                calibrate += ["--since", first_source["metrics_before_path"]]  # those replays' calls only
                calibrate += ["--cores", str(available_cores())]  # the run's replicas shared this machine
                calibrate += ["--out", str(calibrated_dir)]
                subprocess.run(calibrate, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
                _, replanned = _plan(name, trace, profiles=calibrated_dir, spec=spec)
                second = replanned.model_copy(update={"spec": str(spec_path)})
                redeployed = second.stages != first.stages
                if redeployed:
                    _down(state)
                    state = _up(second, Path(tmp) / "redeployed")
                where = "redeployed" if redeployed else "the same plan, replayed again at once on its deployment"
                calibrated = _replays(second, trace, state, Path(tmp) / "cal", console, f"{name}, calibrated ({where})")
            finally:
                _down(state)
        rows.append({
            "pipeline": name, "trace": trace, "profiled_now_vs_committed": ratios,
            "probabilities": {s.name: s.probability for s in spec.stages if s.after},
            "offline": _public(offline[0]), "calibrated": _public(calibrated[0]) | {"redeployed": redeployed},
            "calibrated_from_replays": [offline.index(first_source) + 1, offline.index(source) + 1],
            "offline_again": [_brief(r) for r in offline[1:]], "calibrated_again": [_brief(r) for r in calibrated[1:]],
        })  # fmt: skip
    return rows


def _profile_now(name: str, out: Path) -> Path:
    """`inferline profile` the pipeline's models on this machine now, as a user would before planning:
    this VM's speed differs from day to day (the large model took 6.3 ms a call alone in one day's
    profiles, 8.5 ms on a later day's VM), and profiles from another day make the estimate miss by that."""
    models = sorted({s.model for s in load_spec(EXAMPLES / "pipelines" / f"{name}.yaml").stages})
    profile = [sys.executable, "-m", "inferline.cli", "profile", "--embedded", str(EXAMPLES / "models")]
    profile += ["--models", ",".join(models), "--hardware", "cpu", "--out", str(out)]
    subprocess.run(profile, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return out


def _batch_one_ratios(profiles_dir: Path) -> dict[str, float]:
    """Per model, its mean call time at batch 1 profiled now over the committed profile's."""
    now, committed = load_profiles(profiles_dir), load_profiles(PROFILES)
    return {
        model: round(p.points("cpu")[0].latency_ms.mean / committed[model].points("cpu")[0].latency_ms.mean, 3)
        for model, p in now.items()
        if model in committed
    }


def _against_committed(ratios: dict[str, float]) -> str:
    return (
        "batch-1 calls take "
        + ", ".join(f"{model} x{ratio:.2f}" for model, ratio in ratios.items())
        + " as long as in the committed profiles (examples/profiles/measured-cpu)"
    )


def _calibration_window(runs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The first and last replay whose router metrics to calibrate from: all of them where the
    hypervisor took under `STOLEN_WARN` during each (their calls pooled: a replay's speed drifts from
    the next one's on this VM, and three replays' calls average more of it), else the quietest alone."""
    stolen = [r["machine_stolen"] if r["machine_stolen"] is not None else 1.0 for r in runs]
    if max(stolen) < STOLEN_WARN:
        return runs[0], runs[-1]
    quietest = runs[stolen.index(min(stolen))]
    return quietest, quietest


def _replays(plan: Any, trace: str, state: Path, where: Path, console: Console, what: str) -> list[dict[str, Any]]:
    """`FIDELITY_REPEATS` replays of the same plan on the same deployment: one replay's P99 rests on
    its few worst queries, in one or two bursts, and this VM's speed drifts between runs."""
    runs = []
    for i in range(FIDELITY_REPEATS):
        runs.append(_fidelity_run(plan, trace, state, where / str(i)))
        console.print(f"fidelity {what}, replay {i + 1}: {_fmt_fidelity(runs[-1])}")
    return runs


def _brief(run: dict[str, Any]) -> dict[str, Any]:
    keep = (
        "estimated_p99_ms", "measured_p99_ms", "error", "cpu_ms_per_query", "machine_stolen", "interference",
        "estimate_sensitivity",
    )  # fmt: skip
    return {k: run[k] for k in keep}


def _up(plan: Any, where: Path) -> Path:
    """`inferline up` the plan (static); its state dir."""
    where.mkdir(parents=True)
    plan_path = where / "plan.json"
    plan_path.write_text(plan.to_json())
    state = where / "state"
    up = [sys.executable, "-m", "inferline.cli", "up", str(plan_path), "--state-dir", str(state), "--tuner", "none"]
    if subprocess.run(up, cwd=ROOT, stdout=subprocess.DEVNULL).returncode != 0:
        raise RuntimeError("inferline up failed")
    return state


def _down(state: Path) -> None:
    down = [sys.executable, "-m", "inferline.cli", "down", "--state-dir", str(state)]
    subprocess.run(down, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _fidelity_run(plan: Any, trace: str, state: Path, where: Path) -> dict[str, Any]:
    """`replay` the trace against the deployment in `state` with `plan` (its estimate), and keep
    what the router measured during the replay."""
    where.mkdir(parents=True)
    plan_path = where / "plan.json"
    plan_path.write_text(plan.to_json())
    replayed = subprocess.run(
        [sys.executable, "-m", "inferline.cli", "replay", "--state-dir", str(state), "--plan", str(plan_path),
         "--trace", trace, "--json", "--metrics-out", str(where)],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    result = json.loads(replayed.stdout)
    # The router's metrics around the replay, for `inferline calibrate --since`: this replay's calls only.
    metrics_before_path, metrics_path = where / METRICS_BEFORE, where / METRICS_AFTER
    before, after = metrics_before_path.read_text(), metrics_path.read_text()
    est, meas = result["estimated_p99_ms"], result["p99_ms"]
    # The replay's estimate again from this run's own service times: how far the estimator's
    # semantics are from the router's, apart from how far the machine's speed drifted from the profiles.
    spec = load_spec(plan.spec)
    live = live_stages(after, since=before)
    with_own = result["estimated_from_run_p99_ms"]
    # The estimate as planned: every replica on its own core.
    own_cores = predicted_p99_ms(spec, load_profiles(plan.profiles), load_catalog(CATALOG), plan, load_trace(trace))
    return {
        "plan": {n: s.model_dump() for n, s in plan.stages.items()}, "cost_per_hour": plan.cost_per_hour,
        "estimated_p99_ms": est, "measured_p99_ms": meas,
        "error": abs(est - meas) / meas if est and meas else None, "estimate": result["estimate"],
        "cpu_ms_per_query": result.get("cpu_ms_per_query"),
        "estimated_own_cores_p99_ms": round(own_cores, 3), "error_own_cores": abs(own_cores - meas) / meas,
        "estimated_with_own_live_p99_ms": with_own,
        "error_with_own_live": abs(with_own - meas) / meas if with_own and meas else None,
        "errors": result["errors"], "mean_batch": _mean_batch_of(live), "core_warning": core_shortfall(plan),
        "machine_stolen": result.get("machine_stolen"), "interference": result.get("interference"),
        "estimate_sensitivity": result.get("estimate_sensitivity"),
        "outside_stages_ms": result.get("outside_stages_ms"),
        "estimated_outside_added_ms": result.get("estimated_outside_added_ms"),
        "service_ms": _service_vs_profile(spec, plan, _router_call_ms(live)),
        "router_ms_per_batch": {s: round(v.dispatch_ms, 3) for s, v in live.items()},
        "plan_path": str(plan_path), "metrics_path": str(metrics_path), "metrics_before_path": str(metrics_before_path),
    }  # fmt: skip


def _mean_batch_of(live: dict[str, Any]) -> dict[str, float]:
    """Mean batch size per stage from a router's parsed metrics (`live_stages`)."""
    out = {}
    for stage, measured in live.items():
        calls = measured.call_count
        if calls:
            out[stage] = round(sum(n * c for n, (_, c) in measured.calls.items()) / calls, 3)
    return out


def _public(run: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in run.items() if not k.endswith("_path")}


def _fmt_fidelity(run: dict[str, Any]) -> str:
    return (
        f"estimated {run['estimated_p99_ms']} ms, measured {run['measured_p99_ms']} ms "
        f"({100 * (run['error'] or 0):.1f}%), ${run['cost_per_hour']:.4f}/h; "
        f"with a core per replica {run['estimated_own_cores_p99_ms']} ms ({100 * run['error_own_cores']:.1f}%)"
        + (
            f"; estimated with the run's own live service times {run['estimated_with_own_live_p99_ms']} ms "
            f"({100 * run['error_with_own_live']:.1f}%)"
            if run["error_with_own_live"] is not None
            else "; no estimate from the run's own service times"
        )
        + (
            f"; {run['outside_stages_ms']:.2f} ms per query outside the stages, "
            f"{run['estimated_outside_added_ms']:.2f} ms of it added to the estimates"
            if run.get("outside_stages_ms") is not None and run.get("estimated_outside_added_ms") is not None
            else ""
        )
        + (
            " (interference per core's worth of calls beside: "
            + ", ".join(f"{m} +{f['interference']:.0%}" for m, f in run["interference"].items())
            + ")"
            if run.get("interference")
            else ""
        )
        + (
            f"; the hypervisor took {run['machine_stolen']:.1%} of the CPU"
            if run.get("machine_stolen") is not None
            else ""
        )
        + (f"; warning: {run['core_warning']}" if run["core_warning"] else "")
    )


def _drift_line(runs: list[dict[str, Any]]) -> str:
    """How much the estimate moves with the servers' speed, beside how much the machine's speed moved
    between the replays: the load generator's CPU per query is the same work in each."""
    elastic = [r["estimate_sensitivity"]["elasticity"] for r in runs if r.get("estimate_sensitivity")]
    readings = [(r.get("cpu_ms_per_query") or {}).get("load generator") for r in runs]
    probe = [ms for ms in readings if ms]
    parts = []
    if elastic:
        parts.append("each 1% slower servers add " + "/".join(f"{e:.1f}" for e in elastic) + "% to the estimate")
    if probe:
        parts.append(
            "the load generator's CPU per query (the same work each replay) "
            + ", ".join(f"{ms:.3f}" for ms in probe)
            + f" ms ({max(probe) / min(probe) - 1.0:+.1%} from the fastest to the slowest)"
        )
    return "; ".join(parts) or "no sensitivity or speed measured"


def _router_call_ms(live: dict[str, Any]) -> dict[str, dict[int, float]]:
    """Mean replica call time per stage and batch size, from a router's parsed metrics (`live_stages`)."""
    return {stage: {n: ms for n, (ms, _) in measured.calls.items()} for stage, measured in live.items()}


def _service_vs_profile(spec: Any, plan: Any, live_ms: dict[str, dict[int, float]]) -> dict[str, Any]:
    """Per stage: the router's mean call time at each batch size it sent beside the plan's profile."""
    profiles = load_profiles(plan.profiles)
    out: dict[str, Any] = {}
    for stage, by_size in live_ms.items():
        stage_plan = plan.stage(stage)
        table = profiles[spec.stage(stage).model].service_times_ms(stage_plan.hardware, stage_plan.max_batch_size)
        out[stage] = {n: {"live": round(ms, 2), "profile": round(float(table[n]), 2)} for n, ms in by_size.items()}
    return out


def router_overhead(console: Console) -> list[dict[str, Any]]:
    return [router_overhead_at(rate) for rate in OVERHEAD_RATES]


def router_overhead_at(rate: int) -> dict[str, Any]:
    """What the router's endpoint adds per query, with the plan's batching on both paths.

    Routed: a client calls the pipeline endpoint of `inferline up` (the router in its own
    process, as deployed), over gRPC and over HTTP. Direct: the same queries go straight to the
    same Triton server, batched the same way: the client runs the router's dispatch core
    (per-stage FIFO queues, greedy batching up to the planned max batch, one worker per replica)
    in its own process, its replicas on the load generator's own loop, with no endpoint in between.
    So both paths send batches formed by the same rule and the difference of medians is the
    endpoint hop: protocol, process boundary, hand-offs.
    The three paths take turns for OVERHEAD_ROUNDS short rounds, so a drift of the machine's speed
    (large on this VM: two direct rounds a minute apart differed by 4.6 ms) hits them alike; each
    path's figure is the median of its rounds' medians, and the overhead is also taken round by
    round (a protocol's median minus the direct median of the same round) and its median reported.
    """
    spec, plan = _plan("local-emulated", f"gamma:rate={rate},cv=1,duration=30,seed=9")
    arrivals = load_trace(f"gamma:rate={rate},cv=1,duration={OVERHEAD_S},seed=9")
    x = np.random.default_rng(0).random((1, 16)).astype(np.float32)
    medians: dict[str, list[float]] = {"direct": [], "grpc": [], "http": []}
    cpu: dict[str, float] = {"grpc": 0.0, "http": 0.0}
    busy: dict[str, list[float]] = {"direct": [], "grpc": [], "http": []}
    hop: dict[str, list[float]] = {"grpc": [], "http": []}
    paired: dict[str, list[float]] = {"grpc": [], "http": []}
    client_cpu: dict[str, float] = {"direct": 0.0, "grpc": 0.0, "http": 0.0}
    lag: dict[str, list[float]] = {"direct": [], "grpc": [], "http": []}
    from_send: dict[str, list[float]] = {"direct": [], "grpc": [], "http": []}
    with tempfile.TemporaryDirectory() as tmp:
        plan_path = Path(tmp) / "plan.json"
        plan_path.write_text(plan.to_json())
        state = Path(tmp) / "state"
        cli = [sys.executable, "-m", "inferline.cli"]
        up = subprocess.run([*cli, "up", str(plan_path), "--state-dir", str(state), "--tuner", "none"], cwd=ROOT)
        if up.returncode != 0:
            raise RuntimeError("inferline up failed")
        try:
            info = json.loads((state / "up.json").read_text())
            server = info["server_address"], info["server_options"]  # as the router's replicas connect
            pools = {
                s.name: [Replica(connect("triton", server[0], **server[1]), s.model, f"{s.name}-{i}")
                         for i in range(plan.stage(s.name).replicas)]
                for s in spec.stages
            }  # fmt: skip
            batches = {name: s.max_batch_size for name, s in plan.stages.items()}
            # The direct path's load generator and the core's replicas share one loop (asyncio's, as the
            # replay tool's everywhere): no thread between them.
            direct_loop = LoopThread("bench-direct", asyncio.new_event_loop)
            core = PipelineRouter(spec, pools, batches, plan.slo_ms).start(direct_loop.loop)
            freeze_long_lived()  # as `inferline up` and `replay` do: no collector pause in either path

            def direct() -> Any:
                async def send(i: int) -> None:
                    await _answered_on_this_loop(core.submit({"INPUT": x}))

                return direct_loop.call(replay(send, arrivals, None, timeout_s=10.0), timeout_s=OVERHEAD_S + 60.0)

            async def routed(client: Any) -> Any:
                async def send(i: int) -> None:
                    await client.infer(spec.name, {"INPUT": x})

                try:
                    return await replay(send, arrivals, None, timeout_s=10.0)
                finally:
                    await client.close()

            try:
                for round_ in range(OVERHEAD_ROUNDS):
                    # Every other round in reverse order, so a steady drift of the machine's speed
                    # favours neither path.
                    paths = ("direct", "http", "grpc") if round_ % 2 == 0 else ("grpc", "http", "direct")
                    for path in paths:
                        if path == "direct":
                            before = _Meters.read(None)
                            result = direct()
                            spent = _Meters.read(None).since(before)
                            medians["direct"].append(float(np.nanmedian(result.latencies_ms)))
                            _record_lag(result, lag["direct"], from_send["direct"])
                            busy["direct"].append(spent.machine_busy)
                            client_cpu["direct"] += spent.client_cpu_s
                            continue
                        before = _Meters.read(info)
                        result = asyncio.run(routed(CLIENTS[path](info["endpoints"][path])))
                        spent = _Meters.read(info).since(before)
                        medians[path].append(float(np.nanmedian(result.latencies_ms)))
                        _record_lag(result, lag[path], from_send[path])
                        busy[path].append(spent.machine_busy)
                        client_cpu[path] += spent.client_cpu_s
                        cpu[path] += spent.router_cpu_s
                        hop[path].append(float(np.nanmean(result.latencies_ms)) - spent.router_mean_ms)
                    for protocol in CLIENTS:
                        paired[protocol].append(medians[protocol][-1] - medians["direct"][-1])
                direct_metrics = generate_latest(core.metrics_registry).decode()
            finally:
                core.stop()  # closes the replicas' connections on its loop
                direct_loop.close()
            routed_metrics = read_metrics(info["endpoints"]["metrics"])  # both protocols' runs
        finally:
            subprocess.run([*cli, "down", "--state-dir", str(state)], cwd=ROOT)
    d = float(np.median(medians["direct"]))
    direct_live, routed_live = live_stages(direct_metrics), live_stages(routed_metrics)
    out: dict[str, Any] = {
        "rate_qps": rate, "queries": int(arrivals.size), "rounds": OVERHEAD_ROUNDS,
        "plan": {n: s.model_dump() for n, s in plan.stages.items()},
        "direct_median_ms": d, "direct_round_medians_ms": medians["direct"],
        "direct_send_lag_ms": float(np.median(lag["direct"])),
        "direct_median_from_send_ms": float(np.median(from_send["direct"])),
        "direct_machine_busy": float(np.mean(busy["direct"])),
        # The direct path's process runs the dispatch core and the replica calls too: not a client's CPU.
        "direct_process_cpu_ms_per_query": 1000.0 * client_cpu["direct"] / (arrivals.size * OVERHEAD_ROUNDS),
        "direct_mean_batch": _mean_batch_of(direct_live), "router_mean_batch": _mean_batch_of(routed_live),
        "direct_call_ms": _router_call_ms(direct_live), "router_call_ms": _router_call_ms(routed_live),
    }  # fmt: skip
    for protocol in ("grpc", "http"):
        r = float(np.median(medians[protocol]))
        out[protocol] = {
            "router_median_ms": r, "overhead_median_ms": r - d, "round_medians_ms": medians[protocol],
            "send_lag_ms": float(np.median(lag[protocol])),
            "overhead_from_send_ms": float(np.median(from_send[protocol])) - float(np.median(from_send["direct"])),
            "overhead_paired_ms": float(np.median(paired[protocol])), "overhead_by_round_ms": paired[protocol],
            "router_cpu_ms_per_query": 1000.0 * cpu[protocol] / (arrivals.size * OVERHEAD_ROUNDS),
            "machine_busy": float(np.mean(busy[protocol])),
            "hop_mean_ms": float(np.median(hop[protocol])),  # the median over rounds of each round's mean
            "client_cpu_ms_per_query": 1000.0 * client_cpu[protocol] / (arrivals.size * OVERHEAD_ROUNDS),
        }  # fmt: skip
    return out


def _answered_on_this_loop(future: Future[Any]) -> asyncio.Future[None]:
    """A query's answer for a core whose replicas run on the running loop: they settle it on this
    thread, so no thread-safe wake-up (asyncio.wrap_future's) is needed. Not the frontends'
    `answer_with`: its per-query deadline timer would be a cost of the baseline."""
    loop, thread = asyncio.get_running_loop(), threading.get_ident()
    waiter = loop.create_future()

    def settle_here(done: Future[Any]) -> None:
        if not waiter.done():
            exc = done.exception()
            waiter.set_exception(exc) if exc is not None else waiter.set_result(None)

    def settle(done: Future[Any]) -> None:
        if threading.get_ident() == thread:
            settle_here(done)
        else:  # e.g. failed by `stop` from another thread
            loop.call_soon_threadsafe(settle_here, done)

    future.add_done_callback(settle)
    return waiter


def _record_lag(result: Any, lags: list[float], from_send: list[float]) -> None:
    """The load generator's mean send lag in a round, and the round's median latency counted from the
    actual send rather than the scheduled one (what the path took once the query left)."""
    lag_ms = 1e3 * (result.started_s - result.scheduled_s)
    lags.append(float(np.mean(lag_ms)))
    from_send.append(float(np.nanmedian(result.latencies_ms - lag_ms)))


@dataclass(frozen=True)
class _Meters:
    """Counters read before and after a run; `since` turns two readings into what the run used."""

    machine: tuple[float, float]
    """The machine's (busy, total) CPU ticks (Linux /proc/stat)."""
    client_cpu_s: float
    """This process's CPU seconds."""
    router_cpu_s: float = 0.0
    """The router process's CPU seconds (0 without a router)."""
    router_latency: tuple[float, float] = (0.0, 0.0)
    """The router's own end-to-end latency (submit to answer, inside the router): (sum s, count)."""

    @classmethod
    def read(cls, up: dict[str, Any] | None) -> _Meters:
        # user nice system idle iowait irq softirq steal; guest time is already counted in user and nice
        ticks = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        machine = (sum(ticks) - ticks[3] - ticks[4], sum(ticks))
        if up is None:
            return cls(machine, time.process_time())
        text = read_metrics(up["endpoints"]["metrics"])
        latency = {s.name: s.value for s in _samples(text, "inferline_router_latency_seconds")}
        total = (latency["inferline_router_latency_seconds_sum"], latency["inferline_router_latency_seconds_count"])
        return cls(machine, time.process_time(), process_cpu_s(int(up["pid"])) or 0.0, total)

    def since(self, before: _Meters) -> _Spent:
        ticks = self.machine[1] - before.machine[1]
        answered = self.router_latency[1] - before.router_latency[1]
        return _Spent(
            machine_busy=(self.machine[0] - before.machine[0]) / max(ticks, 1.0),
            client_cpu_s=self.client_cpu_s - before.client_cpu_s,
            router_cpu_s=self.router_cpu_s - before.router_cpu_s,
            router_mean_ms=(
                1000.0 * (self.router_latency[0] - before.router_latency[0]) / answered if answered else math.nan
            ),
        )


@dataclass(frozen=True)
class _Spent:
    machine_busy: float
    """The fraction of all cores busy: how close a path drove the machine to saturation."""
    client_cpu_s: float
    router_cpu_s: float
    router_mean_ms: float


def _samples(text: str, family_name: str) -> list[Any]:
    return [s for f in text_string_to_metric_families(text) if f.name == family_name for s in f.samples]


def tuner_live(console: Console) -> dict[str, Any]:
    """The rate step with the tuner (the plan with its scale ladder, and without: the paper's
    replicas-only rule) and with the static plan, beside static plans made for the peak."""
    sample = "gamma:rate=80,cv=2,duration=120,seed=1"
    spec, laddered = _plan("local-emulated", sample, ladder=True)
    _, plan = _plan("local-emulated", sample)
    _, peak = _plan("local-emulated", "gamma:rate=200,cv=2,duration=120,seed=1")
    cg_peak = make_plan(
        spec, load_profiles(PROFILES), load_catalog(CATALOG), load_trace(sample), plan.slo_ms, "cg-peak"
    )  # fmt: skip
    arrivals = load_trace(STEP)
    models = EXAMPLES / "models"
    runs = {
        "inferline": deploy_and_replay(spec, laddered, models, "inferline", arrivals, console)[0],
        "inferline-replicas-only": deploy_and_replay(spec, plan, models, "inferline", arrivals, console)[0],
        "none": deploy_and_replay(spec, plan, models, "none", arrivals, console)[0],
    }
    keys = ("p99_ms", "slo_miss_rate", "cost_per_hour", "errors", "estimated_p99_ms", "estimated_slo_miss_rate")
    return {
        "trace": STEP,
        "runs": {t: {k: r.get(k) for k in keys} | {"decisions": r["decisions"]} for t, r in runs.items()},
        "ladder": [step.model_dump() for step in laddered.tuner.ladder] if laddered.tuner else [],
        "peak_plan_cost_per_hour": peak.cost_per_hour,
        "cg_peak_cost_per_hour": cg_peak.cost_per_hour,
        "peak_plan": {n: s.model_dump() for n, s in peak.stages.items()},
    }  # fmt: skip


PARTS = {"fidelity": fidelity, "router_overhead": router_overhead, "tuner": tuner_live}


def main() -> None:
    """All parts, or those named on the command line (`python -m bench.live fidelity`); a run of some
    parts keeps the other parts' last results in live.json."""
    asked = sys.argv[1:] or list(PARTS)
    unknown = [p for p in asked if p not in PARTS]
    if unknown:
        sys.exit(f"bench.live: unknown part(s) {unknown}; choose from {list(PARTS)}")
    console = Console()
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "live.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() and len(asked) < len(PARTS) else {}
    walls = results.setdefault("wall_s_by_part", {})
    for part in asked:
        started = time.perf_counter()
        results[part] = PARTS[part](console)
        walls[part] = time.perf_counter() - started
    results.pop("wall_s", None)  # of an older run of every part
    path.write_text(json.dumps(results, indent=2, default=float) + "\n")
    _print(console, results)


def _print(console: Console, results: dict[str, Any]) -> None:
    table = Table(title="estimator fidelity (static plan, stationary trace)")
    for c in ("pipeline", "profiles", "estimated P99 ms", "measured P99 ms", "error", "cost $/h", "live / profiled"):
        table.add_column(c, justify="right")
    for row in results.get("fidelity", []):
        for kind in ("offline", "calibrated"):
            run = row[kind]
            table.add_row(
                row["pipeline"],
                kind,
                f"{run['estimated_p99_ms']:.1f}",
                f"{run['measured_p99_ms']:.1f}",
                f"{100 * run['error']:.1f}%",
                f"{run['cost_per_hour']:.4f}",
                ", ".join(f"{stage} {_inflation(sizes):+.0%}" for stage, sizes in run["service_ms"].items()),
            )
    console.print(table)
    every: list[dict[str, Any]] = []
    for row in results.get("fidelity", []):
        for kind in ("offline", "calibrated"):
            runs = [row[kind], *row.get(f"{kind}_again", [])]
            every += runs
            first, last = row.get("calibrated_from_replays", [row.get("calibrated_from_replay", 1)] * 2)
            replays = f"replay {first}" if first == last else f"replays {first}-{last}"
            source = f" (from offline {replays})" if kind == "calibrated" else ""
            console.print(
                f"{row['pipeline']} {kind}{source}, estimate − measured over measured in {len(runs)} replays: "
                + ", ".join(_signed_error(r) for r in runs)
            )
            console.print(f"  {_drift_line(runs)}")
    if every:
        quiet = [r for r in every if r.get("machine_stolen") is not None and r["machine_stolen"] < STOLEN_WARN]
        console.print(
            f"within {FIDELITY_TOLERANCE:.0%}: {_within(every)} of {len(every)} replays; of the {len(quiet)} "
            f"during which the hypervisor took under {STOLEN_WARN:.0%} of the CPU, {_within(quiet)}"
        )
    for o in results.get("router_overhead", []):
        console.print(
            f"router overhead at {o['rate_qps']} q/s (median of {o['rounds']} rounds): direct "
            f"{o['direct_median_ms']:.2f} ms (its rounds {min(o['direct_round_medians_ms']):.2f}–"
            f"{max(o['direct_round_medians_ms']):.2f}), machine {o['direct_machine_busy']:.0%} busy, mean batches "
            f"{_fmt_batches(o['direct_mean_batch'])} (router: {_fmt_batches(o['router_mean_batch'])}); replica "
            f"calls {_call_difference(o):+.2f} ms longer in the router than direct"
        )
        for protocol in ("grpc", "http"):
            p = o[protocol]
            console.print(
                f"  via {protocol}: {p['router_median_ms']:.2f} ms = {p['overhead_median_ms']:+.2f} ms to the median "
                f"({p['overhead_paired_ms']:+.2f} ms round by round, rounds "
                f"{', '.join(f'{x:+.2f}' for x in p['overhead_by_round_ms'])}); "
                f"counted from the actual send {p['overhead_from_send_ms']:+.2f} ms (the load generator's mean send "
                f"lag {p['send_lag_ms']:.2f} ms, direct {o['direct_send_lag_ms']:.2f} ms); "
                f"the hop itself (client mean - router's own mean) {p['hop_mean_ms']:.2f} ms; router CPU "
                f"{p['router_cpu_ms_per_query']:.2f} ms/query; machine {p['machine_busy']:.0%} busy"
            )
    if "tuner" not in results:
        return
    t = results["tuner"]
    for name, r in t["runs"].items():
        console.print(
            f"tuner {name}: P99 {r['p99_ms']} ms, miss {100 * r['slo_miss_rate']:.2f}%, ${r['cost_per_hour']:.4f}/h, "
            f"{len(r['decisions'])} decisions; estimated P99 {r['estimated_p99_ms']} ms"
        )
    console.print(
        f"static InferLine plan for the peak rate: ${t['peak_plan_cost_per_hour']:.4f}/h; "
        f"CG-Peak: ${t['cg_peak_cost_per_hour']:.4f}/h; results: {OUT / 'live.json'}"
    )


def _signed_error(run: dict[str, Any]) -> str:
    estimated, measured = run["estimated_p99_ms"], run["measured_p99_ms"]
    if not estimated or not measured or not math.isfinite(measured):
        return "none"  # no estimate, or more than 1% of queries failed
    stolen = run.get("machine_stolen")
    taken = f" ({stolen:.1%} of the CPU stolen)" if stolen is not None else ""
    return f"{100 * (estimated - measured) / measured:+.1f}%{taken}"


def _within(runs: list[dict[str, Any]]) -> int:
    return sum(1 for r in runs if r.get("error") is not None and r["error"] <= FIDELITY_TOLERANCE)


def _inflation(sizes: dict[int, dict[str, float]]) -> float:
    """How much longer calls took live than profiled, averaged over the batch sizes seen."""
    return float(np.mean([v["live"] / v["profile"] - 1.0 for v in sizes.values()])) if sizes else 0.0


def _call_difference(o: dict[str, Any]) -> float:
    """Mean over stages and batch sizes of (router's call time - direct call time), in ms."""
    direct, routed = o["direct_call_ms"], o["router_call_ms"]
    diffs = [routed[s][n] - ms for s, sizes in direct.items() for n, ms in sizes.items() if n in routed.get(s, {})]
    return float(np.mean(diffs)) if diffs else float("nan")


def _fmt_batches(means: dict[str, float]) -> str:
    return "/".join(f"{m:.1f}" for m in means.values())


if __name__ == "__main__":
    main()
