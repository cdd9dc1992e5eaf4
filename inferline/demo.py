"""`inferline demo`: the main job on the bundled example, with no model server needed.

Plan the video-monitoring pipeline for a bursty sample trace (InferLine and the coarse-grained
baselines), then simulate a burstier trace (a rate step with CV 4) with the envelope tuner, the
static plan and the three autoscaling baselines, and print one table next to each other.
Writes `results.json` and `run.png` into the output directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console

from inferline.catalog import load_catalog
from inferline.errors import InferlineError
from inferline.output_paths import make_dir
from inferline.planner.closedloop import simulate_run
from inferline.planner.costtable import build_cost_table
from inferline.planner.pipeline import pipeline_model
from inferline.planner.planning import make_plan, plan_config
from inferline.planner.tuning.registry import make_policy
from inferline.plots import plot_run
from inferline.profiles import load_profiles
from inferline.runs import run_results
from inferline.spec import load_spec
from inferline.tables import plan_table, runs_table
from inferline.traces import load_trace

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PIPELINE = "video-monitoring"
SAMPLE_TRACE = "gamma:rate=150,cv=4,duration=300,seed=1"
LIVE_TRACE = "step:rate=150/250/150,cv=4,every=60,seed=2"


def run_demo(out_dir: Path, console: Console) -> int:
    if not EXAMPLES.is_dir():
        raise InferlineError(f"the bundled examples are not at {EXAMPLES}", "run the demo from a source checkout")
    make_dir(out_dir, "the demo's output folder")
    spec = load_spec(EXAMPLES / "pipelines" / f"{PIPELINE}.yaml")
    profiles = load_profiles(EXAMPLES / "profiles" / "representative")
    catalog = load_catalog(EXAMPLES / "catalog.yaml")
    assert spec.slo_ms is not None
    model = pipeline_model(spec)
    table = build_cost_table(model, profiles, catalog)
    sample = load_trace(SAMPLE_TRACE)
    live = load_trace(LIVE_TRACE)
    rows: list[tuple[str, dict[str, Any]]] = []
    report: dict[str, Any] = {"pipeline": spec.name, "sample_trace": SAMPLE_TRACE, "live_trace": LIVE_TRACE}
    with console.status("planning ...") as status:
        plans = {}
        for strategy in ("inferline", "cg-mean", "cg-peak"):
            status.update(f"planning {spec.name} with {strategy} for a P99 SLO of {spec.slo_ms:g} ms ...")
            plans[strategy] = make_plan(spec, profiles, catalog, sample, spec.slo_ms, strategy)
        report["plans"] = {k: json.loads(v.to_json()) for k, v in plans.items()}
        runs = [("inferline", t) for t in ("inferline", "none", "autoscale", "ray", "kpa")]
        runs += [("cg-mean", "none"), ("cg-peak", "none")]
        for strategy, tuner in runs:
            plan = plans[strategy]
            if plan.stages == {}:
                continue
            status.update(f"simulating plan {strategy} with tuner {tuner} over {LIVE_TRACE} ...")
            result = simulate_run(
                model,
                table,
                plan_config(model, table, plan),
                live,
                spec.slo_ms / 1000.0,
                make_policy(tuner, plan.tuner),
            )
            name = f"{strategy} plan + {tuner} tuner" if tuner != "none" else f"{strategy} plan, static"
            rows.append((name, run_results(result, tuner)))
            if strategy == "inferline" and tuner == "inferline":
                plot_run(result, out_dir / "run.png", f"{spec.name} · InferLine plan + envelope tuner")
    console.print(plan_table(plans["inferline"]))
    console.print(runs_table(f"{spec.name} under {LIVE_TRACE} (SLO {spec.slo_ms:g} ms)", rows))
    report["runs"] = dict(rows)
    (out_dir / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"report: {out_dir / 'results.json'}, plot: {out_dir / 'run.png'}")
    return 0
