"""What every adapter must do, run against a real server per adapter (see conftest.HARNESSES)."""

from __future__ import annotations

import numpy as np
import pytest

from inferline.adapters.base import Adapter, ServingConfig, example_inputs
from inferline.errors import ModelNotFoundError, ServerError
from tests.adapters.conftest import Harness
from tests.model_repos import settled_stats


def test_implements_the_interface(harness: Harness) -> None:
    assert isinstance(harness.adapter, Adapter)
    assert harness.adapter.is_ready()
    assert harness.model in harness.adapter.models()


def test_model_info_reports_config_and_tensors(harness: Harness) -> None:
    info = harness.adapter.model_info(harness.model)
    assert info.ready
    assert info.config is not None and info.config.max_batch_size >= 1 and info.config.instance_count >= 1
    assert [t.name for t in info.inputs] == ["INPUT"] and [t.name for t in info.outputs] == ["OUTPUT"]
    assert info.inputs[0].dtype == "float32" and info.inputs[0].shape == (16,)


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_infer_returns_one_output_row_per_input_row(harness: Harness, batch: int) -> None:
    inputs = example_inputs(harness.adapter.model_info(harness.model), batch, seed=batch)
    out = harness.adapter.infer(harness.model, inputs)
    assert out["OUTPUT"].shape == (batch, 16)
    np.testing.assert_allclose(out["OUTPUT"], inputs["INPUT"])


def test_configure_applies_and_reports_what_is_in_effect(harness: Harness) -> None:
    a, model = harness.adapter, harness.model
    original = a.model_info(model).config
    assert original is not None
    try:
        now = a.configure(model, ServingConfig(max_batch_size=4, instance_count=2))
        assert (now.max_batch_size, now.instance_count, now.batching_delay_us) == (4, 2, 0)
        assert a.model_info(model).config == now
        with pytest.raises(ServerError, match="batch"):
            a.infer(model, example_inputs(a.model_info(model), 5))
        a.infer(model, example_inputs(a.model_info(model), 4))
    finally:
        a.configure(model, original)
    assert a.model_info(model).config == original


def test_stats_count_inferences_and_batches(harness: Harness) -> None:
    a, model = harness.adapter, harness.model
    info = a.model_info(model)
    before = a.stats(model)
    for _ in range(3):
        a.infer(model, example_inputs(info, 2))
    after = settled_stats(a, model, before, 6)
    assert after.inferences - before.inferences == 6
    assert after.executions_at(2) - before.executions_at(2) == 3
    assert after.compute_ms_total > before.compute_ms_total


def test_server_metrics_are_numbers(harness: Harness) -> None:
    metrics = harness.adapter.server_metrics()
    assert metrics and all(isinstance(v, float) for v in metrics.values())


def test_unknown_model_is_a_one_line_not_found(harness: Harness) -> None:
    with pytest.raises(ModelNotFoundError) as err:
        harness.adapter.model_info(harness.model + "x")
    assert "\n" not in err.value.one_line() and harness.model + "x" in err.value.one_line()
    with pytest.raises(ModelNotFoundError):
        harness.adapter.configure(harness.model + "x", ServingConfig(1, 1))


def test_unreachable_server_is_not_ready_and_a_one_line_error(harness: Harness) -> None:
    assert not harness.unreachable.is_ready()
    with pytest.raises(ServerError) as err:
        harness.unreachable.models()
    assert "unreachable" in err.value.one_line() and "\n" not in err.value.one_line()


def test_invalid_config_is_refused_before_reaching_the_server(harness: Harness) -> None:
    with pytest.raises(ServerError, match="max_batch_size"):
        harness.adapter.configure(harness.model, ServingConfig(0, 1))
