"""How crowded each replica call was (`router/crowding.py`): the mean of the calls under way over its length."""

from __future__ import annotations

import numpy as np
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from inferline.calibration import CROWDED
from inferline.router.core import PipelineRouter, Replica
from inferline.router.crowding import MAX_CROWD, CallCrowding, crowd_bin
from tests.unit.test_calibration import CALL_S, SPEC, SleepingServer


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_call_is_binned_by_the_time_weighted_mean_of_the_calls_under_way() -> None:
    clock = Clock()
    crowding = CallCrowding(["a", "b"], clock=clock)
    first = crowding.started()  # t=0: alone
    clock.now = 1.0
    second = crowding.started()  # t=1: two under way
    assert (first.under_way, second.under_way) == (1, 2)
    clock.now = 2.0
    crowding.ended("b", second)  # its whole second with two under way
    clock.now = 4.0
    crowding.ended("a", first)  # 1 s alone, 1 s with two, 2 s alone: mean 5/4
    assert crowding.counts("b") == {2.0: (1, 1.0)}
    assert crowding.counts("a") == {1.0: (1, 4.0)}  # 1.25 rounds to the nearest half: 1.0
    assert crowding.under_way == 0
    clock.now = 5.0
    third = crowding.started()
    clock.now = 5.5
    fourth = crowding.started()
    clock.now = 6.0
    crowding.ended("a", fourth)  # all its half second with two under way
    crowding.ended("a", third)  # half alone, half with two: 1.5
    crowding.ended("b", crowding.started())  # of no length: counted as it started, alone
    assert crowding.counts("a") == {1.0: (1, 4.0), 1.5: (1, 1.0), 2.0: (1, 0.5)}
    assert crowding.counts("b") == {1.0: (1, 0.0), 2.0: (1, 1.0)}


def test_bins_are_clamped_to_one_and_the_last() -> None:
    assert crowd_bin(0.2) == 1.0  # a call of no length counts as alone
    assert crowd_bin(1.74) == 1.5 and crowd_bin(1.76) == 2.0
    assert crowd_bin(40.0) == MAX_CROWD


def _crowded(router: PipelineRouter) -> dict[str, dict[float, tuple[float, float]]]:
    out: dict[str, dict[float, list[float]]] = {}
    text = generate_latest(router.metrics_registry).decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name not in CROWDED:
                continue
            row = out.setdefault(sample.labels["stage"], {}).setdefault(float(sample.labels["under_way"]), [0.0, 0.0])
            row[CROWDED.index(sample.name)] = sample.value
    return {s: {k: (v[0], v[1]) for k, v in bins.items()} for s, bins in out.items()}


def test_the_router_exports_every_calls_crowd_and_time() -> None:
    pools = {
        "a": [Replica(SleepingServer(), "a", "a-0"), Replica(SleepingServer(), "a", "a-1")],
        "b": [Replica(SleepingServer(), "b", "b-0")],
    }
    router = PipelineRouter(SPEC, pools, {"a": 2, "b": 2}).start()  # type: ignore[arg-type]
    try:
        assert _crowded(router) == {}  # no call yet
        for f in [router.submit({"INPUT": np.zeros((1, 4), np.float32)}) for _ in range(60)]:
            f.result(timeout=30)
        calls = {stage: sum(sizes.values()) for stage, sizes in router.batch_sizes().items()}
        crowded = _crowded(router)
    finally:
        router.stop()
    for stage in ("a", "b"):
        assert sum(n for n, _ in crowded[stage].values()) == calls[stage]
        assert max(crowded[stage]) <= 3.0  # three replicas: never more calls under way
        assert sum(s for _, s in crowded[stage].values()) >= 0.9 * CALL_S * calls[stage]
    # 60 queries queued at once: most of a's calls overlapped another
    assert sum(n for k, (n, _) in crowded["a"].items() if k >= 1.5) > calls["a"] / 2
