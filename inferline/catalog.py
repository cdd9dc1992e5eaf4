"""Hardware catalog: the hardware types a stage may run on and their price per replica-hour."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from inferline.errors import CatalogError, did_you_mean
from inferline.validation import parse, read_yaml


class HardwareType(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    price_per_hour: float = Field(gt=0, allow_inf_nan=False, description="Dollars per hour for one unit (one replica).")
    accelerator: bool = Field(default=False, description="Whether this is an accelerator (GPU/TPU).")


class HardwareCatalog(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    hardware: dict[str, HardwareType] = Field(min_length=1)

    def price(self, name: str) -> float:
        return self.get(name).price_per_hour

    def get(self, name: str) -> HardwareType:
        try:
            return self.hardware[name]
        except KeyError:
            raise CatalogError(
                f"hardware {name!r} is not in the catalog{did_you_mean(name, self.hardware)}",
                f"add {name!r} to the hardware catalog or use one of {sorted(self.hardware)}",
            ) from None


# The prices the InferLine authors used for AWS (per physical CPU, K80, V100).
DEFAULT_CATALOG = HardwareCatalog(
    hardware={
        "cpu": HardwareType(price_per_hour=0.0665),
        "k80": HardwareType(price_per_hour=0.634, accelerator=True),
        "v100": HardwareType(price_per_hour=2.528, accelerator=True),
    }
)


def load_catalog(path: str | Path) -> HardwareCatalog:
    data = read_yaml(path, "hardware catalog", CatalogError)
    return parse(
        HardwareCatalog,
        data,
        f"hardware catalog {str(path)!r}",
        CatalogError,
        "write it as `hardware: {NAME: {price_per_hour: P}}`",
    )
