"""Routing functions a pipeline spec can name for a conditional edge (`route: inferline.routes:...`).

A route gets the outputs of the stage's parents for ONE query (name -> array without the batch
axis) and returns True when the query continues into the stage. Users name their own callables
the same way (`mypackage.routes:is_vehicle`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping

import numpy as np
from numpy.typing import NDArray

from inferline.errors import SpecError

Outputs = Mapping[str, NDArray[np.generic]]
Route = Callable[[Outputs], bool]

CONFIDENCE_THRESHOLD = 0.8


def _probs(outputs: Outputs) -> NDArray[np.generic]:
    if "PROBS" in outputs:
        return outputs["PROBS"]
    return next(iter(outputs.values()))


def low_confidence(outputs: Outputs) -> bool:
    """Continue (e.g. to a slower, better model) when the parent's top probability is below 0.8."""
    return float(np.asarray(_probs(outputs), dtype=np.float64).max()) < CONFIDENCE_THRESHOLD


def high_confidence(outputs: Outputs) -> bool:
    return not low_confidence(outputs)


def positive_first(outputs: Outputs) -> bool:
    """Continue when the first value of the parent's output is positive (e.g. 'object detected')."""
    return float(np.asarray(next(iter(outputs.values())), dtype=np.float64).ravel()[0]) > 0.0


def resolve_route(reference: str, stage: str) -> Route:
    """Import `module:function`; a one-line error names the stage and what failed."""
    module_name, _, attr = reference.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SpecError(f"stage {stage!r}: cannot import route module {module_name!r}: {exc}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise SpecError(f"stage {stage!r}: route {reference!r} names no callable in {module_name!r}")
    route: Route = fn
    return route
