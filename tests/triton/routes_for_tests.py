"""A route for lineage tests: continue when the parent's first output value is above one half."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from numpy.typing import NDArray


def first_above_half(outputs: Mapping[str, NDArray[np.generic]]) -> bool:
    return bool(np.ravel(outputs["OUTPUT"])[0] > 0.5)
