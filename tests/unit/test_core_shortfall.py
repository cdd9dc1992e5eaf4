from __future__ import annotations

from inferline.deployment import core_shortfall
from inferline.plan import Plan, StagePlan


def _plan(*replicas: int) -> Plan:
    stages = {f"s{i}": StagePlan(hardware="cpu", max_batch_size=1, replicas=r) for i, r in enumerate(replicas)}
    return Plan(pipeline="p", slo_ms=100, strategy="inferline", stages=stages)


def test_a_plan_that_fits_the_cores_gets_no_warning() -> None:
    assert core_shortfall(_plan(1, 1), cores=2) is None
    assert core_shortfall(_plan(2, 2), cores=4) is None


def test_more_replicas_than_cores_is_one_line_naming_both_counts() -> None:
    warning = core_shortfall(_plan(1, 1, 1), cores=2)
    assert warning is not None and "\n" not in warning
    assert "3 one-core replicas on 2 cores" in warning


def test_the_default_is_the_cores_this_process_may_run_on() -> None:
    assert core_shortfall(_plan(1)) is None  # every machine has a core
    assert core_shortfall(_plan(10_000)) is not None
