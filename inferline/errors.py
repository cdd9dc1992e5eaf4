"""Errors a user can cause. Each says what is wrong, then "To fix:" and a hint.

`inferline.cli.main` catches `InferlineError` around everything and prints one line; set
`INFERLINE_DEBUG=1` to see the traceback instead.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class InferlineError(Exception):
    """A problem in the user's input or environment, reported as one line."""

    def __init__(self, message: str, fix: str | None = None) -> None:
        self.message = message
        self.fix = fix
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = self.message[:-1] if self.message.endswith(".") and not self.message.endswith("..") else self.message
        return f"{text}. To fix: {self.fix}" if self.fix else f"{text}."


class SpecError(InferlineError):
    """The pipeline spec is malformed."""


class CatalogError(InferlineError):
    """The hardware catalog is malformed or lacks a hardware type."""


class ProfileError(InferlineError):
    """A profile is malformed or missing."""


class TraceError(InferlineError):
    """A trace file or generator string is malformed."""


class PlanError(InferlineError):
    """A plan file is malformed or does not fit the pipeline."""


class InfeasibleError(InferlineError):
    """No configuration meets the SLO."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """A ' (did you mean X?)' suffix, or '' when nothing is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class ServerError(InferlineError):
    """A model server is unreachable, died, or refused a request."""


class ServerUnreachable(ServerError):
    """The server does not answer at all (not started, died, wrong address)."""


class ModelNotFoundError(ServerError):
    """The model server does not know the model."""


class AdapterError(InferlineError):
    """No adapter of that name, or the adapter's extras are not installed."""
