"""How far an estimate moves when the servers run a little slower than their profiles.

A P99 estimate is only as good as the service times it is fed, and how much a small error in them
matters depends on the plan: near a queue's capacity, bursts amplify it. On the 2-core bench VM a
fresh load generator's CPU per query (a fixed workload) rose 11% over three back-to-back replays
of the cascade, and the measured P99 rose 34% with it (192, 242, 257 ms), which the estimate from
each run's own service times followed (199, 219, 239 ms). Reporting the estimate's elasticity to
the servers' speed beside it tells a user how much headroom a plan has, and how far apart estimate
and measurement may fall where the machine's speed is not steady.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from inferline.calibration import slower_servers
from inferline.plan import Plan
from inferline.profiles import ModelProfile
from inferline.spec import PipelineSpec

SLOWER_BY = 0.05
"""How much slower the servers are taken to run: a few percent, within one VM's drift over minutes."""


@dataclass(frozen=True)
class Sensitivity:
    slower_by: float
    """Every server's service time (and CPU time) longer by this fraction, at every batch size."""
    estimated_p99_ms: float
    """The estimate with those service times."""
    elasticity: float
    """Relative change of the estimated P99 per relative change of the service times."""

    def record(self) -> dict[str, float]:
        return {
            "servers_slower_by": self.slower_by,
            "estimated_p99_ms": round(self.estimated_p99_ms, 3),
            "elasticity": round(self.elasticity, 3),
        }

    @classmethod
    def from_record(cls, record: Mapping[str, float]) -> Sensitivity:
        return cls(record["servers_slower_by"], record["estimated_p99_ms"], record["elasticity"])

    def line(self) -> str:
        return (
            f"servers {100 * self.slower_by:.0f}% slower: estimated P99 {self.estimated_p99_ms:.1f} ms "
            f"(each 1% slower adds {self.elasticity:.1f}% to it)"
        )


def slower_profiles(
    profiles: Mapping[str, ModelProfile], spec: PipelineSpec, plan: Plan, slower_by: float = SLOWER_BY
) -> dict[str, ModelProfile]:
    """The profiles with every stage's model on its planned hardware `slower_by` slower (a model
    without a profile stays without: the estimate that needs it says so)."""
    out = dict(profiles)
    for model, hardware in {plan.profile_key(s) for s in spec.stages}:
        if model in out:
            out[model] = slower_servers(out[model], hardware, 1.0 + slower_by)
    return out


def sensitivity(estimated_p99_ms: float, slower_p99_ms: float, slower_by: float = SLOWER_BY) -> Sensitivity:
    """The estimate's sensitivity from the estimate and the estimate with servers `slower_by` slower."""
    if not estimated_p99_ms > 0 or not slower_by > 0:
        raise ValueError(f"need a positive estimate and step, got {estimated_p99_ms} and {slower_by}")
    return Sensitivity(slower_by, slower_p99_ms, (slower_p99_ms / estimated_p99_ms - 1.0) / slower_by)
