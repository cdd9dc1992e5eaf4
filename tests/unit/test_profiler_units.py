"""Profiler pieces that need no server: batch-size checks, dropping flat sizes, finding the binary."""

from __future__ import annotations

import importlib.util

import pytest

from inferline.adapters.triton import server as triton_server
from inferline.agent.profiler import drop_flat_points, validate_batch_sizes
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
