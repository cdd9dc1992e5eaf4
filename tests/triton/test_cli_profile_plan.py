"""`inferline profile` and `inferline lineage` on a real tritonserver, then `inferline plan` on what they measured."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

from inferline.adapters.base import example_inputs
from inferline.adapters.triton.adapter import TritonAdapter
from inferline.adapters.triton.server import EmbeddedTriton
from inferline.agent.lineage import measure_lineage
from inferline.cli import main
from inferline.spec import parse_spec
from tests.model_repos import EXAMPLES, add_example

ROOT = EXAMPLES.parent.parent
PIPELINE = ROOT / "examples" / "pipelines" / "local-emulated.yaml"
CATALOG = ROOT / "examples" / "catalog-local.yaml"
ROUTED = {
    "name": "routed",
    "stages": [
        {"name": "detect", "model": "emulated-detector"},
        {
            "name": "classify",
            "model": "emulated-classifier",
            "after": ["detect"],
            "probability": 0.9,
            "route": "tests.triton.routes_for_tests:first_above_half",
        },
    ],
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedTriton]:
    repo = tmp_path_factory.mktemp("repo")
    for name in ("emulated-detector", "emulated-classifier"):
        add_example(repo, name)
    with EmbeddedTriton(repo, ["emulated-detector", "emulated-classifier"]) as s:
        yield s


def test_planner_plans_the_bundled_pipeline_from_profiles_measured_on_triton(
    server: EmbeddedTriton, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "profiles"
    code = main([
        "profile", "--server", server.grpc_address, "--models", "emulated-detector,emulated-classifier",
        "--batch-sizes", "1,2,4,8,16", "--hardware", "cpu", "--out", str(out), "--samples", "5", "--warmup", "1",
    ])  # fmt: skip
    assert code == 0
    detector = json.loads((out / "emulated-detector.json").read_text())
    sizes = [p["batch_size"] for p in detector["profiles"]["cpu"]]
    assert sizes == [1, 2, 4, 8, 16]
    capsys.readouterr()
    code = main([
        "plan", str(PIPELINE), "--profiles", str(out), "--hardware", str(CATALOG),
        "--trace", "gamma:rate=150,cv=2,duration=60,seed=3", "--json",
    ])  # fmt: skip
    plan = json.loads(capsys.readouterr().out)
    assert code == 0 and plan["feasible"] and plan["estimated_p99_ms"] <= plan["slo_ms"]
    assert set(plan["stages"]) == {"detect", "classify"}
    for stage in plan["stages"].values():
        assert stage["hardware"] == "cpu" and stage["max_batch_size"] in sizes and stage["replicas"] >= 1
    # 150 qps against a detector whose batch of 1 takes ~10 ms needs batching or replicas.
    detect = plan["stages"]["detect"]
    assert detect["replicas"] * detect["max_batch_size"] > 1


def test_lineage_measures_routed_and_sampled_edges(server: EmbeddedTriton, tmp_path: Path) -> None:
    spec = parse_spec(ROUTED)
    adapter = TritonAdapter(server.grpc_address)
    try:
        measures = {m.stage: m for m in measure_lineage(spec, adapter, samples=120, seed=5)}
        # The detector echoes its (seeded, random) inputs, so the route's true rate is known exactly.
        entry = example_inputs(adapter.model_info("emulated-detector"), 120, seed=5)["INPUT"]
    finally:
        adapter.close()
    assert measures["detect"].reached == measures["detect"].continued == 120
    assert measures["classify"].routed and measures["classify"].reached == 120
    assert measures["classify"].continued == int(np.sum(entry[:, 0] > 0.5))


def test_lineage_cli_fills_in_measured_probabilities(server: EmbeddedTriton, tmp_path: Path) -> None:
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(ROUTED))
    written = tmp_path / "measured.yaml"
    code = main(
        ["lineage", str(spec_path), "--server", server.grpc_address, "--samples", "200", "--write-spec", str(written)]
    )
    assert code == 0
    measured = yaml.safe_load(written.read_text())["stages"][1]
    assert 0.35 < measured["probability"] < 0.65 and measured["route"].endswith("first_above_half")


def test_profile_cli_errors_are_one_line(
    server: EmbeddedTriton, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = [
        (["--server", server.grpc_address, "--models", "nope"], "not on the triton server"),
        (["--server", "127.0.0.1:9", "--models", "emulated-detector"], "unreachable"),
        (["--server", server.grpc_address, "--models", "emulated-detector", "--batch-sizes", "4,2"], "increasing"),
        (["--server", server.grpc_address, "--models", "emulated-detector", "--idle-rounds", "-1"], "--idle-rounds"),
        (["--embedded", str(tmp_path / "missing"), "--models", "x"], "does not exist"),
        (["--adapter", "tritn", "--server", server.grpc_address, "--models", "x"], "did you mean 'triton'"),
    ]
    for extra, needle in cases:
        code = main(["profile", *extra, "--hardware", "cpu", "--out", str(tmp_path / "p")])
        err = capsys.readouterr().err
        assert code == 2, extra
        assert needle in err and err.count("\n") == 1 and "Traceback" not in err, err
