"""Calibrating profiles from a router's measurements: the metrics it exports, the arithmetic, the command."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray
from prometheus_client import generate_latest

from inferline.adapters.base import ModelInfo, ServingConfig, TensorSpec
from inferline.calibration import STOLEN_WARN, LiveStage, calibrate_profiles, live_stages, mean_slowdown, stolen_share
from inferline.cli import main
from inferline.plan import load_plan
from inferline.profiles import load_profile, load_profiles, parse_profile
from inferline.router.core import PipelineRouter, Replica
from inferline.spec import parse_spec

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
PROFILES = EXAMPLES / "profiles" / "measured-cpu"
CATALOG = EXAMPLES / "catalog-local.yaml"
EMULATED = EXAMPLES / "pipelines" / "local-emulated.yaml"
CALL_S = 0.002

Tensors = dict[str, NDArray[np.generic]]
MODELS = {
    "a": ((TensorSpec("INPUT", "float32", (4,)),), (TensorSpec("FEAT", "float32", (4,)),)),
    "b": ((TensorSpec("FEAT", "float32", (4,)),), (TensorSpec("OUT", "float32", (2,)),)),
}
SPEC = parse_spec(
    {
        "name": "p",
        "slo_ms": 100,
        "stages": [{"name": "a", "model": "a"}, {"name": "b", "model": "b", "after": ["a"], "probability": 1.0}],
    }
)


def outputs(model: str, inputs: Mapping[str, NDArray[np.generic]]) -> Tensors:
    """Model "a"'s or "b"'s outputs (zeros) for a batch of `inputs`."""
    n = next(iter(inputs.values())).shape[0]
    name, width = ("FEAT", 4) if model == "a" else ("OUT", 2)
    return {name: np.zeros((n, width), np.float32)}


class SleepingServer:
    """A stand-in model server whose every call takes `delay_s` (the GIL released, as a real call)."""

    def __init__(self, delay_s: float = CALL_S) -> None:
        self.delay_s = delay_s

    def model_info(self, model: str) -> ModelInfo:
        inputs, outputs = MODELS[model]
        return ModelInfo(model, True, ServingConfig(8, 1), inputs, outputs)

    def close(self) -> None:
        pass

    def infer(self, model: str, inputs: Mapping[str, NDArray[np.generic]]) -> Tensors:
        time.sleep(self.delay_s)
        return outputs(model, inputs)


def test_router_exports_call_and_dispatch_times_that_calibration_reads() -> None:
    pools = {s: [Replica(SleepingServer(), s, f"{s}-0")] for s in ("a", "b")}
    router = PipelineRouter(SPEC, pools, {"a": 4, "b": 4}).start()  # type: ignore[arg-type]
    try:
        futures = [router.submit({"INPUT": np.zeros((1, 4), np.float32)}) for _ in range(200)]
        for f in futures:
            f.result(timeout=30)
        text = generate_latest(router.metrics_registry).decode()
        live = live_stages(text)
        batches = router.batch_sizes()
        dispatch = router.dispatch_ms()
    finally:
        router.stop()
    assert set(live) == {"a", "b"}
    # Every query visits both stages: its time in them (queue waits, and each call once per query
    # in its batch) is most of its latency at the router, and never more (200 queries: a backlog).
    in_stages = [live[s].in_stage_s for s in ("a", "b")]
    assert all(t is not None and t > 200 * CALL_S for t in in_stages)
    latency_s = float(text.split("\ninferline_router_latency_seconds_sum ")[1].split()[0])
    outside_per_query_s = (latency_s - sum(t for t in in_stages if t is not None)) / 200
    assert 0 <= outside_per_query_s < CALL_S
    for stage in ("a", "b"):
        assert {n: c for n, (_, c) in live[stage].calls.items()} == batches[stage]
        assert all(ms >= 1000 * CALL_S for ms, _ in live[stage].calls.values())
        # 200 queries queued at once: the replicas ran back to back, and the router's own work
        # between calls was measured (positive, and short: a loaded machine may stretch it).
        assert live[stage].dispatches > 0
        assert 0 < live[stage].dispatch_ms < 5 * 1000 * CALL_S
        assert live[stage].dispatch_ms == pytest.approx(dispatch[stage])
        # Every call after the replica's first followed either another at once (a dispatch) or an
        # idle spell (a gap): one replica per stage.
        gaps = live[stage].idle_gaps
        assert gaps is not None
        assert sum(gaps.values()) + live[stage].dispatches == sum(batches[stage].values()) - 1
        # The router's own CPU per call (stacking the batch, calling the adapter): some, and far
        # less than the call, which sleeps.
        assert live[stage].router_cpu_ms is not None and 0 < live[stage].router_cpu_ms < 1000 * CALL_S


def test_live_stages_since_an_earlier_reading_counts_only_what_came_after() -> None:
    server = SleepingServer()
    pools = {s: [Replica(server, s, f"{s}-0")] for s in ("a", "b")}
    router = PipelineRouter(SPEC, pools, {"a": 4, "b": 4}).start()  # type: ignore[arg-type]

    def run(queries: int) -> None:
        for f in [router.submit({"INPUT": np.zeros((1, 4), np.float32)}) for _ in range(queries)]:
            f.result(timeout=30)

    try:
        run(120)
        first = generate_latest(router.metrics_registry).decode()
        counts_first = router.batch_sizes()
        server.delay_s = 4 * CALL_S  # the servers slow down between two replays
        run(80)
        second = generate_latest(router.metrics_registry).decode()
        counts_second = router.batch_sizes()
    finally:
        router.stop()
    since = live_stages(second, since=first)
    whole = live_stages(second)
    for stage in ("a", "b"):
        calls = {n: c - counts_first[stage].get(n, 0) for n, c in counts_second[stage].items()}
        assert {n: c for n, (_, c) in since[stage].calls.items()} == {n: c for n, c in calls.items() if c > 0}
        # Only the slow calls: the whole run's means mix in the fast ones.
        assert all(ms >= 4000 * CALL_S for ms, _ in since[stage].calls.values())
        assert min(ms for ms, _ in whole[stage].calls.values()) < 4000 * CALL_S
        assert sum(since[stage].concurrency.values()) == sum(c for _, c in since[stage].calls.values())
        assert since[stage].dispatches < whole[stage].dispatches


def _profile(model: str, means: dict[int, float]) -> object:
    points = [{"batch_size": n, "latency_ms": {"mean": ms, "p99": ms * 1.1}} for n, ms in means.items()]
    return parse_profile({"model": model, "profiles": {"cpu": points}}, "test")


PAIR = parse_spec(
    {
        "name": "pair",
        "slo_ms": 100,
        "stages": [
            {"name": "one", "model": "m"},
            {"name": "two", "model": "m", "after": ["one"]},
            {"name": "three", "model": "n", "after": ["two"]},
        ],
    }
)


def _plan_for(spec: object) -> object:
    from inferline.plan import Plan

    stages = {s.name: {"hardware": "cpu", "max_batch_size": 4, "replicas": 1} for s in spec.stages}  # type: ignore[attr-defined]
    return Plan.model_validate(
        {
            "pipeline": "pair",
            "slo_ms": 100,
            "strategy": "inferline",
            "cost_per_hour": 1.0,
            "estimated_p99_ms": 50.0,
            "feasible": True,
            "stages": stages,
        }
    )


def test_calibration_scales_by_the_call_weighted_ratio_and_adds_the_router_time() -> None:
    profiles = {"m": _profile("m", {1: 10.0, 2: 13.0, 4: 16.0}), "n": _profile("n", {1: 5.0, 4: 8.0})}
    live = {
        # "one" and "two" serve the same model on the same hardware: their calls are pooled.
        "one": LiveStage({1: (12.0, 30)}, dispatch_ms=0.4, dispatches=10),
        "two": LiveStage({4: (19.2, 10)}, dispatch_ms=0.7, dispatches=30),
        "three": LiveStage({1: (9.0, 5)}, dispatch_ms=0.1, dispatches=5),  # too few calls: kept
    }
    out, done = calibrate_profiles(PAIR, _plan_for(PAIR), profiles, live, min_calls=20)  # type: ignore[arg-type]
    ratio = (12.0 * 30 + 19.2 * 10) / (10.0 * 30 + 16.0 * 10)  # 1.2
    dispatch = (0.4 * 10 + 0.7 * 30) / 40  # 0.625
    means = [p.latency_ms.mean for p in out["m"].points("cpu")]
    assert means == pytest.approx([10.0 * ratio + dispatch, 13.0 * ratio + dispatch, 16.0 * ratio + dispatch])
    assert out["m"].points("cpu")[0].latency_ms.p99 == pytest.approx(11.0 * ratio + dispatch)
    assert out["n"] is profiles["n"]
    by_model = {c.model: c for c in done}
    assert by_model["m"].ratio == pytest.approx(ratio)
    assert by_model["m"].calls == 40
    assert by_model["m"].stages == ("one", "two")
    assert by_model["n"].ratio is None


def test_calibrated_profile_records_what_was_done_and_round_trips(tmp_path: Path) -> None:
    from inferline.profiles import write_profile

    profiles = {"m": _profile("m", {1: 10.0, 4: 16.0}), "n": _profile("n", {1: 5.0, 4: 8.0})}
    live = {s: LiveStage({1: (11.0, 50)}, 0.5, 40) for s in ("one", "two", "three")}
    out, _ = calibrate_profiles(PAIR, _plan_for(PAIR), profiles, live)  # type: ignore[arg-type]
    write_profile(out["m"], tmp_path)
    again = load_profile(tmp_path / "m.json")
    assert again.model_extra is not None
    assert again.model_extra["calibration"]["cpu"] == {"ratio": 1.1, "dispatch_ms": 0.5, "calls": 100}
    assert again.points("cpu")[0].latency_ms.mean == pytest.approx(11.5)


METRICS = """\
# TYPE inferline_router_call_seconds summary
inferline_router_call_seconds_count{batch_size="1",stage="detect"} 40.0
inferline_router_call_seconds_sum{batch_size="1",stage="detect"} 0.5
inferline_router_call_seconds_count{batch_size="1",stage="classify"} 30.0
inferline_router_call_seconds_sum{batch_size="1",stage="classify"} 0.24
# TYPE inferline_router_dispatch_seconds summary
inferline_router_dispatch_seconds_count{stage="detect"} 20.0
inferline_router_dispatch_seconds_sum{stage="detect"} 0.008
"""


def _on_a_machine(metrics: str, all_s: float, steal_s: float) -> str:
    """A router's metrics with its machine's CPU since its start (`all_s`, `steal_s` of it)."""
    return metrics + (
        "# TYPE inferline_router_machine_cpu_seconds counter\n"
        f'inferline_router_machine_cpu_seconds_total{{mode="all"}} {all_s}\n'
        f'inferline_router_machine_cpu_seconds_total{{mode="steal"}} {steal_s}\n'
    )


def test_router_exports_its_machines_cpu_time_and_the_steal_among_it() -> None:
    import os

    from inferline.calibration import MACHINE_CPU, _samples

    before = time.monotonic()
    router = PipelineRouter(SPEC, {s: [Replica(SleepingServer(), s, f"{s}-0")] for s in ("a", "b")}, {"a": 4, "b": 4})  # type: ignore[arg-type]
    started = time.monotonic()
    try:
        router.start()
        for f in [router.submit({"INPUT": np.zeros((1, 4), np.float32)}) for _ in range(50)]:
            f.result(timeout=30)
        time.sleep(0.3)
        read_from, text, read_to = time.monotonic(), generate_latest(router.metrics_registry).decode(), time.monotonic()
    finally:
        router.stop()
    cpu = {dict(labels)["mode"]: v for (name, labels), v in _samples(text).items() if name == MACHINE_CPU}
    cores, slack = os.cpu_count() or 1, 0.1
    # All of the machine's time since the router was made: its wall time on every core. /proc/stat counts
    # busy time by whole ticks (short bursts as none or one) and idle time exactly: a few ticks either way.
    # Its busy time alone (the mistake this catches) would fall far below.
    assert (read_from - started - slack) * cores <= cpu["all"] <= (read_to - before + slack) * cores
    assert 0.0 <= cpu["steal"] <= cpu["all"]
    share = stolen_share(text)
    assert share is not None and share == pytest.approx(cpu["steal"] / cpu["all"])


def test_stolen_share_is_read_over_the_same_readings_as_the_calls() -> None:
    later = _on_a_machine(METRICS, all_s=100.0, steal_s=5.0)
    assert stolen_share(later) == pytest.approx(0.05)
    assert stolen_share(later, since=_on_a_machine("", all_s=60.0, steal_s=1.0)) == pytest.approx(4.0 / 40.0)
    assert stolen_share(later, since=_on_a_machine("", all_s=100.0, steal_s=5.0)) is None  # no time between
    assert stolen_share(METRICS) is None  # a router that does not count it
    # A router restarted since the earlier reading: its counts went down, and are taken whole.
    assert stolen_share(later, since=_on_a_machine("", all_s=500.0, steal_s=1.0)) == pytest.approx(0.05)


@pytest.fixture
def emulated_plan(tmp_path: Path) -> Path:
    plan = tmp_path / "plan.json"
    argv = ["plan", str(EMULATED), "--profiles", str(PROFILES), "--hardware", str(CATALOG)]
    assert main([*argv, "--trace", "gamma:rate=50,cv=1,duration=20,seed=1", "--out", str(plan)]) == 0
    return plan


def test_calibrate_command_writes_every_profile_and_plans_with_them(
    emulated_plan: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    metrics = tmp_path / "metrics.txt"
    metrics.write_text(METRICS)
    out = tmp_path / "calibrated"
    assert main(["calibrate", str(emulated_plan), "--metrics", str(metrics), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "emulated-detector" in printed and "emulated-classifier" in printed
    before, after = load_profiles(PROFILES), load_profiles(out)
    assert set(after) == set(before)  # a complete profile directory, ready for `inferline plan`
    detect_before = before["emulated-detector"].points("cpu")[0].latency_ms.mean
    ratio = 12.5 / detect_before  # 40 calls of 12.5 ms at batch 1
    assert after["emulated-detector"].points("cpu")[0].latency_ms.mean == pytest.approx(detect_before * ratio + 0.4)
    assert after["preprocess"] == before["preprocess"]
    replanned = tmp_path / "replanned.json"
    argv = ["plan", str(EMULATED), "--profiles", str(out), "--hardware", str(CATALOG)]
    assert main([*argv, "--trace", "gamma:rate=50,cv=1,duration=20,seed=1", "--out", str(replanned)]) == 0
    assert load_plan(replanned).estimated_p99_ms > load_plan(emulated_plan).estimated_p99_ms


@pytest.mark.parametrize(("steal_s", "said"), [(1.0, False), (100 * STOLEN_WARN, True), (10.0, True)])
def test_calibrate_says_when_the_hypervisor_took_the_machines_cpu_during_the_calls(
    emulated_plan: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], steal_s: float, said: bool
) -> None:
    metrics = tmp_path / "metrics.txt"
    metrics.write_text(_on_a_machine(METRICS, all_s=100.0, steal_s=steal_s))
    out = tmp_path / "calibrated"
    assert main(["calibrate", str(emulated_plan), "--metrics", str(metrics), "--out", str(out)]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert ("the hypervisor gave" in printed) is said
    if said:
        assert f"gave {steal_s:.1f}% of this machine's CPU to others while these calls were measured" in printed
    assert load_profiles(out)  # written either way: a machine that is always this busy is measured as it is


def test_calibrate_since_an_earlier_reading_uses_only_the_calls_after_it(emulated_plan: Path, tmp_path: Path) -> None:
    earlier = tmp_path / "before.txt"
    earlier.write_text(METRICS.replace(" 40.0", " 20.0").replace(" 0.5", " 0.1"))  # 20 calls of 5 ms
    later = tmp_path / "after.txt"
    later.write_text(METRICS)  # 40 calls of 12.5 ms in all: the 20 after the earlier reading took 20 ms each
    out = tmp_path / "calibrated"
    argv = ["calibrate", str(emulated_plan), "--metrics", str(later), "--since", str(earlier), "--out", str(out)]
    assert main(argv) == 0
    profiled = load_profiles(PROFILES)["emulated-detector"].points("cpu")[0].latency_ms.mean
    # Dispatch times held still (20 in both readings): none measured in between, so no router time added.
    assert load_profiles(out)["emulated-detector"].points("cpu")[0].latency_ms.mean == pytest.approx(20.0)
    assert profiled != pytest.approx(20.0)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("out-is-source", "is the profile directory itself"),
        ("no-metrics-file", "cannot read metrics file"),
        ("too-few-calls", "fewer than 20 calls for every stage"),
        ("unreachable", "cannot read metrics from http://127.0.0.1:9/metrics"),
        ("nothing-up", "nothing is running from"),
        ("not-metrics", "not a router's Prometheus text"),
        ("profiles-lack-a-model", "model 'emulated-detector' has no profile"),
        ("cores-not-positive", "--cores must be positive, got 0"),
        ("max-stolen-not-a-share", "--max-stolen must be a fraction from 0 to 1, got 5"),
        ("too-much-stolen", "the hypervisor gave 10.0% of this machine's CPU to others"),
        ("negative-sum", 'inferline_router_call_seconds_sum{batch_size="1",stage="detect"} = -1, which no router'),
        ("nan-sum", "= nan, which no router writes"),
        ("infinite-count", "= inf, which no router writes"),
        ("binary-metrics", "is not UTF-8 text"),
    ],
)
def test_calibrate_bad_input_is_one_line(
    emulated_plan: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, message: str
) -> None:
    metrics = tmp_path / "metrics.txt"
    metrics.write_text(METRICS.replace("40.0", "4.0").replace("30.0", "3.0"))
    garbage = tmp_path / "garbage.txt"
    garbage.write_text("hello world\n")
    stolen = tmp_path / "stolen.txt"
    stolen.write_text(_on_a_machine(METRICS, all_s=100.0, steal_s=10.0))
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "emulated-classifier.json").write_text((PROFILES / "emulated-classifier.json").read_text())
    edited = {}
    for name, (old, new) in {
        "negative-sum": ('stage="detect"} 0.5', 'stage="detect"} -1'),
        "nan-sum": ('stage="detect"} 0.5', 'stage="detect"} NaN'),
        "infinite-count": ('stage="classify"} 0.24', 'stage="classify"} +Inf'),
    }.items():
        assert old in METRICS
        edited[name] = tmp_path / f"{name}.txt"
        edited[name].write_text(METRICS.replace(old, new, 1))
    binary = tmp_path / "binary.txt"
    binary.write_bytes(bytes(range(256)))
    out = str(tmp_path / "out")
    argv = {
        "out-is-source": ["--metrics", str(metrics), "--out", str(PROFILES)],
        "no-metrics-file": ["--metrics", str(tmp_path / "missing.txt"), "--out", out],
        "too-few-calls": ["--metrics", str(metrics), "--out", out],
        "unreachable": ["--metrics", "http://127.0.0.1:9/metrics", "--out", out],
        "nothing-up": ["--state-dir", str(tmp_path / "nothing"), "--out", out],
        "not-metrics": ["--metrics", str(garbage), "--out", out],
        "profiles-lack-a-model": ["--metrics", str(metrics), "--profiles", str(partial), "--out", out],
        "cores-not-positive": ["--metrics", str(metrics), "--cores", "0", "--out", out],
        "max-stolen-not-a-share": ["--metrics", str(metrics), "--max-stolen", "5", "--out", out],
        "too-much-stolen": ["--metrics", str(stolen), "--max-stolen", "0.05", "--out", out],
        "binary-metrics": ["--metrics", str(binary), "--out", out],
        **{name: ["--metrics", str(path), "--out", out] for name, path in edited.items()},
    }[case]
    assert main(["calibrate", str(emulated_plan), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not Path(out).exists()
    assert load_profiles(PROFILES)  # the source profiles are untouched


def _cpu_profile(model: str, means: dict[int, float], share: float) -> object:
    points = [{"batch_size": n, "latency_ms": {"mean": ms, "server_cpu_ms": share * ms}} for n, ms in means.items()]
    return parse_profile({"model": model, "profiles": {"cpu": points}}, "test")


@pytest.mark.parametrize(
    ("under_way", "share", "mean_share", "cores", "expected"),
    [
        ({1: 10, 2: 10}, 1.0, 1.0, 2.0, 1.0),  # never more calls than cores
        ({4: 10}, 1.0, 1.0, 2.0, 2.0),  # four compute-bound calls on two cores: each at half speed
        ({3: 10, 1: 10}, 1.0, 1.0, 2.0, (1.5 + 1.0) / 2),
        ({4: 10}, 0.1, 0.1, 2.0, 1.0),  # calls that mostly wait do not fill the cores
        ({4: 10}, 0.5, 1.0, 2.0, 1.0 + 0.5 * ((0.5 + 3.0) / 2.0 - 1.0)),  # only its own share slows
        ({}, 1.0, 1.0, 2.0, 1.0),
    ],
)
def test_mean_slowdown_follows_the_sharing_rule(
    under_way: dict[float, int], share: float, mean_share: float, cores: float, expected: float
) -> None:
    assert mean_slowdown(under_way, share, mean_share, cores) == pytest.approx(expected)


def test_calibration_takes_out_the_slowdown_of_shared_cores() -> None:
    profiles = {"m": _cpu_profile("m", {1: 10.0, 4: 16.0}, 1.0), "n": _cpu_profile("n", {1: 5.0, 4: 8.0}, 1.0)}
    # Every call of every stage started with 4 calls under way: on 2 cores each ran at half speed.
    live = {s: LiveStage({1: (20.0, 50)}, 0.5, 40, concurrency={4.0: 50}) for s in ("one", "two", "three")}
    plan = _plan_for(PAIR)
    plain, plain_done = calibrate_profiles(PAIR, plan, profiles, live)  # type: ignore[arg-type]
    shared, done = calibrate_profiles(PAIR, plan, profiles, live, cores=2.0)  # type: ignore[arg-type]
    assert [c.contention for c in plain_done] == [1.0, 1.0]
    assert [c.contention for c in done] == pytest.approx([2.0, 2.0])
    assert [c.ratio for c in done] == [c.ratio for c in plain_done]  # what was measured is reported as is
    point, plain_point = shared["m"].points("cpu")[0].latency_ms, plain["m"].points("cpu")[0].latency_ms
    assert plain_point.mean == pytest.approx(20.0 + 0.5)
    assert point.mean == pytest.approx(10.0 + 0.5)  # ratio 2 / slowdown 2, plus the router's time
    assert point.server_cpu_ms == pytest.approx(10.0)  # the share of a call on a core stays as profiled
    assert (shared["m"].model_extra or {})["calibration"]["cpu"]["contention"] == 2.0
    # With more cores than calls under way there is nothing to take out.
    roomy, _ = calibrate_profiles(PAIR, plan, profiles, live, cores=4.0)  # type: ignore[arg-type]
    assert roomy["m"].points("cpu")[0].latency_ms.mean == pytest.approx(plain_point.mean)


def test_calls_that_mostly_wait_are_not_taken_for_contention() -> None:
    waiting = {"m": _cpu_profile("m", {1: 10.0, 4: 16.0}, 0.1), "n": _cpu_profile("n", {1: 5.0, 4: 8.0}, 0.1)}
    live = {s: LiveStage({1: (12.0, 50)}, 0.0, 0, concurrency={4.0: 50}) for s in ("one", "two", "three")}
    out, done = calibrate_profiles(PAIR, _plan_for(PAIR), waiting, live, cores=2.0)  # type: ignore[arg-type]
    assert [c.contention for c in done] == [1.0, 1.0]
    assert out["m"].points("cpu")[0].latency_ms.mean == pytest.approx(12.0)


def test_live_stages_reads_the_concurrency_histogram() -> None:
    text = METRICS + (
        "# TYPE inferline_router_concurrent_calls histogram\n"
        'inferline_router_concurrent_calls_bucket{le="1.0",stage="detect"} 5.0\n'
        'inferline_router_concurrent_calls_bucket{le="2.0",stage="detect"} 12.0\n'
        'inferline_router_concurrent_calls_bucket{le="3.0",stage="detect"} 12.0\n'
        'inferline_router_concurrent_calls_bucket{le="6.0",stage="detect"} 15.0\n'
        'inferline_router_concurrent_calls_bucket{le="+Inf",stage="detect"} 16.0\n'
        'inferline_router_concurrent_calls_count{stage="detect"} 16.0\n'
        'inferline_router_concurrent_calls_sum{stage="detect"} 57.0\n'
    )
    live = live_stages(text)
    # Finite buckets at their bound (5 x 1 + 7 x 2 + 3 x 6 = 37); the one call above 6 had the rest: 20.
    assert dict(live["detect"].concurrency) == {1.0: 5, 2.0: 7, 6.0: 3, 20.0: 1}
    assert dict(live["classify"].concurrency) == {}


def test_the_calls_beside_a_call_are_weighted_by_how_long_they_are_under_way() -> None:
    # m: 1 ms calls on a core; n: 100 ms calls that mostly wait (share 0.1), as many calls each. A call
    # of m that finds 3 calls under way finds mostly n's (it is under way 100 times as long).
    profiles = {"m": _cpu_profile("m", {1: 1.0, 4: 2.0}, 1.0), "n": _cpu_profile("n", {1: 100.0, 4: 110.0}, 0.1)}
    live = {
        "one": LiveStage({1: (1.0, 50)}, 0.0, 0, concurrency={3.0: 50}),
        "two": LiveStage({1: (1.0, 50)}, 0.0, 0, concurrency={3.0: 50}),
        "three": LiveStage({1: (100.0, 100)}, 0.0, 0, concurrency={3.0: 100}),
    }
    _, done = calibrate_profiles(PAIR, _plan_for(PAIR), profiles, live, cores=1.0)  # type: ignore[arg-type]
    mean_share = (1.0 * 100 * 1.0 + 0.1 * 100 * 100.0) / (100 * 1.0 + 100 * 100.0)
    by_model = {c.model: c.contention for c in done}
    assert by_model["m"] == pytest.approx(mean_slowdown({3.0: 100}, 1.0, mean_share, 1.0))
    assert by_model["m"] == pytest.approx(1.0 + 1.0 * (1.0 + 2 * mean_share - 1.0))


def test_a_router_restarted_between_two_readings_is_read_from_its_restart() -> None:
    # Earlier: 100 detect calls of 10 ms. After a restart the counters start again: 40 calls of 12.5 ms.
    earlier = METRICS.replace(" 40.0", " 100.0").replace("} 0.5\n", "} 1.0\n")
    after_restart = live_stages(METRICS, since=earlier)
    assert after_restart == live_stages(METRICS)
    assert dict(after_restart["detect"].calls) == {1: (pytest.approx(12.5), 40)}
    # A later reading of the same router: only the difference.
    later = METRICS.replace(" 40.0", " 140.0").replace("} 0.5\n", "} 2.0\n")
    assert dict(live_stages(later, since=earlier)["detect"].calls) == {1: (pytest.approx(25.0), 40)}
    # A counter created anew (its _created time changed) is a restart too, even where it grew.
    created = "inferline_router_queries_created 100.0\n"
    grown = later + created.replace("100.0", "200.0")
    assert live_stages(grown, since=earlier + created) == live_stages(grown)
