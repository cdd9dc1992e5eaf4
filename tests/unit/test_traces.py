"""Traces: generator strings (rates and true CVs), files, and one-line errors that name the line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray

from inferline.errors import TraceError
from inferline.traces import describe_trace, load_trace, validate_trace


def gap_cv(arrivals: NDArray[np.float64]) -> float:
    gaps = np.diff(arrivals)
    return float(gaps.std() / gaps.mean())


def window(arrivals: NDArray[np.float64], lo: float, hi: float) -> NDArray[np.float64]:
    return arrivals[(arrivals >= lo) & (arrivals < hi)]


def trace_error(source: str) -> str:
    with pytest.raises(TraceError) as info:
        load_trace(source)
    text = str(info.value)
    assert "\n" not in text
    return text


def write(tmp_path: Path, text: str, name: str = "trace.txt") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# --- gamma ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("cv", [0.5, 1.0, 4.0])
def test_gamma_has_requested_rate_and_true_cv(cv: float) -> None:
    # 400k queries: the rate's relative s.d. is about cv/sqrt(n) <= 0.7 %, the sample CV's about 1 %.
    rate, n = 250.0, 400_000
    duration = n / rate
    a = load_trace(f"gamma:rate={rate:g},cv={cv:g},duration={duration:g},seed=11")
    assert a.dtype == np.float64
    assert np.all(np.diff(a) >= 0)
    assert a[0] >= 0 and a[-1] < duration
    assert a.size / duration == pytest.approx(rate, rel=0.03)
    # The *true* CV, not its square (cv=4 would give ~16 with the shape=1/cv convention, 2 with shape=1/cv).
    assert gap_cv(a) == pytest.approx(cv, rel=0.05)
    d = describe_trace(a)
    assert d["cv"] == pytest.approx(cv, rel=0.05)
    assert d["mean_rate_qps"] == pytest.approx(rate, rel=0.03)


def test_gamma_default_cv_is_poisson() -> None:
    a = load_trace("gamma:rate=500,duration=400,seed=2")
    assert gap_cv(a) == pytest.approx(1.0, rel=0.05)
    assert a.size / 400 == pytest.approx(500, rel=0.03)


def test_gamma_is_reproducible_with_seed_and_differs_with_another() -> None:
    a = load_trace("gamma:rate=100,cv=2,duration=60,seed=1")
    b = load_trace("gamma:rate=100,cv=2,duration=60,seed=1")
    c = load_trace("gamma:rate=100,cv=2,duration=60,seed=2")
    np.testing.assert_array_equal(a, b)
    assert a.size != c.size or not np.array_equal(a, c)


def test_gamma_parameter_order_and_spaces_do_not_matter() -> None:
    a = load_trace("gamma:seed=3,duration=30,cv=2,rate=50")
    b = load_trace("gamma:rate=50, cv=2, duration=30, seed=3")
    np.testing.assert_array_equal(a, b)


# --- step ----------------------------------------------------------------------------------------


def test_step_segments_have_their_rates_and_cvs() -> None:
    every = 2000.0
    rates, cvs = (50.0, 200.0, 100.0), (1.0, 0.5, 4.0)
    a = load_trace("step:rate=50/200/100,cv=1/0.5/4,every=2000,seed=5")
    assert a[-1] < 3 * every
    assert np.all(np.diff(a) >= 0)
    for i, (rate, cv) in enumerate(zip(rates, cvs, strict=True)):
        seg = window(a, i * every, (i + 1) * every)
        assert seg.size / every == pytest.approx(rate, rel=0.05), f"segment {i}"
        assert gap_cv(seg) == pytest.approx(cv, rel=0.05), f"segment {i}"


def test_step_single_cv_applies_to_all_segments() -> None:
    a = load_trace("step:rate=100/400,cv=2,every=1500,seed=9")
    first, second = window(a, 0, 1500), window(a, 1500, 3000)
    assert first.size / 1500 == pytest.approx(100, rel=0.05)
    assert second.size / 1500 == pytest.approx(400, rel=0.05)
    assert gap_cv(first) == pytest.approx(2.0, rel=0.05)
    assert gap_cv(second) == pytest.approx(2.0, rel=0.05)


def test_step_single_rate_several_cvs() -> None:
    a = load_trace("step:rate=300,cv=0.5/3,every=1500,seed=4")
    assert window(a, 0, 1500).size / 1500 == pytest.approx(300, rel=0.05)
    assert window(a, 1500, 3000).size / 1500 == pytest.approx(300, rel=0.05)
    assert gap_cv(window(a, 0, 1500)) == pytest.approx(0.5, rel=0.05)
    assert gap_cv(window(a, 1500, 3000)) == pytest.approx(3.0, rel=0.05)


# --- ramp ----------------------------------------------------------------------------------------


def test_ramp_rate_rises_from_to() -> None:
    duration = 3000.0
    a = load_trace(f"ramp:from=100,to=400,duration={duration:g},cv=1,seed=3")
    assert a[-1] < duration
    assert np.all(np.diff(a) >= 0)
    tenth = duration / 10
    first = window(a, 0, tenth).size / tenth
    last = window(a, duration - tenth, duration).size / tenth
    # Over the first (last) tenth a linear ramp averages its rate at 5 % (95 %) of the way: 115 (385).
    assert first == pytest.approx(115, rel=0.05)
    assert last == pytest.approx(385, rel=0.05)
    assert last > 3 * first
    # Near the ends the rate is the ramp's from / to.
    twentieth = duration / 20
    assert window(a, 0, twentieth).size / twentieth == pytest.approx(100, rel=0.10)
    assert window(a, duration - twentieth, duration).size / twentieth == pytest.approx(400, rel=0.10)
    # The whole ramp carries the integral of the rate: (100 + 400) / 2 * duration.
    assert a.size == pytest.approx(250 * duration, rel=0.03)
    # Monotone in between.
    counts = np.histogram(a, bins=10, range=(0, duration))[0]
    assert np.all(np.diff(counts) > 0)


def test_ramp_keeps_the_local_cv() -> None:
    a = load_trace("ramp:from=200,to=300,duration=2000,cv=2,seed=8")
    assert gap_cv(window(a, 1800, 2000)) == pytest.approx(2.0, rel=0.08)


def test_ramp_down_and_flat() -> None:
    down = load_trace("ramp:from=400,to=100,duration=2000,seed=1")
    assert window(down, 0, 100).size / 100 == pytest.approx(400, rel=0.10)
    assert window(down, 1900, 2000).size / 100 == pytest.approx(100, rel=0.10)
    assert window(down, 0, 200).size / 200 == pytest.approx(385, rel=0.05)
    assert window(down, 1800, 2000).size / 200 == pytest.approx(115, rel=0.08)
    flat = load_trace("ramp:from=200,to=200,duration=1000,seed=1")
    assert flat.size / 1000 == pytest.approx(200, rel=0.03)
    assert flat[-1] < 1000


def test_ramp_is_reproducible() -> None:
    np.testing.assert_array_equal(
        load_trace("ramp:from=10,to=50,duration=60,seed=4"), load_trace("ramp:from=10,to=50,duration=60,seed=4")
    )


# --- files ---------------------------------------------------------------------------------------


def test_text_file_skips_comments_and_blank_lines(tmp_path: Path) -> None:
    path = write(tmp_path, "# arrivals in seconds\n\n0.0\n  0.25  \n\n# a note\n0.5\n1.5\n")
    np.testing.assert_array_equal(load_trace(path), [0.0, 0.25, 0.5, 1.5])


def test_text_file_allows_equal_times(tmp_path: Path) -> None:
    path = write(tmp_path, "1\n1\n2\n")
    np.testing.assert_array_equal(load_trace(path), [1.0, 1.0, 2.0])


def test_npy_file(tmp_path: Path) -> None:
    path = tmp_path / "t.npy"
    np.save(path, np.array([0.0, 0.1, 0.7, 2.0]))
    a = load_trace(str(path))
    assert a.dtype == np.float64
    np.testing.assert_array_equal(a, [0.0, 0.1, 0.7, 2.0])


def test_npy_integer_array_becomes_float(tmp_path: Path) -> None:
    path = tmp_path / "t.npy"
    np.save(path, np.array([0, 1, 3], dtype=np.int32))
    a = load_trace(str(path))
    assert a.dtype == np.float64
    np.testing.assert_array_equal(a, [0.0, 1.0, 3.0])


def test_npy_unsorted_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "t.npy"
    np.save(path, np.array([0.0, 2.0, 1.0]))
    text = trace_error(str(path))
    assert "t.npy" in text


def test_npy_garbage_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "t.npy"
    path.write_bytes(b"this is not numpy")
    assert "t.npy" in trace_error(str(path))


# --- file errors ---------------------------------------------------------------------------------


def test_non_ascending_names_both_lines(tmp_path: Path) -> None:
    path = write(tmp_path, "0.1\n0.2\n0.9\n0.4\n1.0\n")
    text = trace_error(path)
    assert "line 4" in text and "line 3" in text
    assert "0.4" in text and "0.9" in text
    assert "ascending" in text


def test_non_ascending_line_numbers_count_comment_lines(tmp_path: Path) -> None:
    # 0.3 is on file line 5, 0.5 on file line 4.
    path = write(tmp_path, "# header\n\n0.1\n0.5\n0.3\n")
    text = trace_error(path)
    assert "line 5" in text and "line 4" in text


def test_non_number_line_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "# header\n0.1\n\n0.2\nabc\n0.3\n")
    text = trace_error(path)
    assert "line 5" in text
    assert "abc" in text


@pytest.mark.parametrize("body", ["", "\n\n", "# only a comment\n"], ids=["empty", "blank", "comment"])
def test_empty_file_is_rejected(tmp_path: Path, body: str) -> None:
    text = trace_error(write(tmp_path, body))
    assert "empty" in text


def test_negative_time_is_rejected(tmp_path: Path) -> None:
    text = trace_error(write(tmp_path, "-0.5\n0.1\n"))
    assert "negative" in text
    assert "1" in text


def test_negative_time_names_its_file_line(tmp_path: Path) -> None:
    text = trace_error(write(tmp_path, "# header\n-0.5\n0.1\n"))
    assert "line 2" in text


def test_non_finite_value_is_rejected(tmp_path: Path) -> None:
    text = trace_error(write(tmp_path, "0.1\nnan\n0.3\n"))
    assert "finite" in text
    text = trace_error(write(tmp_path, "0.1\n0.2\ninf\n", name="inf.txt"))
    assert "finite" in text


def test_missing_file_is_neither_file_nor_generator(tmp_path: Path) -> None:
    text = trace_error(str(tmp_path / "missing.txt"))
    assert "missing.txt" in text
    assert "gamma:" in text  # the hint shows a generator


def test_unknown_generator_name_is_treated_as_a_missing_file() -> None:
    text = trace_error("poisson:rate=1,duration=1")
    assert "neither a file nor a generator" in text


@pytest.mark.parametrize(
    "source",
    ["gamma:rate=10,duration=10,seed=-1", "gamma:rate=10,duration=inf", "DIRECTORY", "BINARY"],
    ids=["negative-seed", "infinite-duration", "directory", "non-utf8"],
)
def test_odd_inputs_give_trace_error(tmp_path: Path, source: str) -> None:
    if source == "DIRECTORY":
        source = str(tmp_path)
    elif source == "BINARY":
        path = tmp_path / "bin.txt"
        path.write_bytes(b"\xff\xfe\x00\n")
        source = str(path)
    trace_error(source)


# --- generator errors ----------------------------------------------------------------------------


def test_unknown_generator_key() -> None:
    text = trace_error("gamma:rate=10,cv=1,duration=10,burst=3")
    assert "burst" in text
    assert "gamma" in text


def test_typo_of_optional_key_is_unknown() -> None:
    assert "sed" in trace_error("gamma:rate=10,duration=10,sed=1")


def test_typo_of_required_key_reports_the_missing_key() -> None:
    message = trace_error("gamma:rate=10,durration=10")
    assert "durration" in message and "did you mean 'duration'" in message


@pytest.mark.parametrize(
    ("source", "key"),
    [
        ("gamma:cv=1,duration=10", "rate"),
        ("gamma:rate=10,cv=1", "duration"),
        ("step:rate=10/20,cv=1", "every"),
        ("step:every=10", "rate"),
        ("ramp:to=10,duration=10", "from"),
        ("ramp:from=10,duration=10", "to"),
        ("ramp:from=1,to=10", "duration"),
        ("gamma:", "rate"),
    ],
)
def test_missing_required_key(source: str, key: str) -> None:
    text = trace_error(source)
    assert f"needs {key}=" in text


def test_missing_key_message_keeps_its_ellipsis() -> None:
    assert "needs rate=..." in trace_error("gamma:duration=10")


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        ("gamma:rate=0,duration=10", "rate=0"),
        ("gamma:rate=-5,duration=10", "rate=-5"),
        ("gamma:rate=10,cv=0,duration=10", "cv=0"),
        ("gamma:rate=10,duration=0", "duration=0"),
        ("gamma:rate=nan,duration=10", "rate=nan"),
        ("step:rate=10/0/10,every=5", "rate=0"),
        ("step:rate=10,every=-1", "every=-1"),
        ("ramp:from=0,to=10,duration=10", "from=0"),
        ("ramp:from=10,to=-1,duration=10", "to=-1"),
    ],
)
def test_non_positive_values_are_rejected(source: str, needle: str) -> None:
    text = trace_error(source)
    assert needle in text
    assert "positive" in text


def test_step_with_mismatched_list_lengths() -> None:
    text = trace_error("step:rate=100/300/100,cv=1/4,every=10")
    assert "cv" in text
    assert "2" in text and "3" in text


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        ("gamma:rate=abc,duration=10", "rate=abc"),
        ("gamma:rate,duration=10", "'rate'"),
        ("step:rate=1/x,every=1", "1/x"),
    ],
)
def test_malformed_parameters(source: str, needle: str) -> None:
    assert needle in trace_error(source)


# --- validate_trace and describe_trace ----------------------------------------------------------


def test_validate_trace_flattens_and_converts() -> None:
    a = validate_trace(np.array([[0, 1], [2, 3]], dtype=np.int64), "x")  # type: ignore[arg-type]
    assert a.dtype == np.float64
    np.testing.assert_array_equal(a, [0.0, 1.0, 2.0, 3.0])


def test_describe_trace_on_known_values() -> None:
    d = describe_trace(np.array([0.0, 1.0, 2.0, 4.0]))
    assert d["queries"] == 4
    assert d["duration_s"] == pytest.approx(4.0)
    assert d["mean_rate_qps"] == pytest.approx(0.75)  # 3 gaps over 4 s
    assert d["cv"] == pytest.approx(np.sqrt(2 / 9) / (4 / 3))


def test_describe_trace_regular_and_single() -> None:
    d = describe_trace(np.arange(0, 10, 0.5))
    assert d["cv"] == pytest.approx(0.0, abs=1e-12)
    assert d["mean_rate_qps"] == pytest.approx(2.0)
    one = describe_trace(np.array([3.0]))
    assert one == {"queries": 1.0, "duration_s": 0.0, "mean_rate_qps": 0.0, "cv": 0.0}
