"""Profiles calibrated from a running pipeline: the service times its router measured.

An offline profile times one model alone, one call at a time. Live, a stage's queue waits longer
per batch: the call as the router sees it (other replicas and processes share the machine), and
the router's own work between two calls of a replica (handing results on, forming the next
batch). The estimator predicts only as well as its service times, so calibration rewrites each
planned model's profile from the router's metrics:

    calibrated(n) = profiled(n) * r + d
    r = sum_n calls(n) * live(n) / sum_n calls(n) * profiled(n)   over the batch sizes the router sent
    d = mean time between back-to-back calls of a replica        (inferline_router_dispatch_seconds)

One ratio per model and hardware keeps the profile's shape (its batching gain) at sizes live
traffic never reached, and a size seen a few times weighs only as much as its calls.

Where the replicas shared a machine's cores (`cores`), a call measured live was also slowed by the
calls running beside it. Calibrating that into the profile would count it twice once the
prediction shares the cores itself (`planner/shared_cores.py`), so the call part is divided by
the stage's mean slowdown c under the same sharing rule:

    calibrated(n) = profiled(n) * r / c + d,   c = live seconds / the same seconds' work by the rule

the work of a second with k calls under way being 1 / (1 + u * (max(max(1, D / cores), 1 + g * (D - u))
- 1)), where u is the model's share of a call spent on a core (its profile's server CPU time; 1 where
not measured), D the cores the calls under way demanded (k calls at the pipeline's mean share) and g
the model's interference (`inferline/interference.py`), fitted to the same calls and recorded in the
calibrated profile (where they cannot tell, the profile's stays). The router keeps each call's seconds
at each count (inferline_router_crowded_call_seconds); from a router without them, c is the mean of
the rule's slowdown at the count each call started with (inferline_router_concurrent_calls).
The profile's CPU time is scaled by r / c with the call part, so its share of a call stays as
profiled, apart from d (router time, in which the server computes nothing).

Where the profile has an `after_idle` term (extra e, time constant tau), the live calls also hold
what idle gaps added, which the prediction adds itself from the gaps it simulates (slowed by the
sharing like the rest of the call). So that part is taken out of the live call time before r is
formed, from the router's histogram of the gaps before the calls that followed an idle spell
(inferline_router_idle_gap_seconds, a bucket's gaps at its bounds' geometric mean, the last
bucket's as long; back-to-back calls have none, as in the estimator):

    r = (live total - c * e * sum over those calls of (1 - exp(-gap / tau))) / profiled total

and the term is kept. Metrics without that histogram (a router from before it) leave the live means
as they are, and the calibrated hardware then keeps no term: it would count the wake-ups twice.
"""

from __future__ import annotations

import math
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from inferline.errors import InferlineError
from inferline.interference import CrowdedCalls, InterferenceFit, crowding_slowdown, fit_interference
from inferline.plan import Plan
from inferline.planner.kernel import after_idle_s
from inferline.planner.shared_cores import call_slowdown
from inferline.process_cpu import MachineCpu
from inferline.profiles import BatchPoint, LatencyStats, ModelProfile
from inferline.spec import PipelineSpec

MIN_CALLS = 20
"""Calls a model needs in the metrics before its profile is calibrated (fewer say too little)."""
STOLEN_WARN = 0.02
"""The share of a machine's CPU its hypervisor may give to others while a pipeline is measured before
the measurements are flagged as slower than the machine's own speed. On the bench's 2-core VM,
cascade replays with 4-14% taken measured a P99 of 138-192 ms, quiet ones (0.7-1.7%) 88-100 ms."""
CROWDED = ("inferline_router_crowded_calls_total", "inferline_router_crowded_call_seconds_total")
"""The router's answered calls grouped by their mean count of calls under way, and the seconds they
spent at each count (`router/crowding.py`)."""
MAX_METRIC_VALUE = 1e15
"""The largest value a router's sample may hold (counts and seconds of years of traffic fit)."""
MACHINE_CPU = "inferline_router_machine_cpu_seconds_total"
"""The router's count of its machine's CPU time since it started, by mode: all, and steal."""


