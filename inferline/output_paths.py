"""Where commands write their results: checked before the work that fills them, so that a path a
user mistyped costs one line, not a replay's worth of measurements."""

from __future__ import annotations

import os
from pathlib import Path

from inferline.errors import InferlineError


def make_dir(path: str | Path, what: str) -> Path:
    """Create `path` (and its parents) for `what`, or say in one line why it cannot be."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise InferlineError(f"{what} {str(folder)!r} is a file", "pass a folder") from None
    except OSError as exc:
        raise InferlineError(
            f"cannot create {what} {str(folder)!r}: {exc.strerror}", "pass a folder you can write to"
        ) from None
    return folder


def check_creatable_dir(path: str | Path, what: str) -> Path:
    """`path` is a folder, or can be made one later: its nearest existing parent is a folder that
    takes new entries. Nothing is created."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise InferlineError(f"{what} {str(folder)!r} is a file", "pass a folder")
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise InferlineError(f"cannot create {what} {str(folder)!r}: {str(existing)!r} is a file", "pass a folder")
    if existing != folder and not os.access(existing, os.W_OK):
        raise InferlineError(
            f"cannot create {what} {str(folder)!r}: {str(existing)!r} takes no new entries",
            "pass a folder you can write to",
        )
    return folder


def check_writable_file(path: str | Path, what: str) -> Path:
    """`path` can be written as a file later: its folder exists and takes new files, and it is no folder."""
    file = Path(path)
    folder = file.parent
    if file.is_dir():
        raise InferlineError(f"{what} {str(file)!r} is a folder", "pass a file name")
    if not folder.is_dir():
        raise InferlineError(f"cannot write {what} {str(file)!r}: its folder does not exist", "create it first")
    if not os.access(folder, os.W_OK) or (file.exists() and not os.access(file, os.W_OK)):
        raise InferlineError(f"cannot write {what} {str(file)!r}: permission denied", "pass a path you can write to")
    return file


def write_text(path: str | Path, text: str, what: str) -> None:
    try:
        Path(path).write_text(text)
    except OSError as exc:
        raise InferlineError(
            f"cannot write {what} {str(path)!r}: {exc.strerror}", "check that its folder exists"
        ) from None
