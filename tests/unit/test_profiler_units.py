"""Profiler pieces that need no server: batch-size checks, dropping flat sizes, finding the binary,
fitting the after-idle latency."""

from __future__ import annotations

import importlib.util
import math
from typing import Any

import numpy as np
import pytest

from inferline.adapters.triton import server as triton_server
from inferline.agent.profiler import (
    IDLE_GAPS_S,
    drop_flat_points,
    fit_after_idle,
    measure_after_idle,
    validate_batch_sizes,
)
from inferline.errors import ProfileError, ServerError
from inferline.profiles import BatchPoint, LatencyStats


def point(batch: int, mean_ms: float) -> BatchPoint:
    return BatchPoint(batch_size=batch, latency_ms=LatencyStats(mean=mean_ms))


def test_drop_flat_keeps_only_sizes_that_raise_throughput() -> None:
    # Throughput (items/ms): 0.1, 0.2, 0.208 (flat: under +5%), 0.4, 0.39 (lower).
    points = [point(1, 10), point(2, 10), point(4, 19.2), point(8, 20), point(16, 41)]
    assert [p.batch_size for p in drop_flat_points(points)] == [1, 2, 8]


def test_drop_flat_compares_with_the_last_kept_size() -> None:
    # 4 is flat against 2 and dropped; 8 beats 2 by more than 5% and stays.
    points = [point(1, 10), point(2, 10), point(4, 19.5), point(8, 35)]
    assert [p.batch_size for p in drop_flat_points(points)] == [1, 2, 8]


@pytest.mark.parametrize("sizes", [(), (0, 1), (2, 1), (1, 1)])
def test_batch_sizes_must_be_positive_and_increasing(sizes: tuple[int, ...]) -> None:
    with pytest.raises(ProfileError):
        validate_batch_sizes(sizes)


def test_a_missing_tritonserver_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        triton_server.importlib.util, "find_spec", lambda name, *a: None if name == "pytriton" else real(name, *a)
    )
    with pytest.raises(ServerError) as err:
        triton_server.find_install()
    assert "pip install 'inferline[triton]'" in err.value.one_line() and "\n" not in err.value.one_line()


# --- the after-idle term ---------------------------------------------------------------------------


def after_idle_samples(extra_ms: float, tau_ms: float, rounds: int = 40) -> tuple[Any, list[Any], list[Any]]:
    """Warm calls of 2 ms and calls after each of IDLE_GAPS_S, with a seeded 0.1 ms jitter."""
    rng = np.random.default_rng(7)
    warm = 2.0 + rng.normal(0.0, 0.1, rounds)
    gaps = [np.full(rounds, 1000.0 * g) + rng.uniform(0.0, 0.1, rounds) for g in IDLE_GAPS_S]
    after = [2.0 + extra_ms * (1.0 - np.exp(-g / tau_ms)) + rng.normal(0.0, 0.1, rounds) for g in gaps]
    return warm, gaps, after


@pytest.mark.parametrize(("extra_ms", "tau_ms"), [(1.2, 2.0), (0.5, 8.0), (3.0, 15.0)])
def test_the_after_idle_fit_recovers_the_extra_and_its_time_constant(extra_ms: float, tau_ms: float) -> None:
    fitted = fit_after_idle(*after_idle_samples(extra_ms, tau_ms))
    assert fitted is not None
    assert fitted.extra_ms == pytest.approx(extra_ms, abs=0.1)
    assert fitted.time_constant_ms == pytest.approx(tau_ms, rel=0.35)


def test_an_after_idle_extra_within_the_noise_is_none() -> None:
    assert fit_after_idle(*after_idle_samples(0.0, 5.0)) is None
    assert fit_after_idle(*after_idle_samples(1.0, 5.0, rounds=1)) is None  # one round tells nothing


class WakingServer:
    """A fake server whose call takes 2 ms, plus 4 * (1 - exp(-gap / 6)) ms after an idle gap, with
    a seeded jitter of 0.1 ms, on a clock of its own (a sleep overshoots by up to 0.2 ms): the same
    on any machine, however busy."""

    def __init__(self) -> None:
        self.now = self.last_end = 0.0
        self.calls = 0
        self.rng = np.random.default_rng(3)

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds + self.rng.uniform(0.0, 0.0002)

    def infer(self, model: str, inputs: object) -> dict[str, object]:
        woken = 0.004 * (1.0 - math.exp(-(self.now - self.last_end) / 0.006))
        self.now += 0.002 + woken + self.rng.normal(0.0, 0.0001)
        self.last_end = self.now
        self.calls += 1
        return {}


def test_measuring_after_idle_recovers_a_servers_wake_up_latency() -> None:
    server = WakingServer()
    fitted = measure_after_idle(server, "m", {}, rounds=12, sleep=server.sleep, clock=server.clock)  # type: ignore[arg-type]
    assert server.calls == 12 * (3 + len(IDLE_GAPS_S))
    assert fitted is not None and fitted.rounds == 12
    assert fitted.extra_ms == pytest.approx(4.0, abs=1.0)
    assert 3.0 <= fitted.time_constant_ms <= 12.0
    assert measure_after_idle(server, "m", {}, rounds=0) is None  # type: ignore[arg-type]
