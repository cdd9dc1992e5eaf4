"""Triton Python-backend model: real numpy image preprocessing (runs on CPU).

IMAGE  uint8   [batch, 64, 64, 3]  (HWC, RGB)
PIXELS float32 [batch, 3, 32, 32]  (CHW)

Steps: 2x2 average-pool downscale to 32x32, scale to [0, 1], normalise each channel with the
ImageNet mean/std, transpose HWC -> CHW. All requests of one execute() call are processed as
a single numpy batch, so the cost grows with the total number of items.
"""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def preprocess(images: np.ndarray) -> np.ndarray:
    """uint8 [n, 64, 64, 3] -> float32 [n, 3, 32, 32]."""
    n, h, w, c = images.shape
    pooled = images.astype(np.float32).reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
    normalised = (pooled * np.float32(1.0 / 255.0) - MEAN) / STD
    return np.ascontiguousarray(normalised.transpose(0, 3, 1, 2))


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        output_config = pb_utils.get_output_config_by_name(config, "PIXELS")
        self.output_dtype = pb_utils.triton_string_to_numpy(output_config["data_type"])

    def execute(self, requests: list) -> list:
        images = [pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy() for request in requests]
        sizes = [image.shape[0] for image in images]
        pixels = preprocess(np.concatenate(images) if len(images) > 1 else images[0]).astype(self.output_dtype)
        return [
            pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("PIXELS", np.ascontiguousarray(part))])
            for part in np.split(pixels, np.cumsum(sizes)[:-1])
        ]
