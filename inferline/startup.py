"""Measured replica start-up, fed back to the closed-loop simulator.

The live tuner logs each applied decision with `startup_s`: the measured time until the new
replicas were ready (0 for a scale-down). The closed-loop simulator (`simulate_run`) models a
tuner whose added replicas serve after a start-up delay; these helpers turn logged decisions
into that delay, so that a simulation or a replay's estimate uses what this machine measured.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from inferline.errors import InferlineError

DEFAULT_STARTUP_S = 5.0
"""Start-up assumed when none was measured (`inferline simulate --startup-s` default)."""

LIVE_TICK_S = 1.0
"""The live tuner's control period (`inferline serve --tick-s` default, the demo's tick)."""


def measured_startup_s(decisions: Iterable[Mapping[str, Any]]) -> float | None:
    """The median `startup_s` over decisions that started replicas (> 0); None when there is none."""
    values = [v for d in decisions if (v := _number(d.get("startup_s"))) is not None and v > 0]
    return float(statistics.median(values)) if values else None


def _number(value: Any) -> float | None:
    """A finite number as float; None for anything else (missing, null, text, bool, inf)."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def decisions_from_file(path: str | Path) -> list[dict[str, Any]]:
    """Decisions from a decisions log (JSONL, `.inferline/decisions.jsonl`) or run results JSON.

    Run results hold them under "decisions"; the live demo's report under each of "runs".
    Any problem reading or parsing the file is an `InferlineError` naming it.
    """
    name = str(path)
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise InferlineError(
            f"cannot read decisions file {name!r}: {reason}", "pass a decisions.jsonl or run results JSON"
        ) from None
    rows: list[Any] = []
    try:
        whole: Any = json.loads(text)
    except json.JSONDecodeError:
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise InferlineError(
                    f"decisions file {name!r} line {number} is not JSON ({exc.msg})",
                    "pass a decisions.jsonl (one JSON object a line) or run results JSON",
                ) from None
    else:
        if isinstance(whole, dict) and isinstance(whole.get("decisions"), list):
            rows = whole["decisions"]
        elif isinstance(whole, dict) and isinstance(whole.get("runs"), dict):
            runs = [r for r in whole["runs"].values() if isinstance(r, dict)]
            rows = [d for r in runs for d in r.get("decisions") or []]
        elif isinstance(whole, dict) and not {"stage", "startup_s"} & set(whole):
            raise InferlineError(
                f'file {name!r} is neither a decisions log nor run results (no "decisions")',
                "pass a decisions.jsonl or run results JSON",
            )
        else:
            rows = whole if isinstance(whole, list) else [whole]  # a dict: a decisions log of one line
    for row in rows:
        if not isinstance(row, dict) or (row.get("startup_s") is not None and _number(row["startup_s"]) is None):
            raise InferlineError(
                f"decisions file {name!r} holds a malformed decision: {json.dumps(row)[:80]}",
                "each decision is an object with a numeric startup_s",
            )
    return rows


def startup_from_file(path: str | Path) -> float:
    """The measured median start-up of the decisions in a file; an error naming it when none was measured."""
    value = measured_startup_s(decisions_from_file(path))
    if value is None:
        raise InferlineError(
            f"decisions file {str(path)!r} has no measured replica start-up (no decision with startup_s > 0)",
            "pass the decisions of a live run whose tuner added replicas, or --startup-s SECONDS",
        )
    return value


def parse_startup(value: str) -> tuple[float, str | None]:
    """`--startup-s`: seconds, or a decisions file whose measured median is used. Returns (seconds, file or None)."""
    try:
        seconds = float(value)
    except ValueError:
        return startup_from_file(value), value
    if not math.isfinite(seconds) or seconds < 0:
        raise InferlineError(
            f"--startup-s must be seconds >= 0 or a decisions file, got {value!r}", "pass sensible durations"
        )
    return seconds, None
