"""Generate the ONNX files of the example classifiers (classifier-small, classifier-large).

Both are small image CNNs over the ``PIXELS`` tensor that the ``preprocess`` model produces
(float32, [batch, 3, 32, 32]) and output ``PROBS`` (float32, [batch, 10], softmax). The
weights are random (He-normal, seeded numpy), so the predictions mean nothing: these models
exist to cost real, batch-dependent CPU time, not to be accurate.

The layer widths are chosen so that, with onnxruntime on one thread, the large model costs
about 4-5x the small one per item. Weights are stored as float16 and cast to float32 by a
``Cast`` node; onnxruntime folds those casts into float32 constants when it loads the session,
so the compute is float32 while each file stays a few hundred KB.

The output is deterministic: running this script twice writes byte-identical files.

    .venv/bin/python examples/models/build_onnx.py            # writes classifier-*/1/model.onnx
    .venv/bin/python examples/models/build_onnx.py --check    # only verifies the files are current
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MODELS_DIR = Path(__file__).resolve().parent
OPSET = 17
IR_VERSION = 8  # readable by every onnxruntime since 1.13
NUM_CLASSES = 10
INPUT_SHAPE = (3, 32, 32)


@dataclass(frozen=True)
class Layer:
    """A 3x3 'same' convolution + ReLU, optionally followed by a 2x2 max-pool."""

    out_channels: int
    pool: bool = False


@dataclass(frozen=True)
class Spec:
    name: str
    seed: int
    layers: tuple[Layer, ...]


SPECS = (
    # ~43 M multiply-adds per image; ~0.9 ms per image on one core.
    Spec(
        name="classifier-small",
        seed=1001,
        layers=(Layer(32), Layer(48), Layer(48, pool=True), Layer(64, pool=True)),
    ),
    # ~210 M multiply-adds per image; ~4 ms per image on one core.
    Spec(
        name="classifier-large",
        seed=2002,
        layers=(*(Layer(64) for _ in range(5)), Layer(64, pool=True), Layer(128, pool=True)),
    ),
)


def build(spec: Spec) -> onnx.ModelProto:
    rng = np.random.default_rng(spec.seed)
    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []

    def weight(name: str, array: np.ndarray) -> str:
        """Store ``array`` as a float16 initializer and return the name of its float32 cast."""
        initializers.append(numpy_helper.from_array(array.astype(np.float16), f"{name}_fp16"))
        nodes.append(helper.make_node("Cast", [f"{name}_fp16"], [name], to=TensorProto.FLOAT, name=f"{name}_cast"))
        return name

    x, in_channels = "PIXELS", INPUT_SHAPE[0]
    for i, layer in enumerate(spec.layers):
        fan_in = in_channels * 9
        w = rng.standard_normal((layer.out_channels, in_channels, 3, 3)) * np.sqrt(2.0 / fan_in)
        b = rng.standard_normal(layer.out_channels) * 0.01
        conv_inputs = [x, weight(f"conv{i}_w", w), weight(f"conv{i}_b", b)]
        nodes.append(
            helper.make_node("Conv", conv_inputs, [f"conv{i}"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name=f"conv{i}")
        )
        nodes.append(helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"], name=f"relu{i}"))
        x = f"relu{i}"
        if layer.pool:
            nodes.append(
                helper.make_node("MaxPool", [x], [f"pool{i}"], kernel_shape=[2, 2], strides=[2, 2], name=f"pool{i}")
            )
            x = f"pool{i}"
        in_channels = layer.out_channels

    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["features"], axis=1, name="flatten"))
    fc_w = rng.standard_normal((NUM_CLASSES, in_channels)) * np.sqrt(1.0 / in_channels)
    fc_b = np.zeros(NUM_CLASSES)
    fc_inputs = ["features", weight("fc_w", fc_w), weight("fc_b", fc_b)]
    nodes.append(helper.make_node("Gemm", fc_inputs, ["logits"], transB=1, name="fc"))
    nodes.append(helper.make_node("Softmax", ["logits"], ["PROBS"], axis=-1, name="softmax"))

    graph = helper.make_graph(
        nodes,
        spec.name.replace("-", "_"),
        inputs=[helper.make_tensor_value_info("PIXELS", TensorProto.FLOAT, ["batch", *INPUT_SHAPE])],
        outputs=[helper.make_tensor_value_info("PROBS", TensorProto.FLOAT, ["batch", NUM_CLASSES])],
        initializer=initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="inferline-examples",
        producer_version="1",
        doc_string=f"{spec.name}: random-weight CNN (seed {spec.seed}) for latency profiling; not trained.",
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def target(spec: Spec) -> Path:
    return MODELS_DIR / spec.name / "1" / "model.onnx"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if a file is missing or differs; write nothing")
    args = parser.parse_args(argv)

    stale = 0
    for spec in SPECS:
        data = build(spec).SerializeToString()
        path = target(spec)
        digest = hashlib.sha256(data).hexdigest()[:16]
        summary = f"{path.relative_to(MODELS_DIR)} ({len(data) / 1024:.0f} KiB, sha256 {digest})"
        if args.check:
            current = path.is_file() and path.read_bytes() == data
            stale += not current
            print(f"{'ok   ' if current else 'STALE'} {summary}")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            print(f"wrote {summary}")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
