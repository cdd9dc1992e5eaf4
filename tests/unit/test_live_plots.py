"""The series behind the live report's plots."""

from __future__ import annotations

from inferline.live_plots import replicas_over_time
from inferline.plan import Plan, StagePlan

PLAN = Plan(
    pipeline="p", slo_ms=100, strategy="inferline",
    stages={"a": StagePlan(hardware="cpu", max_batch_size=2, replicas=1),
            "b": StagePlan(hardware="cpu", max_batch_size=1, replicas=1)},
)  # fmt: skip
DECISIONS = [
    {"time_s": 30.0, "stage": "a", "replicas": 1, "max_batch_size": 8},
    {"time_s": 10.0, "stage": "b", "replicas": 3, "max_batch_size": None},
    {"time_s": 20.0, "stage": "a", "replicas": 2},  # logs written before batch sizes were recorded
]


def test_replicas_step_from_the_plan_in_time_order() -> None:
    series = replicas_over_time(PLAN, DECISIONS, 60.0)
    assert series["a"] == ([0.0, 20.0, 30.0, 60.0], [1, 2, 1, 1])
    assert series["b"] == ([0.0, 10.0, 60.0], [1, 3, 3])


def test_batch_caps_change_only_where_a_decision_set_one() -> None:
    series = replicas_over_time(PLAN, DECISIONS, 60.0, "max_batch_size")
    assert series["a"] == ([0.0, 30.0, 60.0], [2, 8, 8])
    assert series["b"] == ([0.0, 60.0], [1, 1])
