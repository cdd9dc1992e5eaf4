"""The local actuator on a real tritonserver: replicas and scale-ladder batch sizes change live."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from inferline.adapters.registry import connect
from inferline.catalog import load_catalog
from inferline.deployment import LocalDeployment
from inferline.planner.planning import make_plan
from inferline.profiles import load_profiles
from inferline.spec import load_spec
from inferline.traces import load_trace
from tests.model_repos import EXAMPLES

ROOT = EXAMPLES.parent
SPEC = load_spec(ROOT / "pipelines" / "local-emulated.yaml")


@pytest.fixture(scope="module")
def deployment() -> Iterator[LocalDeployment]:
    plan = make_plan(
        SPEC, load_profiles(ROOT / "profiles" / "measured-cpu"), load_catalog(ROOT / "catalog-local.yaml"),
        load_trace("gamma:rate=80,cv=2,duration=120,seed=1"), 120.0, ladder=True,
    )  # fmt: skip
    d = LocalDeployment(SPEC, plan, EXAMPLES).start()
    try:
        yield d
    finally:
        d.stop()


def burst(d: LocalDeployment, n: int) -> None:
    assert d.router is not None
    x = np.random.default_rng(0).random((1, 16)).astype(np.float32)
    futures = [d.router.submit({"INPUT": x}) for _ in range(n)]
    for f in futures:
        f.result(timeout=30)


def test_a_ladder_step_changes_the_batch_cap_without_a_reload(deployment: LocalDeployment) -> None:
    assert deployment.plan.tuner is not None and deployment.router is not None
    biggest = max(step.stages["detect"].max_batch_size for step in deployment.plan.tuner.ladder)
    planned = deployment.plan.stage("detect").max_batch_size
    assert biggest > planned
    server = connect("triton", deployment.describe()["server_address"])
    try:  # the server takes every ladder batch size from the start
        info = server.model_info("emulated-detector")
        assert info.config is not None and info.config.max_batch_size >= biggest
    finally:
        server.close()

    burst(deployment, 60)
    before = deployment.router.batch_sizes()["detect"]
    assert max(before) <= planned

    event = deployment.scale("detect", 1, biggest)
    assert event.startup_s == 0.0  # only the router's cap changed
    burst(deployment, 120)
    after = deployment.router.batch_sizes()["detect"]
    grown = {n: c - before.get(n, 0) for n, c in after.items() if c > before.get(n, 0)}
    assert max(grown) > planned and max(grown) <= biggest


def test_adding_replicas_reconfigures_the_server_and_is_timed(deployment: LocalDeployment) -> None:
    event = deployment.scale("classify", 2)
    assert event.startup_s > 0.0
    server = connect("triton", deployment.describe()["server_address"])
    try:
        info = server.model_info("emulated-classifier")
        assert info.config is not None and info.config.instance_count == 2
    finally:
        server.close()
    assert deployment.router is not None
    assert {s.name: s.replicas for s in deployment.router.snapshot()}["classify"] == 2
    burst(deployment, 40)
