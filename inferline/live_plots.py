"""Plots of live replays: latency CDF measured vs estimated; arrival rate, replicas and batch caps over time."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from inferline.plan import Plan
from inferline.plots import pyplot
from inferline.router.replay import ReplayResult


def replicas_over_time(
    plan: Plan, decisions: list[dict[str, Any]], end_s: float, key: str = "replicas"
) -> dict[str, tuple[list[float], list[int]]]:
    """Per stage, a step series (times, values) starting from the plan: `replicas`, or
    `max_batch_size` (which scale-ladder decisions change)."""
    series = {name: ([0.0], [int(getattr(s, key))]) for name, s in plan.stages.items()}
    for d in sorted(decisions, key=lambda d: float(d["time_s"])):
        if d.get(key) is None:
            continue
        times, counts = series[str(d["stage"])]
        times.append(float(d["time_s"]))
        counts.append(int(d[key]))
    for times, counts in series.values():
        times.append(end_s)
        counts.append(counts[-1])
    return series


def plot_live(
    results: Mapping[str, ReplayResult],
    estimated_ms: NDArray[np.float64],
    runs: Mapping[str, Mapping[str, Any]],
    plan: Plan,
    path: str | Path,
) -> None:
    plt = pyplot()
    fig, (cdf, rate) = plt.subplots(1, 2, figsize=(13, 4.5))
    for name, result in results.items():
        lat = np.sort(np.where(np.isnan(result.latencies_ms), np.inf, result.latencies_ms))
        label = "measured, live tuner" if name == "inferline" else f"measured, {name if name != 'none' else 'static'}"
        cdf.plot(lat, np.arange(1, lat.size + 1) / lat.size, label=label)
    est = np.sort(estimated_ms)
    cdf.plot(est, np.arange(1, est.size + 1) / est.size, "--", label="estimated (static plan)")
    cdf.axvline(plan.slo_ms, color="grey", linestyle=":", label=f"SLO {plan.slo_ms:g} ms")
    cdf.set(xlabel="latency (ms, log scale)", ylabel="fraction of queries", title="latency CDF", ylim=(0.9, 1.001))
    cdf.set_xscale("log")
    cdf.legend(loc="lower right")
    first = next(iter(results.values()))
    seconds = np.floor(first.scheduled_s - first.scheduled_s[0]).astype(int)
    counts = np.bincount(seconds)
    rate.step(np.arange(counts.size), counts, where="post", color="black", label="arrivals/s")
    rate.set(xlabel="time (s)", ylabel="queries per second", title="arrival rate, replicas and batch caps (tuner)")
    replicas = rate.twinx()
    decisions = list(runs.get("inferline", {}).get("decisions", []))
    for key, label, style in (("replicas", "replicas", "-"), ("max_batch_size", "batch cap", ":")):
        for i, (stage, (times, values)) in enumerate(replicas_over_time(plan, decisions, counts.size, key).items()):
            replicas.step(times, values, where="post", linestyle=style, color=f"C{i}", label=f"{stage} {label}")
    replicas.set_ylabel("replicas / batch cap")
    replicas.set_yscale("log", base=2)
    replicas.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
