"""Conversions between the agent's protobuf messages and InferLine's plain data (both directions).

Kept in one place so the servicer and the client agree on every field, including which unset
fields mean "the profiler's default".
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from inferline.adapters.base import ModelInfo, ServingConfig
from inferline.agent.profiler import ProfileProgress, ProfileSettings, validate_batch_sizes
from inferline.errors import InferlineError, ProfileError
from inferline.profiles import MAX_BATCH_SIZE, ModelProfile, parse_profile, profile_document
from inferline.protos import agent_pb2 as pb

ERROR_KEY = "inferline-error"
"""Trailing metadata naming the agent-side error class: tells a client that the agent answered."""


class InvalidRequest(InferlineError):
    """A request field is out of range (the agent answers INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class AgentDescription:
    """What `Describe` reports: the model server behind an agent and its models."""

    framework: str
    hardware: str
    server_address: str
    server_ready: bool
    models: tuple[ModelInfo, ...]


# -- serving configs ----------------------------------------------------------------------------
def config_to_pb(config: ServingConfig) -> pb.ServingConfig:
    return pb.ServingConfig(
        max_batch_size=config.max_batch_size,
        instance_count=config.instance_count,
        batching_delay_us=config.batching_delay_us,
    )


def config_from_pb(message: pb.ServingConfig) -> ServingConfig:
    return ServingConfig(message.max_batch_size, message.instance_count, message.batching_delay_us)


MAX_MODEL_NAME = 256
"""Characters in a model name a request may carry (Triton's are far shorter); a longer one is echoed
in no error, so that the status stays within gRPC's metadata limit."""
MAX_INSTANCES = 64
"""Instances one Configure may ask for: each is a process or thread of the model server, and a
mistyped count would have it start thousands."""
MAX_BATCHING_DELAY_US = 10_000_000
# A Profile request's bounds: a profile holds the agent (one at a time) until it ends.
MAX_WARMUP = MAX_IDLE_ROUNDS = 1_000
MAX_SAMPLES = 10_000
MAX_BUDGET_S = 600.0


def checked_model(model: str, what: str) -> str:
    if not model:
        raise InvalidRequest(f"the {what} request names no model", "pass the model")
    if len(model) > MAX_MODEL_NAME:
        raise InvalidRequest(
            f"the {what} request's model name has {len(model)} characters, over the limit of {MAX_MODEL_NAME}",
            "pass the model's name",
        )
    return model


def checked_config(model: str, message: pb.ServingConfig) -> ServingConfig:
    config = config_from_pb(message)
    if not (
        1 <= config.max_batch_size <= MAX_BATCH_SIZE
        and 1 <= config.instance_count <= MAX_INSTANCES
        and 0 <= config.batching_delay_us <= MAX_BATCHING_DELAY_US
    ):
        raise InvalidRequest(
            f"invalid serving config for {model!r}: max_batch_size={config.max_batch_size}, "
            f"instance_count={config.instance_count}, batching_delay_us={config.batching_delay_us}",
            f"max_batch_size must be 1 to {MAX_BATCH_SIZE}, instance_count 1 to {MAX_INSTANCES} and "
            f"batching_delay_us 0 to {MAX_BATCHING_DELAY_US}",
        )
    return config


# -- describe ---------------------------------------------------------------------------------
def description_to_pb(description: AgentDescription) -> pb.DescribeReply:
    return pb.DescribeReply(
        framework=description.framework,
        hardware=description.hardware,
        server_address=description.server_address,
        server_ready=description.server_ready,
        models=[model_to_pb(m) for m in description.models],
    )


def model_to_pb(info: ModelInfo) -> pb.ModelDescription:
    message = pb.ModelDescription(name=info.name, ready=info.ready)
    if info.config is not None:
        message.config.CopyFrom(config_to_pb(info.config))
    return message


def description_from_pb(reply: pb.DescribeReply) -> AgentDescription:
    models = tuple(
        ModelInfo(m.name, m.ready, config_from_pb(m.config) if m.HasField("config") else None) for m in reply.models
    )
    return AgentDescription(reply.framework, reply.hardware, reply.server_address, reply.server_ready, models)


# -- profiling ----------------------------------------------------------------------------------
def settings_to_pb(model: str, settings: ProfileSettings) -> pb.ProfileRequest:
    return pb.ProfileRequest(
        model=model,
        batch_sizes=list(settings.batch_sizes),
        warmup=settings.warmup,
        samples=settings.samples,
        budget_s=settings.budget_s,
        drop_flat=settings.drop_flat,
        idle_rounds=settings.idle_rounds,
    )


def settings_from_pb(request: pb.ProfileRequest) -> ProfileSettings:
    """The profiler settings a request asks for; unset optional fields take the profiler's defaults."""
    checked_model(request.model, "profile")
    defaults = ProfileSettings(batch_sizes=())
    settings = ProfileSettings(
        batch_sizes=validate_batch_sizes(request.batch_sizes),
        warmup=request.warmup if request.HasField("warmup") else defaults.warmup,
        samples=request.samples if request.HasField("samples") else defaults.samples,
        budget_s=request.budget_s if request.HasField("budget_s") else defaults.budget_s,
        drop_flat=request.drop_flat,
        idle_rounds=request.idle_rounds if request.HasField("idle_rounds") else defaults.idle_rounds,
    )
    if not (
        0 <= settings.warmup <= MAX_WARMUP
        and 1 <= settings.samples <= MAX_SAMPLES
        and 0 <= settings.idle_rounds <= MAX_IDLE_ROUNDS
        and math.isfinite(settings.budget_s)
        and 0 < settings.budget_s <= MAX_BUDGET_S
    ):
        raise InvalidRequest(
            f"invalid profile settings: warmup={settings.warmup}, samples={settings.samples}, "
            f"budget_s={settings.budget_s}, idle_rounds={settings.idle_rounds}",
            f"warmup must be 0 to {MAX_WARMUP}, samples 1 to {MAX_SAMPLES}, budget_s over 0 up to {MAX_BUDGET_S:g} "
            f"and idle_rounds 0 to {MAX_IDLE_ROUNDS}",
        )
    return settings


def progress_to_pb(progress: ProfileProgress) -> pb.ProfileUpdate:
    message = (
        f"finished {progress.total} batch sizes"
        if progress.done >= progress.total
        else f"batch size {progress.batch_size} ({progress.done + 1}/{progress.total})"
    )
    return pb.ProfileUpdate(
        progress=pb.ProfileProgress(
            model=progress.model,
            batch_size=progress.batch_size,
            done=progress.done,
            total=progress.total,
            message=message,
        )
    )


def progress_from_pb(message: pb.ProfileProgress) -> ProfileProgress:
    return ProfileProgress(message.model, message.batch_size, message.done, message.total)


def result_to_pb(profile: ModelProfile | None, error: str | None = None) -> pb.ProfileUpdate:
    """The final update: a complete profile, or (with `error`) what was measured before it stopped."""
    text = json.dumps(profile_document(profile)) if profile is not None else ""
    return pb.ProfileUpdate(result=pb.ProfileResult(profile_json=text, partial=error is not None, error=error or ""))


def profile_from_json(text: str, source: str) -> ModelProfile | None:
    """The profile a result carries (None for an empty partial result); ProfileError if malformed."""
    if not text:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProfileError(f"{source} is not valid JSON (line {exc.lineno})", "check the agent's version") from None
    return parse_profile(data, source)
