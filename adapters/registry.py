"""Adapters by name: the entry-point group `inferline.adapters`, so third parties can ship their own."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from inferline.adapters.base import Adapter, ServerHandle
from inferline.errors import AdapterError, did_you_mean

GROUP = "inferline.adapters"
EMBEDDED_GROUP = "inferline.embedded_servers"

AdapterFactory = Callable[..., Adapter]


def available() -> dict[str, str]:
    """Adapter name -> the object its entry point names."""
    return {ep.name: ep.value for ep in entry_points(group=GROUP)}


def adapter_factory(name: str) -> AdapterFactory:
    return _load(GROUP, name, "adapter")  # type: ignore[no-any-return]


def _load(group: str, name: str, what: str) -> Any:
    found = {ep.name: ep for ep in entry_points(group=group)}
    if name not in found:
        raise AdapterError(
            f"no {what} named {name!r}{did_you_mean(name, found)}; installed: {sorted(found) or 'none'}",
            f"install its package (e.g. pip install 'inferline[{name}]') or choose one of {sorted(found)}",
        )
    try:
        return found[name].load()
    except ImportError as exc:
        raise AdapterError(
            f"{what} {name!r} cannot load: {exc}", f"install its extras: pip install 'inferline[{name}]'"
        ) from exc


def connect(name: str, address: str, **options: Any) -> Adapter:
    """An adapter of that framework connected to the server at `address` (HOST:PORT)."""
    return adapter_factory(name)(address, **options)


EmbeddedFactory = Callable[[Path, Sequence[str]], AbstractContextManager[ServerHandle]]


def embedded_server(name: str, repository: str | Path, models: Sequence[str]) -> AbstractContextManager[ServerHandle]:
    """Start the framework's own server locally (the embedded default), stopped when the block ends."""
    factory: EmbeddedFactory = _load(EMBEDDED_GROUP, name, "embedded server")
    return factory(Path(repository), models)
