"""Output paths are checked before the work that fills them, and a bad one is one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from inferline.errors import InferlineError
from inferline.output_paths import check_creatable_dir, check_writable_file, make_dir, write_text


def test_make_dir_creates_parents_and_names_a_file_in_the_way(tmp_path: Path) -> None:
    made = make_dir(tmp_path / "a" / "b", "output folder")
    assert made.is_dir()
    a_file = tmp_path / "f"
    a_file.write_text("x")
    with pytest.raises(InferlineError, match=r"output folder '.*f' is a file"):
        make_dir(a_file, "output folder")
    with pytest.raises(InferlineError, match=r"cannot create output folder '.*f/sub': Not a directory") as err:
        make_dir(a_file / "sub", "output folder")
    assert "\n" not in err.value.one_line()


def test_a_folder_to_be_made_later_is_checked_without_being_made(tmp_path: Path) -> None:
    later = check_creatable_dir(tmp_path / "x" / "y", "metrics folder")
    assert later == tmp_path / "x" / "y" and not (tmp_path / "x").exists()
    a_file = tmp_path / "f"
    a_file.write_text("x")
    with pytest.raises(InferlineError, match="is a file"):
        check_creatable_dir(a_file, "metrics folder")
    with pytest.raises(InferlineError, match=r"cannot create metrics folder '.*f/y/z': '.*f' is a file"):
        check_creatable_dir(a_file / "y" / "z", "metrics folder")


def test_a_file_to_be_written_later_needs_its_folder(tmp_path: Path) -> None:
    assert check_writable_file(tmp_path / "r.json", "results file") == tmp_path / "r.json"
    assert not (tmp_path / "r.json").exists()
    with pytest.raises(InferlineError, match="its folder does not exist"):
        check_writable_file(tmp_path / "no" / "r.json", "results file")
    with pytest.raises(InferlineError, match="is a folder"):
        check_writable_file(tmp_path, "results file")


def test_write_text_failure_is_one_line_naming_the_file(tmp_path: Path) -> None:
    write_text(tmp_path / "ok.txt", "hi", "report")
    assert (tmp_path / "ok.txt").read_text() == "hi"
    with pytest.raises(InferlineError, match=r"cannot write report '.*no/ok.txt': No such file or directory"):
        write_text(tmp_path / "no" / "ok.txt", "hi", "report")
