"""The agent's gRPC servicer: Describe, Profile and Configure on top of one adapter.

Errors become gRPC statuses with a one-line message (see `status_for`); a traceback never
reaches the client, only the agent's log. Profile and Configure change the model server's
configuration, so only one of them runs at a time: a second is refused (ABORTED) rather than
queued, because a Configure in the middle of a profile would silently corrupt the measurements.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NoReturn

import grpc
import numpy as np
from numpy.typing import NDArray

from inferline.adapters.base import Adapter, ModelInfo, ModelStats, ServingConfig, Tensors
from inferline.agent.metrics import AgentMetrics
from inferline.agent.profiler import ProfileInterrupted, ProfileProgress, ProfileSettings, profile_model
from inferline.agent.wire import (
    ERROR_KEY,
    AgentDescription,
    InvalidRequest,
    checked_config,
    checked_model,
    config_to_pb,
    description_to_pb,
    progress_to_pb,
    result_to_pb,
    settings_from_pb,
)
from inferline.errors import InferlineError, ModelNotFoundError, ProfileError, ServerError
from inferline.profiles import ModelProfile
from inferline.protos import agent_pb2 as pb
from inferline.protos import agent_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


class AgentBusy(InferlineError):
    """Another Profile or Configure is running on this agent."""


class ProfileCancelled(Exception):
    """Raised from the progress callback to stop a profile whose client has gone away."""


@dataclass(frozen=True)
class Status:
    code: grpc.StatusCode
    message: str


def status_for(exc: BaseException) -> Status:
    """The gRPC status an error ends a call with; only InferLine's own errors show their text."""
    codes: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
        (ModelNotFoundError, grpc.StatusCode.NOT_FOUND),
        (ServerError, grpc.StatusCode.UNAVAILABLE),
        (ProfileInterrupted, grpc.StatusCode.UNAVAILABLE),
        (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
        (ProfileError, grpc.StatusCode.INVALID_ARGUMENT),
        (AgentBusy, grpc.StatusCode.ABORTED),
        (InferlineError, grpc.StatusCode.FAILED_PRECONDITION),
    )
    for kind, code in codes:
        if isinstance(exc, kind):
            return Status(code, exc.one_line() if isinstance(exc, InferlineError) else str(exc))
    return Status(
        grpc.StatusCode.INTERNAL, f"internal error in the agent ({type(exc).__name__}); the details are in its log."
    )


Event = ProfileProgress | ModelProfile | Exception
"""What a profile's worker thread hands to the streaming handler."""


class ProfileRun:
    """One profile measured on a worker thread; its progress and outcome come through `events`.

    The sync gRPC API streams only by yielding from the handler, while the profiler reports
    through a callback: the queue joins the two. The worker, not the handler, calls `release`
    when it ends, so that after a client cancels, the profiler still winds down (and restores
    the model's config) before another Profile or Configure may start.
    """

    def __init__(
        self,
        adapter: Adapter,
        model: str,
        hardware: str,
        settings: ProfileSettings,
        is_active: Callable[[], bool],
        release: Callable[[], None],
    ) -> None:
        self.model = model
        self.events: queue.Queue[Event] = queue.Queue()
        self._args = (adapter, model, hardware, settings)
        self._is_active = is_active
        self._release = release
        # A daemon: a profile the agent's shutdown cuts short must not keep its process alive.
        self._thread = threading.Thread(target=self._work, name=f"inferline-profile-{model}", daemon=True)

    def start(self) -> ProfileRun:
        try:
            self._thread.start()
        except BaseException:
            self._release()
            raise
        return self

    def _work(self) -> None:
        adapter, model, hardware, settings = self._args
        try:
            checked = CheckedAdapter(adapter, self._check)
            self.events.put(profile_model(checked, model, hardware, settings, progress=self._progress))
        except ProfileCancelled as exc:
            log.info("%s: stopped profiling", exc)
            self.events.put(exc)
        except Exception as exc:  # handed over whole: the handler maps it to a status
            self.events.put(exc)
        finally:
            self._release()

    def _progress(self, progress: ProfileProgress) -> None:
        self._check()
        self.events.put(progress)

    def _check(self) -> None:
        if not self._is_active():
            raise ProfileCancelled(f"the client of the profile of {self.model!r} went away")


