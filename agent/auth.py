"""Token authentication for the agent's gRPC API: no anonymous profiling or reconfiguration.

Every call must carry the metadata `authorization: Bearer <token>`, except the standard health
service, which probes (Kubernetes, load balancers) call without secrets and which reveals nothing
but SERVING / NOT_SERVING.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import grpc

from inferline.errors import InferlineError

TOKEN_ENV = "INFERLINE_AGENT_TOKEN"
HEALTH_PREFIX = "/grpc.health.v1.Health/"
"""Calls under this prefix need no token."""


class AuthError(InferlineError):
    """The agent token is missing, unreadable, malformed, or was refused."""


def load_token(token_file: str | None, env_var: str = TOKEN_ENV) -> str:
    """The agent token: from `token_file` when given, else from the environment variable `env_var`."""
    if token_file is not None:
        token = _read_token_file(Path(token_file))
    else:
        token = os.environ.get(env_var, "").strip()
        if not token:
            raise AuthError(
                f"no agent token: --token-file is not given and {env_var} is not set",
                f"pass --token-file FILE or set {env_var} (e.g. to the output of `openssl rand -hex 32`)",
            )
    return check_token(token)


def _read_token_file(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise AuthError(
            f"cannot read the agent token file {str(path)!r}: {exc.strerror or exc}", "check the --token-file path"
        ) from None
    except UnicodeDecodeError:
        raise AuthError(f"the agent token file {str(path)!r} is not text", "put the token in it as text") from None
    if not token:
        raise AuthError(f"the agent token file {str(path)!r} is empty", "write the token into it")
    return token


def check_token(token: str) -> str:
    # gRPC metadata values must be printable ASCII; a space would split "Bearer <token>" ambiguously.
    if not (token.isascii() and token.isprintable()) or any(c.isspace() for c in token):
        raise AuthError(
            "the agent token must be printable ASCII without spaces", "use e.g. the output of `openssl rand -hex 32`"
        )
    return token


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """The call metadata that authenticates a client with `token`."""
    return (("authorization", f"Bearer {token}"),)


class TokenAuth(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """Refuses every call without the right bearer token with UNAUTHENTICATED (health calls excepted).

    `on_refused(method)` is called for each refused call, e.g. to count it.
    """

    def __init__(self, token: str, on_refused: Callable[[str], None] | None = None) -> None:
        self._expected = f"Bearer {check_token(token)}".encode()
        self._on_refused = on_refused

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        if method.startswith(HEALTH_PREFIX):
            return continuation(handler_call_details)
        refusal = self._refusal(handler_call_details.invocation_metadata)
        if refusal is None:
            return continuation(handler_call_details)
        if self._on_refused is not None:
            self._on_refused(method)
        return _refusing_handler(continuation(handler_call_details), refusal)

    def _refusal(self, metadata: Any) -> str | None:
        """Why the call is refused, or None when its token is right."""
        values = [value for key, value in (metadata or ()) if key == "authorization"]
        if not values:
            return "the agent requires a token (metadata 'authorization: Bearer <token>') and the call had none"
        given = values[0] if isinstance(values[0], bytes) else str(values[0]).encode()
        # Constant-time comparison: a timing side channel must not reveal the token prefix by prefix.
        if len(values) == 1 and hmac.compare_digest(given, self._expected):
            return None
        return "the agent refused the token"


def _refusing_handler(handler: grpc.RpcMethodHandler[Any, Any] | None, message: str) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same streaming kind as `handler` that ends the call with UNAUTHENTICATED.

    The kind must match, or gRPC would read the client's stream in the wrong shape before refusing.
    """

    def refuse(_request: object, context: grpc.ServicerContext) -> NoReturn:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    streams = (bool(handler and handler.request_streaming), bool(handler and handler.response_streaming))
    factory: Callable[..., grpc.RpcMethodHandler[Any, Any]] = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[streams]
    return factory(refuse)
