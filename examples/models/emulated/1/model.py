"""Triton Python-backend model: an EMULATED model (no real compute; it sleeps).

INPUT float32 [batch, 16]  ->  OUTPUT float32 [batch, 16] (an echo of INPUT)

Each execute() call takes a + b*n milliseconds in total, where n is the number of items in the
call (the sum of the batch sizes of its requests) and a, b are the model config parameters
``latency_a_ms`` and ``latency_b_ms`` (defaults 20 and 2). The time spent building the responses
is measured and only the remainder is slept, and it is slept with time.sleep so that the
replica holds no CPU: a small machine can host many emulated replicas.

Optionally a call after an idle gap takes longer, as on servers whose threads go to sleep:
``idle_extra_ms`` * (1 - exp(-gap / ``idle_time_constant_ms``)) more, the gap counted from the
end of the instance's previous call (defaults 0 and 1: no extra).

The same file serves every emulated-* model; only config.pbtxt differs.
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
import triton_python_backend_utils as pb_utils

INPUT = "INPUT"
OUTPUT = "OUTPUT"
DEFAULTS = {"latency_a_ms": 20.0, "latency_b_ms": 2.0, "idle_extra_ms": 0.0, "idle_time_constant_ms": 1.0}


def read_parameter(config: dict, key: str) -> float:
    """A non-negative float from the config's ``parameters`` (string_value), or its default."""
    entry = config.get("parameters", {}).get(key)
    if entry is None:
        return DEFAULTS[key]
    raw = entry.get("string_value", "") if isinstance(entry, dict) else entry
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"model parameter {key} must be a number of milliseconds, got {raw!r}") from None
    if not value >= 0.0:  # also rejects NaN
        raise ValueError(f"model parameter {key} must be >= 0, got {raw!r}")
    return value


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        self.a_s = read_parameter(config, "latency_a_ms") / 1000.0
        self.b_s = read_parameter(config, "latency_b_ms") / 1000.0
        self.idle_extra_s = read_parameter(config, "idle_extra_ms") / 1000.0
        self.idle_tau_s = max(read_parameter(config, "idle_time_constant_ms"), 1e-3) / 1000.0
        self.last_end = time.perf_counter()
        output_config = pb_utils.get_output_config_by_name(config, OUTPUT)
        self.output_dtype = pb_utils.triton_string_to_numpy(output_config["data_type"])

    def execute(self, requests: list) -> list:
        start = time.perf_counter()
        responses = []
        items = 0
        for request in requests:
            data = pb_utils.get_input_tensor_by_name(request, INPUT).as_numpy()
            items += data.shape[0]
            output = np.ascontiguousarray(data, dtype=self.output_dtype)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(OUTPUT, output)]))
        woken = self.idle_extra_s * (1.0 - math.exp(-(start - self.last_end) / self.idle_tau_s))
        remaining = self.a_s + self.b_s * items + woken - (time.perf_counter() - start)
        if remaining > 0:
            time.sleep(remaining)
        self.last_end = time.perf_counter()
        return responses
