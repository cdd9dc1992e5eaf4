"""The time outside the stages (`inferline/outside.py`): measured from a client and a router; what an estimate adds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from inferline.calibration import LiveStage
from inferline.outside import added_outside_ms, measured_outside_ms


def stage(calls: dict[int, tuple[float, int]], queue_wait_s: float | None) -> LiveStage:
    return LiveStage(calls, 0.0, 0, queue_wait_s=queue_wait_s)


def test_a_stage_holds_its_queue_waits_and_each_call_once_per_query_in_its_batch() -> None:
    # 3 calls of one query at 10 ms, 1 call of two at 15 ms, 5 ms of queue waits: 65 ms in all.
    assert stage({1: (10.0, 3), 2: (15.0, 1)}, 0.005).in_stage_s == pytest.approx(0.065)
    assert stage({1: (10.0, 3)}, None).in_stage_s is None


def test_the_time_outside_is_the_clients_mean_latency_less_the_stages_time_per_query() -> None:
    # Five answered queries at 16 ms on average; 65 ms in one stage and 10 in another: 15 per query.
    latencies = np.array([10.0, 20.0, math.nan, 14.0, 18.0, 18.0])
    live = {"a": stage({1: (10.0, 3), 2: (15.0, 1)}, 0.005), "b": stage({1: (5.0, 2)}, 0.0)}
    assert measured_outside_ms(latencies, live) == pytest.approx(1.0)


def test_no_time_outside_without_the_queue_waits_or_an_answer() -> None:
    live = {"a": stage({1: (10.0, 3)}, 0.005), "b": stage({1: (5.0, 2)}, None)}
    assert measured_outside_ms(np.array([20.0, 30.0]), live) is None
    assert measured_outside_ms(np.array([math.nan]), {"a": live["a"]}) is None
    assert measured_outside_ms(np.array([20.0]), {}) is None


def test_an_estimate_adds_what_the_simulation_lacks_and_never_takes_away() -> None:
    assert added_outside_ms(3.0, np.array([1.0, 2.0])) == pytest.approx(1.5)
    assert added_outside_ms(1.0, np.array([1.0, 2.0])) == 0.0
    assert added_outside_ms(None, np.array([1.0])) == 0.0
    assert added_outside_ms(2.0, np.zeros(0)) == 0.0
