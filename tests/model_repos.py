"""Model repositories for tests against a real tritonserver, built from the bundled example models."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from inferline.adapters.base import Adapter, ModelStats

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "models"
EMULATED_SOURCE = EXAMPLES / "emulated" / "1" / "model.py"

EMULATED_CONFIG = """# EMULATED test model: a + b*n ms per batch of n.
name: "{name}"
backend: "python"
max_batch_size: {max_batch}
input [ {{ name: "INPUT" data_type: TYPE_FP32 dims: [ 16 ] }} ]
output [ {{ name: "OUTPUT" data_type: TYPE_FP32 dims: [ 16 ] }} ]
parameters [
  {{ key: "latency_a_ms" value: {{ string_value: "{a}" }} }},
  {{ key: "latency_b_ms" value: {{ string_value: "{b}" }} }},
  {{ key: "idle_extra_ms" value: {{ string_value: "{idle_extra}" }} }},
  {{ key: "idle_time_constant_ms" value: {{ string_value: "{idle_tau}" }} }}
]
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
dynamic_batching {{ max_queue_delay_microseconds: 0 }}
"""


def add_emulated(
    repository: Path,
    name: str,
    a_ms: float,
    b_ms: float,
    max_batch: int = 32,
    idle_extra_ms: float = 0.0,
    idle_tau_ms: float = 1.0,
) -> Path:
    """An emulated model whose true batch latency is a + b·n ms (the bundled emulated model's code),
    plus idle_extra * (1 - exp(-gap / idle_tau)) ms after an idle gap."""
    folder = repository / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    shutil.copy2(EMULATED_SOURCE, folder / "1" / "model.py")
    (folder / "config.pbtxt").write_text(
        EMULATED_CONFIG.format(
            name=name, a=a_ms, b=b_ms, max_batch=max_batch, idle_extra=idle_extra_ms, idle_tau=idle_tau_ms
        )
    )
    return folder


def add_example(repository: Path, name: str) -> Path:
    """Copy a bundled example model (its config, code and ONNX file) into `repository`."""
    target = repository / name
    shutil.copytree(EXAMPLES / name, target, ignore=shutil.ignore_patterns("__pycache__"))
    return target


def settled_stats(adapter: Adapter, model: str, before: ModelStats, inferences: int, wait_s: float = 5.0) -> ModelStats:
    """Statistics once `inferences` more are counted: a server may count a request just after answering it."""
    deadline = time.monotonic() + wait_s
    after = adapter.stats(model)
    while after.inferences - before.inferences < inferences and time.monotonic() < deadline:
        time.sleep(0.05)
        after = adapter.stats(model)
    return after
