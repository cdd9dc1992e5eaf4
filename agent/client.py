"""A client for the agent's gRPC API, with InferLine's errors instead of gRPC's.

Every failure becomes an `InferlineError` subclass with one line: `ModelNotFoundError` (the
model server does not know the model), `ServerError` (the model server, or the agent itself, is
unreachable), `AuthError` (the token was refused), `ProfileInterrupted` (with what was measured),
or `AgentError` (anything else the agent refused).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inferline.adapters.base import ServingConfig
from inferline.agent.auth import AuthError, bearer, check_token
from inferline.agent.profiler import ProfileInterrupted, ProfileProgress, ProfileSettings
from inferline.agent.wire import (
    ERROR_KEY,
    AgentDescription,
    config_from_pb,
    config_to_pb,
    description_from_pb,
    profile_from_json,
    progress_from_pb,
    settings_to_pb,
)
from inferline.errors import InferlineError, ModelNotFoundError, ServerError
from inferline.profiles import ModelProfile
from inferline.protos import agent_pb2 as pb
from inferline.protos import agent_pb2_grpc as pb_grpc

Request = TypeVar("Request")
Reply = TypeVar("Reply")

DEFAULT_TIMEOUT_S = 120.0
"""Deadline of Describe and Configure; a Configure reloads the model, which can take a while."""


class AgentError(InferlineError):
    """The agent refused a request or answered in a way this client does not understand."""


class AgentClient:
    """Talks to one agent. Profile has no deadline (it takes as long as it measures); Ctrl-C cancels it."""

    def __init__(
        self, address: str, token: str, tls_ca: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._metadata = bearer(check_token(token))
        self._channel = _channel(address, tls_ca)
        self._stub = pb_grpc.AgentStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def describe(self) -> AgentDescription:
        return description_from_pb(self._unary(self._stub.Describe, pb.DescribeRequest()))

    def configure(self, model: str, config: ServingConfig) -> ServingConfig:
        """Apply `config` to `model`; returns the configuration now in effect."""
        request = pb.ConfigureRequest(model=model, config=config_to_pb(config))
        return config_from_pb(self._unary(self._stub.Configure, request).config)

    def profile(
        self,
        model: str,
        settings: ProfileSettings,
        on_progress: Callable[[ProfileProgress], None] | None = None,
    ) -> ModelProfile:
        """Profile `model` on the agent's hardware; `ProfileInterrupted` carries a partial profile."""
        call = self._stub.Profile(settings_to_pb(model, settings), metadata=self._metadata)
        result: pb.ProfileResult | None = None
        try:
            for update in call:
                if update.HasField("progress") and on_progress is not None:
                    on_progress(progress_from_pb(update.progress))
                elif update.HasField("result"):
                    result = update.result
        except grpc.RpcError as exc:
            if result is not None and result.partial:
                raise self._interrupted(result) from None
            raise rpc_error(exc, self.address) from None
        except BaseException:
            call.cancel()  # type: ignore[no-untyped-call]  # Ctrl-C or a failing on_progress: stop the agent profile too
            raise
        return self._finished(model, result)

    def health(self, timeout_s: float = 5.0) -> bool:
        """Whether the agent answers and its model server is ready; never raises."""
        try:
            reply = self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
        except grpc.RpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- helpers ------------------------------------------------------------------------------
    def _unary(self, method: grpc.UnaryUnaryMultiCallable[Request, Reply], request: Request) -> Reply:
        try:
            return method(request, timeout=self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise rpc_error(exc, self.address, self.timeout_s) from None

    def _interrupted(self, result: pb.ProfileResult) -> ProfileInterrupted:
        partial = profile_from_json(result.profile_json, f"the partial profile from the agent at {self.address}")
        return ProfileInterrupted(result.error or "the profile was interrupted", None, partial)

    def _finished(self, model: str, result: pb.ProfileResult | None) -> ModelProfile:
        if result is not None and result.partial:
            raise self._interrupted(result)
        profile = None if result is None else profile_from_json(result.profile_json, f"the profile of {model!r}")
        if profile is None:
            raise AgentError(
                f"the agent at {self.address} ended the profile of {model!r} without a result",
                "check that the agent and this client are the same InferLine version",
            )
        return profile


def _channel(address: str, tls_ca: str | None) -> grpc.Channel:
    if tls_ca is None:
        return grpc.insecure_channel(address)
    try:
        ca = Path(tls_ca).read_bytes()
    except OSError as exc:
        raise InferlineError(
            f"cannot read the TLS CA file {tls_ca!r}: {exc.strerror or exc}", "check the path"
        ) from None
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=ca))


def rpc_error(exc: grpc.RpcError, address: str, timeout_s: float | None = None) -> InferlineError:
    """The InferLine error for a failed call to the agent at `address`."""
    code: Any = getattr(exc, "code", lambda: grpc.StatusCode.UNKNOWN)()
    details = (getattr(exc, "details", lambda: None)() or "").strip()
    first_line = details.splitlines()[0] if details else code.name
    metadata = getattr(exc, "trailing_metadata", lambda: None)() or ()
    from_agent = any(key == ERROR_KEY for key, _ in metadata)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return AuthError(
            f"the agent at {address} refused the token ({first_line})",
            "use the token the agent was started with (its --token-file or INFERLINE_AGENT_TOKEN)",
        )
    if code == grpc.StatusCode.UNAVAILABLE and not from_agent:
        return ServerError(
            f"the agent at {address} is unreachable ({first_line})",
            "check that `inferline agent` runs there and that the address, port and TLS settings are right",
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ServerError(
            f"the agent at {address} did not answer within {timeout_s:g} s" if timeout_s else first_line,
            "check the agent's log; its model server may be overloaded",
        )
    kinds: dict[grpc.StatusCode, type[InferlineError]] = {
        grpc.StatusCode.NOT_FOUND: ModelNotFoundError,
        grpc.StatusCode.UNAVAILABLE: ServerError,
    }
    # The agent's own messages are already one line with their fix; keep them as they are.
    return kinds.get(code, AgentError)(first_line)
