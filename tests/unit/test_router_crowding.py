"""How crowded each replica call was (`router/crowding.py`): the seconds it spent at each count of calls under way."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from numpy.typing import NDArray
from prometheus_client import generate_latest

from inferline.calibration import live_stages
from inferline.errors import ServerError
from inferline.router.core import PipelineRouter, Replica
from inferline.router.crowding import MAX_CROWD, CallCrowding, CrowdedGroup, crowd_bin
from tests.unit.test_calibration import SPEC, SleepingServer, Tensors


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_call_keeps_the_seconds_at_each_count_and_is_grouped_by_their_mean() -> None:
    clock = Clock()
    crowding = CallCrowding(["a", "b"], clock=clock)
    first = crowding.started()  # t=0: alone
    clock.now = 1.0
    second = crowding.started(after_idle=False)  # t=1: two under way; its replica went on back to back
    assert (first.under_way, second.under_way) == (1, 2)
    clock.now = 2.0
    crowding.ended("b", second)  # its whole second with two under way
    clock.now = 4.0
    crowding.ended("a", first)  # 1 s alone, 1 s with two, 2 s alone: mean 5/4, a tie: up to 1.5
    assert crowding.counts("b") == {(2.0, False): CrowdedGroup(1, {2: 1.0})}
    assert crowding.counts("a") == {(1.5, True): CrowdedGroup(1, {1: 3.0, 2: 1.0})}
    assert crowding.under_way == 0
    clock.now = 5.0
    third = crowding.started()
    clock.now = 5.5
    fourth = crowding.started()
    clock.now = 6.0
    crowding.ended("a", fourth)  # all its half second with two under way
    crowding.ended("a", third)  # half alone, half with two
    crowding.ended("b", crowding.started())  # of no length: grouped as it started, alone
    assert crowding.counts("a") == {
        (1.5, True): CrowdedGroup(2, {1: 3.5, 2: 1.5}),
        (2.0, True): CrowdedGroup(1, {2: 0.5}),
    }
    assert crowding.counts("b") == {(1.0, True): CrowdedGroup(1, {}), (2.0, False): CrowdedGroup(1, {2: 1.0})}


def test_a_calls_seconds_follow_the_readings_its_replica_took() -> None:
    clock = Clock()
    crowding = CallCrowding(["a"], clock=clock)
    clock.now = 9.0  # the crowding's own clock has moved on; the replica read 1.0 and 3.5
    call = crowding.started(now=1.0)
    crowding.ended("a", call, now=3.5)
    assert crowding.counts("a") == {(1.0, True): CrowdedGroup(1, {1: 2.5})}
    # A reading older than the last change (another thread got the lock first) counts from that change.
    late = crowding.started(now=3.0)
    crowding.ended("a", late, now=4.0)
    assert crowding.counts("a") == {(1.0, True): CrowdedGroup(2, {1: 3.0})}


def test_a_failed_call_leaves_the_count_but_is_not_grouped() -> None:
    clock = Clock()
    crowding = CallCrowding(["a"], clock=clock)
    failed = crowding.started()
    clock.now = 1.0
    crowding.ended("a", failed, answered=False)
    assert crowding.under_way == 0 and crowding.counts("a") == {}


def test_groups_round_halves_up_and_are_clamped_to_one_and_the_last() -> None:
    assert crowd_bin(0.2) == 1.0  # a call of no length counts as alone
    assert crowd_bin(1.24) == 1.0 and crowd_bin(1.25) == 1.5 and crowd_bin(1.75) == 2.0 and crowd_bin(2.25) == 2.5
    assert crowd_bin(40.0) == MAX_CROWD


def test_counts_above_the_last_are_kept_at_the_last() -> None:
    clock = Clock()
    crowding = CallCrowding(["a"], clock=clock)
    tokens = [crowding.started() for _ in range(MAX_CROWD + 4)]
    clock.now = 1.0
    for token in tokens:
        crowding.ended("a", token)
    groups = crowding.counts("a")
    assert sum(g.calls for g in groups.values()) == MAX_CROWD + 4
    assert all(set(g.seconds_at) <= set(range(1, MAX_CROWD + 1)) for g in groups.values())


class FailingOnce(SleepingServer):
    """Fails every third call: a failed call is no service time."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def infer(self, model: str, inputs: Mapping[str, NDArray[np.generic]]) -> Tensors:
        self.calls += 1
        if self.calls % 3 == 0:
            raise ServerError("the model failed")
        return super().infer(model, inputs)


def test_the_router_groups_every_answered_call_with_its_seconds() -> None:
    pools = {
        "a": [Replica(SleepingServer(), "a", "a-0"), Replica(SleepingServer(), "a", "a-1")],
        "b": [Replica(FailingOnce(), "b", "b-0")],
    }
    router = PipelineRouter(SPEC, pools, {"a": 2, "b": 2}).start()  # type: ignore[arg-type]
    try:
        assert live_stages(generate_latest(router.metrics_registry).decode()) == {}  # no call yet
        for f in [router.submit({"INPUT": np.zeros((1, 4), np.float32)}) for _ in range(60)]:
            f.exception(timeout=30)
        live = live_stages(generate_latest(router.metrics_registry).decode())
    finally:
        router.stop()
    assert router._crowding.under_way == 0
    for stage in ("a", "b"):
        crowded = live[stage].crowded
        assert sum(n for n, _ in crowded.values()) == live[stage].call_count  # answered calls only
        seconds = sum(ms * n for ms, n in live[stage].calls.values()) / 1000.0
        # Timed from the replica's own readings: the same seconds, less only where another thread
        # started or ended a call between a reading and the crowding's lock (the rule: never back in time).
        kept = sum(sum(at.values()) for _, at in crowded.values())
        assert 0.95 * seconds <= kept <= seconds * (1 + 1e-9)
        assert max(c for _, at in crowded.values() for c in at) <= 3  # three replicas: never more under way
    # 60 queries queued at once: most of a's calls overlapped another
    assert sum(n for (k, _), (n, _) in live["a"].crowded.items() if k >= 1.5) > live["a"].call_count / 2
    # Calls queued behind others went back to back; the first of each replica did not.
    assert {idle for _, idle in live["a"].crowded} == {True, False}
