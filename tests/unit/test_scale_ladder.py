"""The scale ladder: configurations planned ahead for faster traffic, and the tuner switching to them.

On the bundled emulated pipeline (measured profiles) batching is nearly free, so a plan for 2.5x the
rate costs what the plan itself costs: the paper's replicas-only rule pays for three times the
replicas during a burst, the ladder switches batch sizes instead.
"""

from __future__ import annotations

import json

import numpy as np

from inferline.catalog import load_catalog
from inferline.planner.closedloop import simulate_run
from inferline.planner.costtable import build_cost_table, cost_per_hour
from inferline.planner.estimator import Estimator
from inferline.planner.ladder import scale_ladder
from inferline.planner.pipeline import pipeline_model
from inferline.planner.planning import make_plan, plan_config
from inferline.planner.tuning.registry import make_policy
from inferline.profiles import load_profiles
from inferline.spec import load_spec
from inferline.traces import load_trace
from tests.model_repos import EXAMPLES

ROOT = EXAMPLES.parent.parent / "examples"
SPEC = load_spec(ROOT / "pipelines" / "local-emulated.yaml")
PROFILES = load_profiles(ROOT / "profiles" / "measured-cpu")
CATALOG = load_catalog(ROOT / "catalog-local.yaml")
SAMPLE = load_trace("gamma:rate=80,cv=2,duration=120,seed=1")
STEP = load_trace("step:rate=80/200/80,cv=2,every=20,seed=2")
SLO_S = 0.120


def test_every_step_meets_the_slo_at_its_rate_on_the_planned_hardware() -> None:
    model = pipeline_model(SPEC)
    table = build_cost_table(model, PROFILES, CATALOG)
    plan = make_plan(SPEC, PROFILES, CATALOG, SAMPLE, 120.0)
    base = plan_config(model, table, plan)
    steps = scale_ladder(model, table, base, SAMPLE, SLO_S)
    assert [s.rate_multiplier for s in steps] == [1.5, 2.0, 3.0, 4.0]
    for step in steps:
        faster = SAMPLE[0] + (SAMPLE - SAMPLE[0]) / step.rate_multiplier
        assert Estimator(model, table, faster, SLO_S).estimate(step.config).feasible
        assert [c.hardware for c in step.config] == [c.hardware for c in base]
        assert step.cost_per_hour == cost_per_hour(table, step.config)
        # Never dearer than the paper's answer: every stage's replicas scaled in proportion.
        assert step.cost_per_hour <= plan.cost_per_hour * np.ceil(step.rate_multiplier) + 1e-9
    # Batching is nearly free here: some step carries 2x at the plan's cost, on the same replicas with
    # bigger batches (no stage's smaller).
    cheap = [s for s in steps if s.rate_multiplier >= 2.0 and s.cost_per_hour <= plan.cost_per_hour + 1e-9]
    assert cheap
    pairs = list(zip(cheap[0].config, base, strict=True))
    assert all(c.replicas == b.replicas and c.max_batch_size >= b.max_batch_size for c, b in pairs)
    assert any(c.max_batch_size > b.max_batch_size for c, b in pairs)


def test_the_plan_records_its_ladder_only_when_asked() -> None:
    plain = make_plan(SPEC, PROFILES, CATALOG, SAMPLE, 120.0)
    laddered = make_plan(SPEC, PROFILES, CATALOG, SAMPLE, 120.0, ladder=True)
    assert plain.tuner is not None and plain.tuner.ladder == ()
    assert laddered.tuner is not None and len(laddered.tuner.ladder) == 4
    assert laddered.stages == plain.stages  # the plan itself does not change


def test_with_its_ladder_the_tuner_meets_the_burst_at_the_peak_plans_cost() -> None:
    model = pipeline_model(SPEC)
    table = build_cost_table(model, PROFILES, CATALOG)
    laddered = make_plan(SPEC, PROFILES, CATALOG, SAMPLE, 120.0, ladder=True)
    plain = make_plan(SPEC, PROFILES, CATALOG, SAMPLE, 120.0)
    peak = make_plan(SPEC, PROFILES, CATALOG, STEP, 120.0)

    def run(plan, tuner):  # type: ignore[no-untyped-def]
        policy = make_policy(tuner, plan.tuner)
        return simulate_run(model, table, plan_config(model, table, plan), STEP, SLO_S, policy, 1.0, 1.5)

    ladder, replicas_only, static = run(laddered, "inferline"), run(plain, "inferline"), run(plain, "none")
    assert static.slo_miss_rate > 0.5  # the plan alone collapses in the burst
    assert ladder.slo_miss_rate <= 0.01 and replicas_only.slo_miss_rate <= 0.01
    assert ladder.cost_per_hour <= peak.cost_per_hour + 1e-9 < replicas_only.cost_per_hour
    switched = [d.decision for d in ladder.decisions if d.decision.max_batch_size is not None]
    assert switched and all(d.replicas == 1 for d in switched)


def test_plan_cli_writes_the_ladder_with_scale_ladder(capsys) -> None:  # type: ignore[no-untyped-def]
    from inferline.cli import main

    args = [
        "plan", str(ROOT / "pipelines" / "local-emulated.yaml"), "--profiles", str(ROOT / "profiles" / "measured-cpu"),
        "--hardware", str(ROOT / "catalog-local.yaml"), "--trace", "gamma:rate=80,cv=2,duration=60,seed=1", "--json",
    ]  # fmt: skip
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["tuner"]["ladder"] == []
    assert main([*args, "--scale-ladder"]) == 0
    ladder = json.loads(capsys.readouterr().out)["tuner"]["ladder"]
    assert [s["rate_multiplier"] for s in ladder] == [1.5, 2.0, 3.0, 4.0]
    assert all(set(s["stages"]) == {"detect", "classify"} for s in ladder)