@dataclass(frozen=True)
class LiveStage:
    """What a router measured for one stage."""

    calls: Mapping[int, tuple[float, int]]
    """Batch size -> (mean call ms, number of calls)."""
    dispatch_ms: float
    """Mean router time between back-to-back calls (0 when never back to back)."""
    dispatches: int
    concurrency: Mapping[float, int] = field(default_factory=dict)
    """Calls under way in the pipeline when a call of this stage started -> how many calls (a
    histogram: the bucket's upper bound where a bucket spans more than one count)."""
    idle_gaps: Mapping[float, int] | None = None
    """Seconds a replica sat idle before a call -> how many calls (a histogram: a bucket at its
    bounds' geometric mean, its lower bound 0 at half the upper, the last at inf); back-to-back
    calls are not in it. None: the metrics do not have it."""
    router_cpu_ms: float | None = None
    """Mean CPU ms per call of the router's own work on the stage's calls (forming the request,
    reading the answer: inferline_router_replica_cpu_seconds); None: the metrics do not have it."""
    crowded: Mapping[tuple[float, bool], tuple[int, Mapping[int, float]]] = field(default_factory=dict)
    """The stage's answered calls grouped by their mean count of calls under way in the pipeline and
    whether the replica sat idle before them -> (calls, count under way -> seconds they spent with
    it): how crowding slowed them (`router/crowding.py`, `inferline/interference.py`). Empty: not in the metrics."""
    queue_wait_s: float | None = None
    """Seconds its queries waited in its queue, all together (inferline_router_queue_wait_seconds);
    None: the metrics do not have it."""

    @property
    def call_count(self) -> int:
        return sum(c for _, c in self.calls.values())

    @property
    def in_stage_s(self) -> float | None:
        """Seconds its queries spent in it, all together: waiting in its queue and in its calls (a
        call counts once for each query in its batch); None where the queue waits are not measured."""
        if self.queue_wait_s is None:
            return None
        return self.queue_wait_s + sum(n * mean_ms * count for n, (mean_ms, count) in self.calls.items()) / 1000.0


@dataclass(frozen=True)
class Calibration:
    model: str
    hardware: str
    stages: tuple[str, ...]
    calls: int
    ratio: float | None
    """Live over profiled call time; None when too few calls to calibrate."""
    dispatch_ms: float
    contention: float = 1.0
    """Mean slowdown of the live calls by calls beside them on shared cores (1: none, or not asked)."""
    woken_ms: float = 0.0
    """Mean latency per call that idle gaps added (the profile's after_idle term), taken out of r."""
    interference_fit: InterferenceFit | None = None
    """The model's interference fitted to its crowded calls (None: not asked, or they cannot tell)."""


def read_metrics(source: str) -> str:
    """A router's Prometheus text from its /metrics URL or from a file saved from it."""
    if source.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(source, timeout=10) as response:
                return str(response.read().decode())
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise InferlineError(f"cannot read metrics from {source} ({reason})", "is the pipeline up?") from None
    try:
        return Path(source).read_text()
    except OSError as exc:
        raise InferlineError(f"cannot read metrics file {source!r}: {exc.strerror}", "check the path") from None
    except UnicodeDecodeError:
        raise InferlineError(f"metrics file {source!r} is not UTF-8 text", "pass the router's saved /metrics") from None


