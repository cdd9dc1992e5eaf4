"""A route for lineage tests: continue when the parent's first output value is above one half."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from numpy.typing import NDArray


def first_above_half(outputs: Mapping[str, NDArray[np.generic]]) -> bool:
    return bool(np.ravel(outputs["OUTPUT"])[0] > 0.5)


def refuses_negatives(outputs: Mapping[str, NDArray[np.generic]]) -> bool:
    """A route with a bug for some inputs: the router must fail those queries and keep serving."""
    value = float(np.ravel(outputs["OUTPUT"])[0])
    if value < 0:
        raise ValueError(f"negative score {value}")
    return value > 0.5
