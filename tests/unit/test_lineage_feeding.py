"""Lineage feeds each stage as the router does: parents' outputs, else ancestors' or the query's own inputs.

A recording stand-in for a model server (the real-server lineage tests are in tests/triton) shows
what each model was sent: in a cascade pre -> small -> large, `large` needs the image `pre` made,
which its parent `small` does not output.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from numpy.typing import NDArray

from inferline.adapters.base import ModelInfo, ServingConfig, TensorSpec
from inferline.agent.lineage import measure_lineage
from inferline.spec import parse_spec

Tensors = dict[str, NDArray[np.generic]]

MODELS = {
    "pre": ((TensorSpec("IMAGE", "float32", (4,)),), (TensorSpec("PIXELS", "float32", (2,)),)),
    "small": ((TensorSpec("PIXELS", "float32", (2,)),), (TensorSpec("PROBS", "float32", (3,)),)),
    "large": ((TensorSpec("PIXELS", "float32", (2,)),), (TensorSpec("PROBS", "float32", (3,)),)),
}


def unsure(outputs: Mapping[str, NDArray[np.generic]]) -> bool:
    return bool(np.max(outputs["PROBS"]) < 0.3)


class RecordingServer:
    def __init__(self) -> None:
        self.received: dict[str, list[Tensors]] = {name: [] for name in MODELS}

    def model_info(self, model: str) -> ModelInfo:
        inputs, outputs = MODELS[model]
        return ModelInfo(model, True, ServingConfig(8, 1), inputs, outputs)

    def infer(self, model: str, inputs: Mapping[str, NDArray[np.generic]]) -> Tensors:
        self.received[model].append(dict(inputs))
        if model == "pre":
            image = np.asarray(inputs["IMAGE"], dtype=np.float32)
            return {"PIXELS": image[:, :2] + image[:, 2:]}
        pixels = np.asarray(inputs["PIXELS"], dtype=np.float32)
        return {"PROBS": np.stack([pixels[:, 0], pixels[:, 1], pixels[:, 0] * 0], axis=1) / 4}


def test_a_grandchild_gets_its_ancestors_output_when_its_parent_lacks_it() -> None:
    spec = parse_spec({
        "name": "cascade",
        "stages": [
            {"name": "pre", "model": "pre"},
            {"name": "small", "model": "small", "after": ["pre"]},
            {"name": "large", "model": "large", "after": ["small"], "probability": 0.5,
             "route": "tests.unit.test_lineage_feeding:unsure"},
        ],
    })  # fmt: skip
    server = RecordingServer()
    measures = {m.stage: m for m in measure_lineage(spec, server, samples=40, seed=1)}  # type: ignore[arg-type]

    made = np.concatenate([server.infer("pre", sent)["PIXELS"] for sent in server.received["pre"][:]])
    probs = made / 4
    expected_rows = np.flatnonzero(np.max(probs, axis=1) < 0.3)
    assert measures["large"].continued == expected_rows.size > 0
    sent_to_large = np.concatenate([batch["PIXELS"] for batch in server.received["large"]])
    np.testing.assert_allclose(sent_to_large, made[expected_rows])
