"""Plots for people (PNG). matplotlib is an optional extra: `pip install 'inferline[plot]'`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from inferline.errors import InferlineError
from inferline.planner.closedloop import RunResult


def pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InferlineError("plotting needs matplotlib", "pip install 'inferline[plot]'") from None
    return plt


def plot_run(result: RunResult, path: str | Path, title: str) -> None:
    """Arrival rate, replicas per stage and P99 latency over time, on one shared time axis."""
    plt = pyplot()
    fig, (ax_rate, ax_rep, ax_lat) = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    bin_s = 1.0
    end = max(result.duration_s, 1.0)
    edges = np.arange(0.0, end + bin_s, bin_s)
    counts, _ = np.histogram(result.arrivals_s, bins=edges)
    ax_rate.plot(edges[:-1], counts / bin_s, lw=0.8)
    ax_rate.set_ylabel("arrivals (qps)")
    for stage, reps in result.replicas.items():
        ax_rep.step(result.tick_times_s, reps, where="post", label=stage)
    ax_rep.set_ylabel("replicas")
    ax_rep.legend(loc="upper left", fontsize="small", ncol=4)
    which = np.clip(np.digitize(result.arrivals_s, edges) - 1, 0, edges.size - 2)
    p99s = np.full(edges.size - 1, np.nan)
    for b in np.unique(which):
        lat = result.latencies_s[which == b]
        p99s[b] = np.quantile(lat, 0.99) * 1000.0
    ax_lat.plot(edges[:-1], p99s, lw=0.8, label="P99 per second")
    ax_lat.axhline(result.slo_s * 1000.0, color="red", ls="--", lw=1, label="SLO")
    ax_lat.set_yscale("log")
    ax_lat.set_ylabel("latency (ms)")
    ax_lat.set_xlabel("time (s)")
    ax_lat.legend(loc="upper left", fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as exc:
        raise InferlineError(f"cannot write plot {str(path)!r}: {exc.strerror}", "check the path") from None
    finally:
        plt.close(fig)
