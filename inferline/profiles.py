"""Model profiles: batch latency per batch size per hardware type (see README, "Profile")."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, model_validator

from inferline.errors import ProfileError, did_you_mean
from inferline.validation import parse


class LatencyStats(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False)

    mean: float = Field(gt=0, description="Mean batch latency in ms.")
    p50: float | None = Field(default=None, gt=0)
    p99: float | None = Field(default=None, gt=0)
    server_cpu_ms: float | None = Field(
        default=None,
        ge=0,
        description="CPU time the model server spent per batch (all its processes), where the profiler could read it.",
    )
    client_cpu_ms: float | None = Field(
        default=None,
        ge=0,
        description="CPU time the profiler's own client spent per batch (forming the request, reading the answer): "
        "part of `mean`, and the part a router's own work on each call replaces.",
    )


MAX_BATCH_SIZE = 4096
"""The largest batch a profile, plan or model server configuration may hold: tables are sized by
it, and a size far past any model's would only exhaust memory."""


class BatchPoint(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    batch_size: int = Field(ge=1, le=MAX_BATCH_SIZE)
    latency_ms: LatencyStats


class AfterIdle(BaseModel):
    """How much longer a call takes when its replica sat idle before it: a call after an idle gap
    of g ms takes extra_ms * (1 - exp(-g / time_constant_ms)) longer than the profile's mean at its
    batch size, which is measured back to back (threads and processes of the server that went to
    sleep wake up first; on a 2-core VM 0.5-1.2 ms per call)."""

    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False)

    extra_ms: float = Field(ge=0, description="Extra latency of a call after a long idle gap, in ms.")
    time_constant_ms: float = Field(gt=0, description="How fast the extra latency builds up with the gap, in ms.")
    rounds: int | None = Field(default=None, ge=1, description="Rounds of calls the profiler measured it from.")


def _by_batch_size(sizes: NDArray[np.float64], values: NDArray[np.float64], max_batch_size: int) -> NDArray[np.float64]:
    """Values measured at `sizes`, for n = 0..max_batch_size (index 0: 0.0), linear between sizes and
    held beyond the smallest and largest."""
    table = np.zeros(max_batch_size + 1)
    table[1:] = np.interp(np.arange(1, max_batch_size + 1, dtype=np.float64), sizes, values)
    return table


