"""Terminal tables (rich) for plans and runs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.table import Table

from inferline.plan import Plan


def plan_table(plan: Plan) -> Table:
    table = Table(title=f"{plan.pipeline}: plan ({plan.strategy})", title_justify="left")
    for col in ("stage", "hardware", "max batch", "replicas"):
        table.add_column(col, justify="left" if col in ("stage", "hardware") else "right")
    for name, st in plan.stages.items():
        table.add_row(name, st.hardware, str(st.max_batch_size), str(st.replicas))
    p99 = f"{plan.estimated_p99_ms:.1f} ms" if plan.estimated_p99_ms is not None else "-"
    table.caption = (
        f"cost ${plan.cost_per_hour:.4f}/h · estimated P99 {p99} · SLO {plan.slo_ms:g} ms · "
        f"{plan.simulations} simulations in {plan.planner_wall_s:.2f} s"
    )
    return table


def runs_table(title: str, rows: Sequence[tuple[str, dict[str, Any]]]) -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("run", "P99 (ms)", "SLO miss", "cost ($)", "$/hour", "decisions"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for name, r in rows:
        table.add_row(
            name,
            f"{r['p99_ms']:.1f}",
            f"{r['slo_miss_rate'] * 100:.2f}%",
            f"{r['cost']:.4f}",
            f"{r['cost_per_hour']:.3f}",
            str(len(r["decisions"])),
        )
    return table