def live_stages(metrics_text: str, since: str | None = None) -> dict[str, LiveStage]:
    """Per stage, the call and dispatch times in a router's Prometheus text (its /metrics).

    The router's counters run from its start; `since`, an earlier reading of the same router's
    metrics, limits them to what it measured between the two readings (one replay's worth). If the
    router restarted in between (its counters were created anew or went down), the later reading
    holds only what came after the restart and is taken whole.
    """
    window = _between(metrics_text, since)
    sums: dict[tuple[str, str, int], float] = {}
    buckets: dict[str, list[tuple[float, float]]] = {}
    gap_buckets: dict[str, list[tuple[float, float]]] = {}
    under_way_sum: dict[str, float] = {}
    router_cpu_s: dict[str, float] = {}
    crowded_calls: dict[str, dict[tuple[float, bool], int]] = {}
    crowded_seconds: dict[str, dict[tuple[float, bool], dict[int, float]]] = {}
    queue_wait_s: dict[str, float] = {}
    try:
        for (name, labels), value in window.items():
            kind = name.rsplit("_", 1)[-1]
            label = dict(labels)
            stage = label.get("stage")
            if stage is not None and name == "inferline_router_replica_cpu_seconds_total":
                router_cpu_s[stage] = value
            if stage is not None and name == "inferline_router_concurrent_calls_bucket":
                buckets.setdefault(stage, []).append((float(label["le"]), value))
            if stage is not None and name == "inferline_router_idle_gap_seconds_bucket":
                gap_buckets.setdefault(stage, []).append((float(label["le"]), value))
            if stage is not None and name in CROWDED:
                key = (float(label["mean_under_way"]), label.get("after_idle", "true") == "true")
                if name == CROWDED[0]:
                    crowded_calls.setdefault(stage, {})[key] = int(value)
                else:
                    crowded_seconds.setdefault(stage, {}).setdefault(key, {})[int(label["under_way"])] = value
            if stage is None or kind not in ("sum", "count"):
                continue
            if name.startswith("inferline_router_call_seconds_"):
                sums[(f"call_{kind}", stage, int(label["batch_size"]))] = value
            elif name.startswith("inferline_router_dispatch_seconds_"):
                sums[(f"dispatch_{kind}", stage, 0)] = value
            elif name == "inferline_router_concurrent_calls_sum":
                under_way_sum[stage] = value
            elif name == "inferline_router_queue_wait_seconds_sum":
                queue_wait_s[stage] = value
    except (ValueError, KeyError) as exc:
        raise InferlineError(
            f"the metrics are not a router's Prometheus text ({exc})", "pass the router's /metrics"
        ) from None
    out: dict[str, LiveStage] = {}
    for stage in sorted({s for _, s, _ in sums}):
        calls = {
            n: (1000.0 * sums[("call_sum", s, n)] / count, int(count))
            for (kind, s, n), count in sorted(sums.items())
            if s == stage and kind == "call_count" and count > 0
        }
        dispatches = int(sums.get(("dispatch_count", stage, 0), 0.0))
        dispatch_ms = 1000.0 * sums.get(("dispatch_sum", stage, 0), 0.0) / dispatches if dispatches else 0.0
        histogram = _histogram(buckets.get(stage, []), under_way_sum.get(stage, 0.0))
        measured = LiveStage(calls, dispatch_ms, dispatches, histogram)
        gaps = _gap_histogram(gap_buckets[stage]) if stage in gap_buckets else None
        count = measured.call_count
        cpu_ms = 1000.0 * router_cpu_s[stage] / count if stage in router_cpu_s and count else None
        seconds_at = crowded_seconds.get(stage, {})
        groups = {k: (n, seconds_at.get(k, {})) for k, n in crowded_calls.get(stage, {}).items() if n > 0}
        out[stage] = replace(
            measured, idle_gaps=gaps, router_cpu_ms=cpu_ms, crowded=groups, queue_wait_s=queue_wait_s.get(stage)
        )
    return out


def stolen_share(metrics_text: str, since: str | None = None) -> float | None:
    """The share of the router's machine's CPU time that its hypervisor gave to others over the same
    readings as `live_stages` (None: the metrics do not count it, or no time passed). Calls measured
    while it was high ran slower than the machine's own speed."""
    window = _between(metrics_text, since)
    cpu = {dict(labels).get("mode"): v for (name, labels), v in window.items() if name == MACHINE_CPU}
    if "all" not in cpu or "steal" not in cpu:
        return None
    return MachineCpu(steal_s=cpu["steal"], all_s=cpu["all"]).stolen_since(MachineCpu(steal_s=0.0, all_s=0.0))