class CheckedAdapter:
    """An adapter that runs `check` before each inference call, so that a profile stops within one
    call once its client has gone (cancelled, or past its deadline), not after a batch size's
    samples; the profiler restores the model's config on the way out."""

    def __init__(self, adapter: Adapter, check: Callable[[], None]) -> None:
        self._adapter, self._check = adapter, check
        self.framework, self.address = adapter.framework, adapter.address

    def infer(self, model: str, inputs: Tensors) -> dict[str, NDArray[np.generic]]:
        self._check()
        return self._adapter.infer(model, inputs)

    def is_ready(self) -> bool:
        return self._adapter.is_ready()

    def models(self) -> list[str]:
        return self._adapter.models()

    def model_info(self, model: str) -> ModelInfo:
        return self._adapter.model_info(model)

    def configure(self, model: str, config: ServingConfig) -> ServingConfig:
        return self._adapter.configure(model, config)

    def stats(self, model: str) -> ModelStats:
        return self._adapter.stats(model)

    def server_metrics(self) -> dict[str, float]:
        return self._adapter.server_metrics()

    def close(self) -> None:
        self._adapter.close()


class AgentService(pb_grpc.AgentServicer):
    def __init__(self, adapter: Adapter, hardware: str, metrics: AgentMetrics) -> None:
        self._adapter = adapter
        self._hardware = hardware
        self._metrics = metrics
        self._busy = threading.Lock()
        self._busy_with = ""

    # -- RPCs ---------------------------------------------------------------------------------
    def Describe(self, request: pb.DescribeRequest, context: grpc.ServicerContext) -> pb.DescribeReply:
        try:
            return description_to_pb(self.describe())
        except Exception as exc:
            self._fail(context, "Describe", exc)

    def Configure(self, request: pb.ConfigureRequest, context: grpc.ServicerContext) -> pb.ConfigureReply:
        try:
            checked_model(request.model, "configure")
            if not request.HasField("config"):
                raise InvalidRequest(f"the configure request for {request.model!r} has no config", "send a config")
            config = checked_config(request.model, request.config)
            with self._exclusive(f"configuring {request.model!r}"):
                applied = self._adapter.configure(request.model, config)
        except Exception as exc:
            self._fail(context, "Configure", exc)
        self._metrics.configures.labels(model=request.model).inc()
        return pb.ConfigureReply(model=request.model, config=config_to_pb(applied))

    def Profile(self, request: pb.ProfileRequest, context: grpc.ServicerContext) -> Iterator[pb.ProfileUpdate]:
        try:
            settings = settings_from_pb(request)
            self._claim(f"profiling {request.model!r}")
            run = ProfileRun(
                self._adapter, request.model, self._hardware, settings, context.is_active, self._busy.release
            ).start()
        except Exception as exc:
            self._fail(context, "Profile", exc)
        yield from self._stream(run, context)

    # -- helpers ------------------------------------------------------------------------------
    def describe(self) -> AgentDescription:
        models = tuple(self._adapter.model_info(m) for m in self._adapter.models())
        return AgentDescription(
            framework=self._adapter.framework,
            hardware=self._hardware,
            server_address=self._adapter.address,
            server_ready=self._adapter.is_ready(),
            models=models,
        )

    def _stream(self, run: ProfileRun, context: grpc.ServicerContext) -> Iterator[pb.ProfileUpdate]:
        while True:
            event = run.events.get()
            if isinstance(event, ProfileProgress):
                yield progress_to_pb(event)
            elif isinstance(event, ModelProfile):
                self._metrics.profiles.labels(model=run.model, outcome="complete").inc()
                yield result_to_pb(event)
                return
            elif isinstance(event, ProfileCancelled):
                return
            elif isinstance(event, ProfileInterrupted):
                # The documented contract: what was measured first, then the status.
                self._metrics.profiles.labels(model=run.model, outcome="partial").inc()
                yield result_to_pb(event.partial, event.one_line())
                self._fail(context, "Profile", event)
            else:
                self._fail(context, "Profile", event)

    def _claim(self, what: str) -> None:
        if not self._busy.acquire(blocking=False):
            raise AgentBusy(f"the agent is busy {self._busy_with}", "retry when it has finished")
        self._busy_with = what

    @contextmanager
    def _exclusive(self, what: str) -> Iterator[None]:
        self._claim(what)
        try:
            yield
        finally:
            self._busy.release()

    def _fail(self, context: grpc.ServicerContext, rpc: str, exc: BaseException) -> NoReturn:
        status = status_for(exc)
        if status.code == grpc.StatusCode.INTERNAL:
            log.error("%s failed", rpc, exc_info=exc)
        else:
            log.info("%s: %s", rpc, status.message)
        self._metrics.error(rpc, status.code.name)
        context.set_trailing_metadata(((ERROR_KEY, type(exc).__name__),))
        context.abort(status.code, status.message)
