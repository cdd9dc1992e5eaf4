"""Latency outside the stages: the part of a query's end-to-end latency spent in no stage's queue
and in no call. In a local deployment that is the protocol hop from the load generator to the
router and back, and the router passing each answer on to the next stage or into the reply.

A shared-core estimate puts the load generator's and the router's CPU per query in each query's
way (`planner/shared_cores.py`), but a hop costs more latency than CPU: processes that share the
cores wake up late, the wire, a sender that runs behind. On the 2-core VM the emulated pipeline's
replays spent 3.3 ms per query outside its stages where the simulation had 1.6 ms.

A replay measures the time outside: the client's mean latency less the router's mean time per query
in its stages' queues and calls (its metrics). The estimate adds to every query what the
simulation lacks of that mean. The shift is set by a mean, not by the tail it predicts, and it moves
the median as much as the P99.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from numpy.typing import NDArray

from inferline.calibration import LiveStage


def measured_outside_ms(latencies_ms: NDArray[np.float64], live: Mapping[str, LiveStage]) -> float | None:
    """Mean ms per answered query outside every stage's queue and calls: the client's mean latency
    (`latencies_ms`, NaN where unanswered) less the router's time in its stages per query (`live`).
    None where nothing was answered or the router's metrics lack the queue waits. Where a query's
    branches run side by side, their stage times add up, so the time outside comes out smaller."""
    answered = latencies_ms[~np.isnan(latencies_ms)]
    in_stages = [stage.in_stage_s for stage in live.values()]
    if answered.size == 0 or not in_stages or any(s is None for s in in_stages):
        return None
    return float(answered.mean()) - 1000.0 * math.fsum(s for s in in_stages if s is not None) / answered.size


def added_outside_ms(measured_ms: float | None, simulated_ms: NDArray[np.float64]) -> float:
    """What an estimate adds to every query's latency: the measured mean time outside the stages
    less the simulation's own (`SharedRun.outside_s`, in ms), where the simulation has less; else 0."""
    if measured_ms is None or simulated_ms.size == 0:
        return 0.0
    return max(measured_ms - float(simulated_ms.mean()), 0.0)