def hypervisor_took(share: float | None, during: str) -> str | None:
    """What to tell a user of measurements during which the machine's hypervisor took `share` of its
    CPU (None under `STOLEN_WARN`, or not known): they ran slower than the machine's own speed."""
    if share is None or share < STOLEN_WARN:
        return None
    return f"the hypervisor gave {share:.1%} of this machine's CPU to others {during}"


def _between(metrics_text: str, since: str | None) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a router's Prometheus text less its value in `since` (an earlier reading of
    the same router), or whole where there is none or the router restarted in between."""
    earlier = _samples(since) if since is not None else {}
    later = _samples(metrics_text)
    if _restarted(earlier, later):
        earlier = {}
    return {key: total - earlier.get(key, 0.0) for key, total in later.items()}


def _restarted(
    earlier: Mapping[tuple[str, frozenset[tuple[str, str]]], float],
    later: Mapping[tuple[str, frozenset[tuple[str, str]]], float],
) -> bool:
    """Whether a counter of the earlier reading was created anew or went down in the later one."""
    for key, value in earlier.items():
        name = key[0]
        if key not in later:
            continue
        if name.endswith("_created") and later[key] != value:
            return True
        if name.endswith(("_total", "_count", "_sum", "_bucket")) and later[key] < value:
            return True
    return False


def _samples(metrics_text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text: (name, labels) -> value."""
    try:
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError:
        raise InferlineError(
            "reading router metrics needs prometheus-client", "pip install 'inferline[router]'"
        ) from None
    try:
        samples = {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(metrics_text)
            for s in family.samples
        }
    except ValueError as exc:
        raise InferlineError(
            f"the metrics are not a router's Prometheus text ({exc})", "pass the router's /metrics"
        ) from None
    for (name, labels), value in samples.items():
        # The router's counters, sums and gauges are finite and never negative; any other value was
        # edited in, and calibrating from it would write a profile of nonsense or fail midway.
        if name.startswith("inferline_router_") and not 0.0 <= value <= MAX_METRIC_VALUE:
            shown = ",".join(f'{k}="{v}"' for k, v in sorted(labels))
            raise InferlineError(
                f"the metrics hold {name}{{{shown}}} = {value:g}, which no router writes",
                "pass the router's /metrics as it served them",
            )
    return samples


def replica_cpu_s(metrics_text: str) -> float | None:
    """CPU seconds the router's replicas spent serving batches, all stages (None: not in the text)."""
    from prometheus_client.parser import text_string_to_metric_families

    families = [
        f for f in text_string_to_metric_families(metrics_text) if f.name == "inferline_router_replica_cpu_seconds"
    ]
    if not families:
        return None
    # Before the first call the family has no samples yet: no CPU spent.
    return sum(s.value for f in families for s in f.samples if s.name == "inferline_router_replica_cpu_seconds_total")


def _gap_histogram(cumulative: list[tuple[float, float]]) -> dict[float, int]:
    """Calls per gap from Prometheus' cumulative buckets, each bucket's at its bounds' geometric mean
    (the first's at half its upper bound, the +Inf bucket's at inf)."""
    out: dict[float, int] = {}
    below, lower = 0.0, 0.0
    for bound, count in sorted(cumulative):
        n = int(count - below)
        if n > 0:
            at = math.inf if bound == math.inf else (math.sqrt(lower * bound) if lower > 0 else bound / 2)
            out[at] = out.get(at, 0) + n
        below, lower = count, bound
    return out