class ModelProfile(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    model: str = Field(min_length=1)
    profiles: dict[str, tuple[BatchPoint, ...]] = Field(min_length=1)
    after_idle: dict[str, AfterIdle] = Field(
        default_factory=dict, description="Per hardware type, the latency a call adds after its replica sat idle."
    )
    interference: dict[str, float] = Field(
        default_factory=dict,
        description="Per hardware type, how much each core's worth of other calls computing beside a call on "
        "shared cores slows it (planner/shared_cores.py; fitted to a live run by calibrate).",
    )

    @model_validator(mode="after")
    def _increasing_batches(self) -> ModelProfile:
        for field, by_hw in (("after_idle", self.after_idle), ("interference", self.interference)):
            for hw in by_hw:
                if hw not in self.profiles:
                    raise ValueError(f"{field} names hardware {hw!r}, which has no batch sizes in 'profiles'")
        for hw, g in self.interference.items():
            if not 0.0 <= g < math.inf:
                raise ValueError(f"interference on {hw!r} must be finite and >= 0, got {g}")
        for hw, points in self.profiles.items():
            if not points:
                raise ValueError(f"hardware {hw!r} has no batch sizes")
            sizes = [p.batch_size for p in points]
            for a, b in itertools.pairwise(sizes):
                if b <= a:
                    raise ValueError(f"hardware {hw!r}: batch sizes must increase, got {a} then {b}")
        return self

    def batch_sizes(self, hardware: str) -> tuple[int, ...]:
        return tuple(p.batch_size for p in self.points(hardware))

    def points(self, hardware: str) -> tuple[BatchPoint, ...]:
        try:
            return self.profiles[hardware]
        except KeyError:
            raise ProfileError(
                f"model {self.model!r} has no profile for hardware {hardware!r}{did_you_mean(hardware, self.profiles)}",
                f"profile {self.model!r} on {hardware!r} or choose one of {sorted(self.profiles)}",
            ) from None

    def service_times_ms(self, hardware: str, max_batch_size: int) -> NDArray[np.float64]:
        """Mean latency of a batch of n for n = 0..max_batch_size (index 0 unused, 0.0).

        Between profiled sizes it interpolates linearly; below the smallest profiled size it
        holds the smallest size's latency (a smaller batch is never slower in this model).
        """
        pts = self.points(hardware)
        sizes = np.array([p.batch_size for p in pts], dtype=np.float64)
        lat = np.array([p.latency_ms.mean for p in pts], dtype=np.float64)
        if max_batch_size not in self.batch_sizes(hardware):
            raise ProfileError(
                f"model {self.model!r} on {hardware!r} has no profiled batch size {max_batch_size}",
                f"use one of {list(self.batch_sizes(hardware))}",
            )
        return _by_batch_size(sizes, lat, max_batch_size)

    def cpu_shares(self, hardware: str, max_batch_size: int) -> NDArray[np.float64] | None:
        """The fraction of a batch's latency spent on a core, for n = 0..max_batch_size (index 0: 0.0).

        From the points whose server CPU time was measured, interpolated like `service_times_ms`
        and clipped to [0, 1] (a server may use more than one core per call); None where no point
        has it (e.g. a remote server, whose processes the profiler cannot see).
        """
        pts = [p for p in self.points(hardware) if p.latency_ms.server_cpu_ms is not None]
        if not pts:
            return None
        sizes = np.array([p.batch_size for p in pts], dtype=np.float64)
        shares = np.array([p.latency_ms.server_cpu_ms / p.latency_ms.mean for p in pts], dtype=np.float64)  # type: ignore[operator]
        return np.clip(_by_batch_size(sizes, shares, max_batch_size), 0.0, 1.0)

    def after_idle_s(self, hardware: str) -> tuple[float, float]:
        """(extra, time constant) of `AfterIdle` in seconds; no extra latency where not measured."""
        found = self.after_idle.get(hardware)
        if found is None:
            return 0.0, 1.0
        return found.extra_ms / 1000.0, found.time_constant_ms / 1000.0

    def throughput_qps(self, hardware: str, batch_size: int) -> float:
        """Queries per second of one replica that always runs full batches of batch_size."""
        return float(batch_size / (self.service_times_ms(hardware, batch_size)[batch_size] / 1000.0))


def parse_profile(data: object, source: str) -> ModelProfile:
    return parse(ModelProfile, data, source, ProfileError, "correct the profile (see README, 'Profile')")


def load_profile(path: str | Path) -> ModelProfile:
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except OSError as exc:
        raise ProfileError(f"cannot read profile {str(p)!r}: {exc.strerror}", "check the path") from None
    except json.JSONDecodeError as exc:
        raise ProfileError(f"profile {str(p)!r} is not valid JSON (line {exc.lineno})", "fix the JSON") from None
    except (UnicodeDecodeError, RecursionError, ValueError) as exc:
        raise ProfileError(f"profile {str(p)!r} is not readable JSON ({type(exc).__name__})", "fix the JSON") from None
    return parse_profile(data, f"profile {str(p)!r}")


def load_profiles(directory: str | Path) -> dict[str, ModelProfile]:
    """All `*.json` profiles in a directory, keyed by model name."""
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise ProfileError(f"--profiles {str(d)!r} is a file, not a directory", "pass the directory of *.json profiles")
    if not d.is_dir():
        raise ProfileError(f"profile directory {str(d)!r} does not exist", "pass --profiles DIR with *.json files")
    found: dict[str, ModelProfile] = {}
    for path in sorted(d.glob("*.json")):
        prof = load_profile(path)
        if prof.model in found:
            raise ProfileError(f"model {prof.model!r} is profiled twice in {str(d)!r}", "keep one file per model")
        found[prof.model] = prof
    if not found:
        raise ProfileError(f"profile directory {str(d)!r} holds no *.json profiles", "run `inferline profile` first")
    return found


def require_profiles(models: list[str], profiles: Mapping[str, ModelProfile]) -> None:
    for m in models:
        if m not in profiles:
            raise ProfileError(
                f"model {m!r} has no profile{did_you_mean(m, profiles)}",
                f"add {m}.json to the profile directory (have: {sorted(profiles)})",
            )


def merge_profiles(old: ModelProfile, new: ModelProfile) -> ModelProfile:
    """`old` with the hardware types of `new` replaced (profiling one hardware keeps the others)."""

    others = old.profiles.keys() - new.profiles.keys()
    return new.model_copy(
        update={
            "profiles": {**old.profiles, **new.profiles},
            "after_idle": {hw: a for hw, a in old.after_idle.items() if hw in others} | new.after_idle,
            "interference": {hw: g for hw, g in old.interference.items() if hw in others} | new.interference,
        }
    )


def profile_document(profile: ModelProfile) -> dict[str, object]:
    """The profile as JSON data (README, "Profile"), without an empty `after_idle` or `interference`."""
    data = profile.model_dump(mode="json", exclude_none=True)
    for optional in ("after_idle", "interference"):
        if not data.get(optional):
            data.pop(optional, None)
    return data


def write_profile(profile: ModelProfile, directory: str | Path) -> Path:
    """Write `<directory>/<model>.json`, merged with what is already there for other hardware.

    Written to a temporary file and renamed, so an interrupted write never leaves half a profile.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{profile.model}.json"
    if path.exists():
        profile = merge_profiles(load_profile(path), profile)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(profile_document(profile), indent=2) + "\n")
    tmp.replace(path)
    return path
