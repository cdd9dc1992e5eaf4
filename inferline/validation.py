"""Turn pydantic validation errors into one InferlineError line with field paths."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from inferline.errors import InferlineError

M = TypeVar("M", bound=BaseModel)


def _field_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "(top level)"


def describe(err: ValidationError) -> str:
    """All errors at once, each as `path: message`, joined on one line."""
    parts = []
    for e in err.errors():
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{_field_path(tuple(e['loc']))}: {msg}")
    return "; ".join(parts)


def parse(model: type[M], data: Any, what: str, error: type[InferlineError], fix: str) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise error(f"{what} is invalid: {describe(exc)}", fix) from None


def read_yaml(path: str | Path, what: str, error: type[InferlineError]) -> Any:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise error(f"cannot read {what} {str(p)!r}: {exc.strerror}", f"check the path to the {what}") from None
    except UnicodeDecodeError:
        raise error(f"{what} {str(p)!r} is not UTF-8 text", f"pass the {what} file") from None
    try:
        return yaml.safe_load(text)
    except RecursionError:
        raise error(f"{what} {str(p)!r} nests too deeply", "flatten the YAML") from None
    except ValueError as exc:  # e.g. an integer past Python's conversion limit
        raise error(f"{what} {str(p)!r} holds a value YAML cannot read ({exc})", "fix that value") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise error(f"{what} {str(p)!r} is not valid YAML{where}", "fix the YAML syntax") from None


def check_cores(cores: float | None) -> None:
    """`--cores` must be a positive number of cores where given."""
    if cores is not None and not cores > 0:
        raise InferlineError(f"--cores must be positive, got {cores:g}", "pass the cores the replicas share")