def woken_ms(gaps: Mapping[float, int], extra_ms: float, tau_ms: float) -> float:
    """What idle gaps added to these calls in all, in ms, by the after-idle term (extra, tau)."""
    return 1000.0 * sum(count * after_idle_s(gap, extra_ms / 1000.0, tau_ms / 1000.0) for gap, count in gaps.items())


def _histogram(cumulative: list[tuple[float, float]], total: float) -> dict[float, int]:
    """Counts per value from Prometheus' cumulative buckets: a finite bucket's at its upper bound (the
    router's buckets are every count up to 16), the +Inf bucket's at the mean the histogram's sum
    leaves for it (`total`: the sum of all observations)."""
    out: dict[float, int] = {}
    below, last, finite_sum = 0.0, 0.0, 0.0
    for bound, count in sorted(cumulative):
        n = count - below
        if n > 0:
            if bound == float("inf"):
                out[max(last + 1.0, (total - finite_sum) / n)] = int(n)
            else:
                out[bound] = int(n)
                finite_sum += bound * n
        below, last = count, bound if bound != float("inf") else last
    return out


def calibrate_profiles(
    spec: PipelineSpec,
    plan: Plan,
    profiles: Mapping[str, ModelProfile],
    live: Mapping[str, LiveStage],
    min_calls: int = MIN_CALLS,
    cores: float | None = None,
) -> tuple[dict[str, ModelProfile], tuple[Calibration, ...]]:
    """The profiles with each planned model's hardware calibrated; what was done, per model and hardware.

    Stages serving the same model on the same hardware pool their calls. Models with fewer than
    `min_calls` calls keep their profile (reported with ratio None). With `cores`, the replicas
    shared that many cores in the run, and the slowdown that caused is taken out (module doc).
    """
    groups, shares, mean_share = _groups_and_shares(spec, plan, profiles, live)
    out = dict(profiles)
    done = []
    for (model, hardware), stages in groups.items():
        profile = out[model]
        points = profile.points(hardware)
        sizes = np.array([p.batch_size for p in points], dtype=np.float64)
        means = np.array([p.latency_ms.mean for p in points], dtype=np.float64)
        observed = [(n, ms, c) for s in stages if s in live for n, (ms, c) in live[s].calls.items()]
        calls = sum(c for _, _, c in observed)
        dispatches = sum(live[s].dispatches for s in stages if s in live)
        dispatch_ms = (
            sum(live[s].dispatch_ms * live[s].dispatches for s in stages if s in live) / dispatches
            if dispatches
            else 0.0
        )
        if calls < min_calls:
            done.append(Calibration(model, hardware, tuple(stages), calls, None, dispatch_ms))
            continue
        live_total = sum(ms * c for _, ms, c in observed)
        profiled_total = sum(float(np.interp(n, sizes, means)) * c for n, _, c in observed)
        contention, fit = 1.0, None
        if cores is not None:
            share = shares[(model, hardware)]
            crowded = _crowded_calls(stages, share, live)
            fit = fit_interference(crowded, mean_share, cores)
            if fit is not None:
                profile = profile.model_copy(
                    update={"interference": {**profile.interference, hardware: fit.interference}}
                )
            g = profile.interference.get(hardware, 0.0)
            # Over each call's seconds at each count where the router kept them; else from the count
            # at each call's start (a router from before it).
            over_calls = crowding_slowdown(crowded, mean_share, cores, g)
            contention = (
                over_calls
                if over_calls is not None
                else mean_slowdown(_under_way_at_start(stages, live), share, mean_share, cores, g)
            )
        extra_s, tau_s = profile.after_idle_s(hardware)
        gaps = [live[s].idle_gaps for s in stages if s in live]
        keep_term = all(g is not None for g in gaps)
        woken = sum(woken_ms(g, 1000.0 * extra_s, 1000.0 * tau_s) for g in gaps if g is not None) if keep_term else 0.0
        # Never more than most of the live time: a live run faster than its profile says little of it.
        woken = min(woken, 0.9 * live_total / contention)
        ratio = (live_total - contention * woken) / profiled_total
        out[model] = _scaled(profile, hardware, ratio, dispatch_ms, calls, contention, woken / calls, keep_term)
        done.append(
            Calibration(model, hardware, tuple(stages), calls, ratio, dispatch_ms, contention, woken / calls, fit)
        )
    return out, tuple(done)


