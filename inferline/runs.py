"""Run results: the design's JSON for `simulate` (and later `replay`)."""

from __future__ import annotations

import math
from typing import Any

from inferline.planner.closedloop import RunResult


def run_results(result: RunResult, tuner: str) -> dict[str, Any]:
    return {
        "queries": int(result.latencies_s.size),
        "p99_ms": round(result.p99_s * 1000.0, 3),
        "slo_ms": result.slo_s * 1000.0,
        "slo_miss_rate": round(result.slo_miss_rate, 6),
        "cost": round(result.cost, 6),
        "cost_per_hour": round(result.cost_per_hour, 6),
        "duration_s": round(result.duration_s, 3),
        "tuner": tuner,
        "mean_batch_size": {k: round(v, 3) for k, v in result.mean_batch.items() if not math.isnan(v)},
        "decisions": [
            {
                "time_s": round(d.time_s, 3),
                "stage": d.decision.stage,
                "replicas": d.decision.replicas,
                "reason": d.decision.reason,
                "message": d.decision.message,
            }
            for d in result.decisions
        ],
    }
