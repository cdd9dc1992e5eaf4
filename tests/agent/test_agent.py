"""The agent end to end: a real tritonserver, the agent's gRPC server, and its client.

One tritonserver serves the module (it takes ~2 s to start); tests that change the model's
configuration put it back, so the order of the tests does not matter.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from inferline.adapters.base import ServingConfig
from inferline.adapters.triton.adapter import TritonAdapter
from inferline.adapters.triton.server import EmbeddedTriton, free_port
from inferline.agent.auth import AuthError, load_token
from inferline.agent.client import AgentClient, AgentError
from inferline.agent.profiler import ProfileInterrupted, ProfileProgress, ProfileSettings
from inferline.agent.server import AgentServer, serve
from inferline.errors import InferlineError, ModelNotFoundError, ServerError
from inferline.protos import agent_pb2, agent_pb2_grpc

TOKEN = "test-token-0123456789abcdef"
MODEL = "echo"
HARDWARE = "cpu"
ORIGINAL = ServingConfig(max_batch_size=8, instance_count=1, batching_delay_us=0)
SMALL = ProfileSettings(batch_sizes=(1, 2, 4), warmup=1, samples=5, idle_rounds=0)

CONFIG = """name: "echo"
backend: "python"
max_batch_size: 8
input [ { name: "INPUT" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUTPUT" data_type: TYPE_FP32 dims: [ 4 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
dynamic_batching { max_queue_delay_microseconds: 0 }
"""

MODEL_PY = """import time

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        inputs = [pb_utils.get_input_tensor_by_name(r, "INPUT").as_numpy() for r in requests]
        time.sleep((2 + 0.5 * sum(x.shape[0] for x in inputs)) / 1000)
        return [pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT", x)]) for x in inputs]
"""


def sleep_ms(batch_size: int) -> float:
    """What the model sleeps for a batch: a lower bound of any latency measured through Triton."""
    return 2 + 0.5 * batch_size


@dataclass(frozen=True)
class Stack:
    triton: EmbeddedTriton
    adapter: TritonAdapter
    agent: AgentServer
    client: AgentClient


@contextmanager
def running_stack(repository: Path) -> Iterator[Stack]:
    """tritonserver + adapter + agent + client, all stopped on exit (no process left behind)."""
    if not (repository / MODEL).exists():
        (repository / MODEL / "1").mkdir(parents=True)
        (repository / MODEL / "config.pbtxt").write_text(CONFIG)
        (repository / MODEL / "1" / "model.py").write_text(MODEL_PY)
    with EmbeddedTriton(repository, models=[MODEL]) as triton:
        adapter = TritonAdapter(triton.grpc_address, metrics_address=triton.metrics_address)
        agent = serve(adapter, HARDWARE, TOKEN)
        client = AgentClient(agent.address, TOKEN)
        try:
            yield Stack(triton, adapter, agent, client)
        finally:
            client.close()
            agent.stop(grace=1)
            adapter.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("repo")) as s:
        yield s


def scrape(stack: Stack) -> dict[str, float]:
    """The agent's /metrics as {'name{label="value",...}': value}."""
    assert stack.agent.metrics_address is not None
    with urllib.request.urlopen(f"http://{stack.agent.metrics_address}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        f"{s.name}{{{','.join(f'{k}={v!r}' for k, v in sorted(s.labels.items()))}}}": s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def echo_config(stack: Stack) -> ServingConfig | None:
    (info,) = [m for m in stack.client.describe().models if m.name == MODEL]
    return info.config


# -- Describe / Configure ---------------------------------------------------------------------------
def test_describe_lists_the_model_and_its_config(stack: Stack) -> None:
    description = stack.client.describe()
    assert (description.framework, description.hardware) == ("triton", HARDWARE)
    assert description.server_address == stack.triton.grpc_address
    assert description.server_ready
    (echo,) = description.models
    assert (echo.name, echo.ready, echo.config) == (MODEL, True, ORIGINAL)


def test_configure_changes_batch_and_instances_and_shows_in_describe_and_metrics(stack: Stack) -> None:
    before = scrape(stack).get("inferline_agent_configure_total{model='echo'}", 0.0)
    wanted = ServingConfig(max_batch_size=4, instance_count=2, batching_delay_us=0)
    try:
        assert stack.client.configure(MODEL, wanted) == wanted
        assert echo_config(stack) == wanted
        metrics = scrape(stack)
        assert metrics["inferline_agent_configure_total{model='echo'}"] == before + 1
        assert metrics["inferline_model_max_batch_size{model='echo'}"] == 4
        assert metrics["inferline_model_instance_count{model='echo'}"] == 2
        assert metrics["inferline_agent_server_up{}"] == 1
    finally:
        stack.client.configure(MODEL, ORIGINAL)
    assert echo_config(stack) == ORIGINAL


def test_unknown_model_is_not_found_in_one_line(stack: Stack) -> None:
    with pytest.raises(ModelNotFoundError) as configured:
        stack.client.configure("ecko", ORIGINAL)
    with pytest.raises(ModelNotFoundError) as profiled:
        stack.client.profile("ecko", SMALL)
    for error in (configured.value, profiled.value):
        text = error.one_line()
        assert "'ecko'" in text and "\n" not in text and "Traceback" not in text
    assert "did you mean 'echo'" in configured.value.one_line()
    assert scrape(stack)["inferline_agent_errors_total{code='NOT_FOUND',rpc='Configure'}"] >= 1


def test_bad_arguments_are_refused_before_touching_the_server(stack: Stack) -> None:
    with pytest.raises(AgentError, match="max_batch_size must be 1 to 4096, instance_count 1 to 64"):
        stack.client.configure(MODEL, ServingConfig(max_batch_size=0, instance_count=1))
    # Each would have the model server start a million instances, wait for days or take batches of 2**31.
    for absurd in (
        ServingConfig(max_batch_size=4, instance_count=10**6),
        ServingConfig(max_batch_size=4, instance_count=1, batching_delay_us=10**12),
        ServingConfig(max_batch_size=2**31 - 1, instance_count=1),
    ):
        with pytest.raises(AgentError, match="invalid serving config"):
            stack.client.configure(MODEL, absurd)
    with pytest.raises(AgentError, match="1000 characters, over the limit of 256") as named:
        stack.client.configure("m" * 1000, ServingConfig(max_batch_size=1, instance_count=1))
    assert "mmmm" not in str(named.value)  # the name is not echoed back
    with pytest.raises(AgentError, match="batch size 1000000000 is over the limit of 4096"):
        stack.client.profile(MODEL, ProfileSettings(batch_sizes=(1, 10**9)))
    for settings in (
        ProfileSettings(batch_sizes=(1,), samples=2**31 - 1),
        ProfileSettings(batch_sizes=(1,), warmup=10**6),
        ProfileSettings(batch_sizes=(1,), budget_s=1e12),
        ProfileSettings(batch_sizes=(1,), idle_rounds=10**6),
    ):
        with pytest.raises(AgentError, match="invalid profile settings"):
            stack.client.profile(MODEL, settings)
    with pytest.raises(AgentError, match="increasing"):
        stack.client.profile(MODEL, ProfileSettings(batch_sizes=(4, 2)))
    with pytest.raises(AgentError, match="samples"):
        stack.client.profile(MODEL, ProfileSettings(batch_sizes=(1,), samples=0))
    with pytest.raises(AgentError, match="idle_rounds"):
        stack.client.profile(MODEL, ProfileSettings(batch_sizes=(1,), idle_rounds=-1))
    assert echo_config(stack) == ORIGINAL


# -- authentication, health, reachability --------------------------------------------------------------
def test_calls_without_or_with_a_wrong_token_are_unauthenticated_but_health_is_open(stack: Stack) -> None:
    with grpc.insecure_channel(stack.agent.address) as channel:
        stub = agent_pb2_grpc.AgentStub(channel)
        with pytest.raises(grpc.RpcError) as anonymous:
            stub.Describe(agent_pb2.DescribeRequest(), timeout=10)
        assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as streaming:
            list(stub.Profile(agent_pb2.ProfileRequest(model=MODEL, batch_sizes=[1]), timeout=10))
        assert streaming.value.code() == grpc.StatusCode.UNAUTHENTICATED
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    with AgentClient(stack.agent.address, "wrong-token") as intruder:
        with pytest.raises(AuthError, match="refused the token"):
            intruder.configure(MODEL, ServingConfig(max_batch_size=1, instance_count=1))
        assert intruder.health()  # health needs no token
    assert stack.client.health()
    assert scrape(stack)["inferline_agent_errors_total{code='UNAUTHENTICATED',rpc='Describe'}"] >= 1
    assert echo_config(stack) == ORIGINAL


def test_made_up_methods_without_a_token_add_no_metric_series(stack: Stack) -> None:
    with grpc.insecure_channel(stack.agent.address) as channel:
        for i in range(5):
            call = channel.unary_unary(f"/made.Up/{'x' * 100}{i}")
            with pytest.raises(grpc.RpcError) as refused:
                call(b"", timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    series = [k for k in scrape(stack) if k.startswith("inferline_agent_errors_total")]
    assert not any("xxx" in k for k in series)
    assert scrape(stack)["inferline_agent_errors_total{code='UNAUTHENTICATED',rpc='unknown'}"] >= 5


def test_unreachable_agent_is_a_server_error() -> None:
    address = f"127.0.0.1:{free_port()}"
    with AgentClient(address, TOKEN, timeout_s=10) as client:
        with pytest.raises(ServerError, match=f"agent at {address} is unreachable") as caught:
            client.describe()
        assert not client.health(timeout_s=2)
    assert "\n" not in caught.value.one_line()


def test_tls(stack: Stack, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    self_signed = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"]
    san = ["-addext", "subjectAltName=IP:127.0.0.1"]
    subprocess.run([*self_signed, *san, "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    agent = serve(stack.adapter, HARDWARE, TOKEN, metrics_port=None, tls_cert=str(cert), tls_key=str(key))
    try:
        assert agent.metrics_address is None
        with AgentClient(agent.address, TOKEN, tls_ca=str(cert)) as client:
            assert client.describe().models[0].config == ORIGINAL
        with AgentClient(agent.address, TOKEN, timeout_s=5) as plaintext, pytest.raises(ServerError):
            plaintext.describe()
    finally:
        agent.stop(grace=0)


def test_token_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INFERLINE_AGENT_TOKEN", raising=False)
    with pytest.raises(InferlineError, match="INFERLINE_AGENT_TOKEN"):
        load_token(None)
    with pytest.raises(InferlineError, match="cannot read the agent token file"):
        load_token(str(tmp_path / "missing"))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(InferlineError, match="is empty"):
        load_token(str(tmp_path / "empty"))
    (tmp_path / "token").write_text("s3cret\n")
    assert load_token(str(tmp_path / "token")) == "s3cret"
    monkeypatch.setenv("INFERLINE_AGENT_TOKEN", " from-env ")
    assert load_token(None) == "from-env"


# -- Profile ------------------------------------------------------------------------------------------
def test_profile_streams_progress_and_returns_the_requested_batch_sizes(stack: Stack) -> None:
    progress: list[ProfileProgress] = []
    busy: list[Exception] = []

    def on_progress(p: ProfileProgress) -> None:
        progress.append(p)
        if p.done == 0:  # the profile holds the agent: a concurrent Configure must be refused
            try:
                stack.client.configure(MODEL, ServingConfig(max_batch_size=2, instance_count=1))
            except AgentError as exc:
                busy.append(exc)

    profile = stack.client.profile(MODEL, SMALL, on_progress=on_progress)

    assert profile.model == MODEL
    assert profile.batch_sizes(HARDWARE) == (1, 2, 4)
    for point in profile.points(HARDWARE):
        assert point.latency_ms.mean >= sleep_ms(point.batch_size)
    assert [(p.batch_size, p.done, p.total) for p in progress] == [(1, 0, 3), (2, 1, 3), (4, 2, 3), (4, 3, 3)]
    assert len(busy) == 1 and "busy profiling 'echo'" in str(busy[0])
    assert echo_config(stack) == ORIGINAL  # the profiler restored the config
    assert scrape(stack)["inferline_agent_profiles_total{model='echo',outcome='complete'}"] >= 1


def test_a_server_dying_mid_profile_returns_the_partial_profile(tmp_path: Path) -> None:
    with running_stack(tmp_path) as dying:
        pid = dying.triton.process.pid if dying.triton.process else 0

        def kill_after_first(p: ProfileProgress) -> None:
            if p.done == 1:
                os.killpg(pid, signal.SIGKILL)

        settings = ProfileSettings(batch_sizes=(1, 2, 4), warmup=1, samples=200, idle_rounds=0)
        with pytest.raises(ProfileInterrupted) as caught:
            dying.client.profile(MODEL, settings, on_progress=kill_after_first)
        partial = caught.value.partial
        assert partial is not None and partial.batch_sizes(HARDWARE) in ((1,), (1, 2))
        assert "stopped after" in caught.value.one_line() and "\n" not in caught.value.one_line()
        assert not dying.client.health()
        with pytest.raises(ServerError, match="unreachable"):
            dying.client.describe()
        assert scrape(dying)["inferline_agent_profiles_total{model='echo',outcome='partial'}"] == 1
        assert scrape(dying)["inferline_agent_server_up{}"] == 0


def test_inferline_agent_command_serves_until_sigterm(stack: Stack, tmp_path: Path) -> None:
    """`inferline agent` connects through the adapter registry, prints its address, stops cleanly on SIGTERM."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    argv = ["-m", "inferline.cli", "agent", "--server", stack.triton.grpc_address, "--hardware", "cpu"]
    argv += ["--token-file", str(token_file), "--port", "0"]
    agent = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, text=True)
    try:
        assert agent.stdout is not None
        line = agent.stdout.readline().strip()
        assert line.startswith("inferline agent serving on 127.0.0.1:"), line
        address = line.split()[4].rstrip(";")
        with AgentClient(address, TOKEN) as client:
            assert client.describe().server_address == stack.triton.grpc_address
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=15) == 0
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()


def test_a_cancelled_profile_stops_restores_the_config_and_frees_the_agent(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="inferline.agent.service")

    class Stop(Exception):
        pass

    def stop_after_first(p: ProfileProgress) -> None:
        if p.done == 1:
            raise Stop

    settings = ProfileSettings(batch_sizes=(1, 2, 4), warmup=1, samples=200, idle_rounds=0)
    with pytest.raises(Stop):
        stack.client.profile(MODEL, settings, on_progress=stop_after_first)
    deadline = time.monotonic() + 15
    while True:  # the agent notices the cancel at the next batch size, then restores and frees itself
        try:
            assert stack.client.configure(MODEL, ORIGINAL) == ORIGINAL
            break
        except AgentError as exc:
            assert "busy" in str(exc) and time.monotonic() < deadline
            time.sleep(0.1)
    assert echo_config(stack) == ORIGINAL
    assert "the client of the profile of 'echo' went away: stopped profiling" in caplog.text


def test_a_cancelled_profile_stops_within_a_call_not_a_batch_size(stack: Stack) -> None:
    # Ten thousand samples of one batch size: without a check before each call the agent would
    # stay busy until they were all taken.
    class Stop(Exception):
        pass

    def stop_at_once(p: ProfileProgress) -> None:
        raise Stop

    settings = ProfileSettings(batch_sizes=(1,), warmup=0, samples=10_000, budget_s=600.0, idle_rounds=0)
    with pytest.raises(Stop):
        stack.client.profile(MODEL, settings, on_progress=stop_at_once)
    cancelled = time.monotonic()
    while True:
        try:
            assert stack.client.configure(MODEL, ORIGINAL) == ORIGINAL
            break
        except AgentError as exc:
            assert "busy" in str(exc) and time.monotonic() < cancelled + 5
            time.sleep(0.05)
    assert echo_config(stack) == ORIGINAL