def _under_way_at_start(stages: list[str], live: Mapping[str, LiveStage]) -> dict[float, int]:
    """Calls under way as each call of these stages started -> how many calls, pooled."""
    under_way: dict[float, int] = {}
    for s in stages:
        for k, c in (live[s].concurrency if s in live else {}).items():
            under_way[k] = under_way.get(k, 0) + c
    return under_way


def _crowded_calls(stages: list[str], share: float, live: Mapping[str, LiveStage]) -> CrowdedCalls:
    """The crowded calls of stages serving one model on one hardware, pooled."""
    pooled: dict[tuple[float, bool], tuple[int, dict[int, float]]] = {}
    for s in stages:
        for k, (n, seconds_at) in (live[s].crowded if s in live else {}).items():
            calls, at = pooled.get(k, (0, {}))
            pooled[k] = (calls + n, {c: at.get(c, 0.0) + seconds_at.get(c, 0.0) for c in {*at, *seconds_at}})
    return CrowdedCalls(share, pooled)


def _groups_and_shares(
    spec: PipelineSpec, plan: Plan, profiles: Mapping[str, ModelProfile], live: Mapping[str, LiveStage]
) -> tuple[dict[tuple[str, str], list[str]], dict[tuple[str, str], float], float]:
    """The stages of each model and hardware, each group's share of a call on a core, and the
    pipeline's mean share."""
    groups: dict[tuple[str, str], list[str]] = {}
    for stage in spec.stages:
        groups.setdefault(plan.profile_key(stage), []).append(stage.name)
    shares = {key: _cpu_share(profiles[key[0]], key[1], stages, live) for key, stages in groups.items()}
    # The calls found under way beside a call are the pipeline's calls weighted by how long each is
    # under way: by busy time, not by count.
    busy_ms = {k: sum(ms * c for s in ss if s in live for ms, c in live[s].calls.values()) for k, ss in groups.items()}
    mean_share = sum(shares[k] * busy_ms[k] for k in groups) / sum(busy_ms.values()) if any(busy_ms.values()) else 1.0
    return groups, shares, mean_share


def mean_slowdown(
    under_way: Mapping[float, int], share: float, mean_share: float, cores: float, interference: float = 0.0
) -> float:
    """Mean slowdown of calls that started with k calls under way (itself included), by the sharing rule.

    The call itself demands `share` of a core, each of the others the pipeline's `mean_share`.
    """
    total = sum(under_way.values())
    if total == 0:
        return 1.0
    slowed = sum(
        count * call_slowdown(share, interference, share + (k - 1) * mean_share, cores)
        for k, count in under_way.items()
    )
    return slowed / total


def _cpu_share(profile: ModelProfile, hardware: str, stages: list[str], live: Mapping[str, LiveStage]) -> float:
    """The model's share of a call spent on a core, weighted by the live calls per batch size (1 if unmeasured)."""
    biggest = max(profile.batch_sizes(hardware))
    table = profile.cpu_shares(hardware, biggest)
    if table is None:
        return 1.0
    weighted = [(table[min(n, biggest)], c) for s in stages if s in live for n, (_, c) in live[s].calls.items()]
    count = sum(c for _, c in weighted)
    if count == 0:
        return float(table[1:].mean())
    return float(sum(u * c for u, c in weighted) / count)


def calibration_record(profile: ModelProfile) -> Mapping[str, Any]:
    """What calibration applied to a profile, per hardware (empty: an offline profile)."""
    record = (profile.model_extra or {}).get("calibration")
    return record if isinstance(record, dict) else {}


