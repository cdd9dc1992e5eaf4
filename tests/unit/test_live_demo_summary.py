"""The live demo's summary table: each run's measured and estimated figures, and the estimate again
from the run's own service times where the router measured enough calls."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from inferline.live_demo import _summary
from inferline.plan import Plan


def run(
    p99_ms: float, estimated_ms: float, from_run_ms: float | None, estimate: str, stolen: float | None = None
) -> dict[str, Any]:
    return {
        "p99_ms": p99_ms, "estimated_p99_ms": estimated_ms, "estimated_from_run_p99_ms": from_run_ms,
        "slo_miss_rate": 0.01, "estimated_slo_miss_rate": 0.0, "errors": 0, "cost_per_hour": 0.133,
        "decisions": [{}, {}], "estimate": estimate, "machine_stolen": stolen,
    }  # fmt: skip


def rendered(runs: dict[str, dict[str, Any]]) -> str:
    """The table's cells and its caption, unwrapped."""
    plan = Plan.model_validate({"pipeline": "p", "slo_ms": 120, "strategy": "inferline", "stages": {}})
    table = _summary(plan, runs)
    caption = str(table.caption)
    table.caption = None
    console = Console(width=200, record=True)
    console.print(table)
    return console.export_text() + caption


def test_the_summary_shows_the_estimate_again_from_each_runs_own_service_times() -> None:
    text = rendered({
        "inferline": run(81.3, 71.9, 79.5, "closed-loop tuner inferline"),
        "none": run(4895.4, 3244.8, 4700.25, "static plan"),
    })  # fmt: skip
    assert "81.3" in text and "71.9" in text and "4895.4" in text
    assert "estimates: tuner: closed-loop tuner inferline; static: static plan" in text
    assert "est P99 again from each run's own service times: tuner 79.5 ms, static 4700.2 ms" in text


def test_without_the_runs_own_estimates_the_summary_says_nothing_of_them() -> None:
    text = rendered({"inferline": run(81.3, 71.9, None, "closed-loop tuner inferline")})
    assert "own service times" not in text and "estimates: tuner" in text


def test_the_summary_says_which_runs_the_hypervisor_slowed() -> None:
    text = rendered({
        "inferline": run(81.3, 71.9, 79.5, "closed-loop tuner inferline", stolen=0.054),
        "none": run(4895.4, 3244.8, 4700.25, "static plan", stolen=0.004),
    })  # fmt: skip
    assert "the hypervisor gave 5.4% of this machine's CPU to others during the tuner run: the latency" in text
    assert "static run" not in text  # under the threshold
    assert "hypervisor" not in rendered({"inferline": run(81.3, 71.9, 79.5, "tuner", stolen=None)})
