"""Traffic envelopes (network calculus): the most arrivals in any window of a given length."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

MAX_WINDOW_S = 60.0


def max_arrivals(arrivals_s: NDArray[np.float64], window_s: float) -> int:
    """The largest number of arrivals in any half-open window [t, t + window_s) of the trace."""
    if arrivals_s.size == 0:
        return 0
    ends = np.searchsorted(arrivals_s, arrivals_s + window_s, side="left")
    return int(np.max(ends - np.arange(arrivals_s.size)))


def envelope_windows(service_time_s: float, max_window_s: float = MAX_WINDOW_S) -> list[float]:
    """ΔT = T_s·2^j for j = 0, 1, ... up to max_window_s (the largest is always max_window_s)."""
    base = max(service_time_s, 1e-3)
    windows = []
    w = base
    while w < max_window_s:
        windows.append(w)
        w *= 2.0
    windows.append(max_window_s)
    return windows


def envelope(arrivals_s: NDArray[np.float64], windows_s: list[float]) -> list[tuple[float, float]]:
    """(window_s, rate_qps) for each window: max arrivals in any such window, per second."""
    return [(w, max_arrivals(arrivals_s, w) / w) for w in windows_s]


def peak_rate_qps(arrivals_s: NDArray[np.float64], window_s: float = 1.0) -> float:
    return max_arrivals(arrivals_s, window_s) / window_s


def mean_rate_qps(arrivals_s: NDArray[np.float64]) -> float:
    span = float(arrivals_s[-1] - arrivals_s[0]) if arrivals_s.size > 1 else 0.0
    return arrivals_s.size / span if span > 0 else float(arrivals_s.size)