def _scaled(
    profile: ModelProfile,
    hardware: str,
    ratio: float,
    dispatch_ms: float,
    calls: int,
    contention: float,
    woken_per_call_ms: float,
    keep_after_idle: bool,
) -> ModelProfile:
    points = _stretched(profile, hardware, ratio / contention, dispatch_ms)
    record = dict(calibration_record(profile))
    record[hardware] = {"ratio": round(ratio, 4), "dispatch_ms": round(dispatch_ms, 4), "calls": calls}
    if contention != 1.0:
        record[hardware]["contention"] = round(contention, 4)
    if woken_per_call_ms > 0.0:
        record[hardware]["after_idle_ms_per_call"] = round(woken_per_call_ms, 4)
    after_idle = dict(profile.after_idle)
    if not keep_after_idle and after_idle.pop(hardware, None) is not None:
        record[hardware]["after_idle"] = "folded into the means: the metrics have no idle-gap histogram"
    return profile.model_copy(
        update={"profiles": {**profile.profiles, hardware: points}, "after_idle": after_idle, "calibration": record}
    )


def with_router_work_per_call(profile: ModelProfile, hardware: str, router_ms: float) -> ModelProfile:
    """The profile with a router's own CPU work on each call (`router_ms`) in place of the profiler's
    client's, at every batch size (not a calibration).

    A profile timed from a client of its own holds that client's work on each call (its
    `client_cpu_ms`: 0.3-2.0 ms on a 2-core VM), which the router's replaces; where a point has none
    recorded (a profile from before it was), all of the router's work is added. Never shorter than
    profiled: a router cheaper than the profiler's client would be a path nothing here has timed.

    The added time is not the server's CPU, so the calls' share of a core falls. A router's work is
    CPU too, but on its own thread, a slice at each end of the call: counted as CPU over the whole
    call, it made the calls crowd each other on the shared cores for all of their length, and the
    cascade's estimate from the offline profiles rose by 9-12 ms on the same replays (+24% to +32%
    over measured on three quiet ones, against +2% to +15% as it is)."""
    points = _stretched(profile, hardware, 1.0, router_ms, in_place_of_client=True)
    return profile.model_copy(update={"profiles": {**profile.profiles, hardware: points}})


def slower_servers(profile: ModelProfile, hardware: str, factor: float) -> ModelProfile:
    """The profile with every call on `hardware` `factor` times as long, its server CPU time too (a
    slower machine, not a calibration: `inferline/sensitivity.py`)."""
    points = _stretched(profile, hardware, factor, 0.0)
    return profile.model_copy(update={"profiles": {**profile.profiles, hardware: points}})


def _stretched(
    profile: ModelProfile, hardware: str, factor: float, add_ms: float, in_place_of_client: bool = False
) -> tuple[BatchPoint, ...]:
    """The profile's points on `hardware` with latencies times `factor` plus `add_ms`, and its
    measured server CPU times `factor` (the added time is not the server's). `in_place_of_client`:
    `add_ms` is a caller's own work replacing the profiler's client's (`client_cpu_ms`, which the
    points then no longer hold)."""

    def stretched(stats: LatencyStats) -> LatencyStats:
        values = {"mean": stats.mean, "p50": stats.p50, "p99": stats.p99}
        added = max(add_ms - (stats.client_cpu_ms or 0.0), 0.0) if in_place_of_client else add_ms
        changed = {k: None if v is None else v * factor + added for k, v in values.items()}
        cpu = None if stats.server_cpu_ms is None else stats.server_cpu_ms * factor
        client = None if in_place_of_client else stats.client_cpu_ms
        return LatencyStats.model_validate(
            {**stats.model_dump(), **changed, "server_cpu_ms": cpu, "client_cpu_ms": client}
        )

    return tuple(
        BatchPoint(**{**p.model_dump(exclude={"latency_ms"}), "latency_ms": stretched(p.latency_ms)})
        for p in profile.points(hardware)
    )
