"""The plain cost table the search runs over: stage -> hardware -> (price, service times).

Built once from the catalog and the profiles (data passed in); the search never reads files.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from inferline.catalog import HardwareCatalog
from inferline.errors import ProfileError
from inferline.planner.pipeline import Config, PipelineModel
from inferline.profiles import ModelProfile, require_profiles


@dataclass(frozen=True, eq=False)
class HardwareOption:
    hardware: str
    price_per_hour: float
    batch_sizes: tuple[int, ...]
    service_s: NDArray[np.float64]
    """Mean batch service time in seconds for n = 0..max(batch_sizes) (index 0 is 0.0)."""
    cpu_share: NDArray[np.float64] | None = None
    """Fraction of service_s[n] spent on a core, in [0, 1] (same indexing); None where not measured."""
    idle_extra_s: float = 0.0
    """A call after its replica sat idle for g seconds takes idle_extra_s * (1 - exp(-g / idle_tau_s))
    longer (`ModelProfile.after_idle`; 0: not measured)."""
    idle_tau_s: float = 1.0
    interference: float = 0.0
    """How much each core's worth of other calls computing beside a call slows it on shared cores
    (`ModelProfile.interference`; 0: not measured)."""

    def service_time_s(self, batch: int) -> float:
        return float(self.service_s[batch])

    def throughput_qps(self, batch: int) -> float:
        return batch / float(self.service_s[batch])

    def next_batch(self, batch: int) -> int | None:
        bigger = [b for b in self.batch_sizes if b > batch]
        return bigger[0] if bigger else None


@dataclass(frozen=True, eq=False)
class StageCostTable:
    stage: str
    model: str
    options: dict[str, HardwareOption]

    def option(self, hardware: str) -> HardwareOption:
        return self.options[hardware]

    def by_speed(self) -> list[HardwareOption]:
        """Fastest first (lowest batch-1 latency), ties broken by price."""
        return sorted(self.options.values(), key=lambda o: (o.service_time_s(1), o.price_per_hour, o.hardware))

    def next_cheaper(self, hardware: str) -> HardwareOption | None:
        price = self.options[hardware].price_per_hour
        cheaper = [o for o in self.options.values() if o.price_per_hour < price]
        return max(cheaper, key=lambda o: (o.price_per_hour, o.hardware)) if cheaper else None


CostTable = tuple[StageCostTable, ...]
"""One StageCostTable per stage, in the PipelineModel's order."""


def build_cost_table(model: PipelineModel, profiles: Mapping[str, ModelProfile], catalog: HardwareCatalog) -> CostTable:
    require_profiles(list(model.models), profiles)
    tables = []
    for name, model_name in zip(model.names, model.models, strict=True):
        profile = profiles[model_name]
        options = {}
        for hw in profile.profiles:
            if hw not in catalog.hardware:
                continue  # profiled on hardware the catalog does not offer: not a choice
            sizes = profile.batch_sizes(hw)
            extra_s, tau_s = profile.after_idle_s(hw)
            options[hw] = HardwareOption(
                hardware=hw,
                price_per_hour=catalog.price(hw),
                batch_sizes=sizes,
                service_s=profile.service_times_ms(hw, sizes[-1]) / 1000.0,
                cpu_share=profile.cpu_shares(hw, sizes[-1]),
                idle_extra_s=extra_s,
                idle_tau_s=tau_s,
                interference=profile.interference.get(hw, 0.0),
            )
        if not options:
            raise ProfileError(
                f"stage {name!r}: model {model_name!r} is profiled on {sorted(profile.profiles)}, "
                f"none of which is in the hardware catalog {sorted(catalog.hardware)}",
                "profile the model on catalog hardware or add its hardware to the catalog",
            )
        tables.append(StageCostTable(stage=name, model=model_name, options=options))
    return tuple(tables)


def cost_per_hour(table: CostTable, config: Config) -> float:
    return sum(t.option(c.hardware).price_per_hour * c.replicas for t, c in zip(table, config, strict=True))
