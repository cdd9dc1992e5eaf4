"""Pipeline spec: parsing, graph checks and one-line errors that name the offending stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from inferline.errors import InferlineError, SpecError
from inferline.spec import PipelineSpec, load_spec, parse_spec

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "pipelines"


def spec(*stages: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"name": "p", "slo_ms": 100, **top, "stages": list(stages)}


def st(name: str, *after: str, **extra: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"name": name, "model": f"m-{name}", **extra}
    if after:
        d["after"] = list(after)
    return d


def rejected(data: object) -> str:
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    text = str(info.value)
    assert "\n" not in text
    assert isinstance(info.value, InferlineError)
    return text


# --- valid specs -------------------------------------------------------------------------------


def test_valid_spec_parses_with_defaults() -> None:
    s = parse_spec(spec(st("a"), st("b", "a", probability=0.25)))
    assert isinstance(s, PipelineSpec)
    assert s.name == "p"
    assert s.slo_ms == 100
    assert s.names == ("a", "b")
    assert s.stage("a").after == ()
    assert s.stage("a").probability == 1.0
    assert s.stage("b").after == ("a",)
    assert s.stage("b").probability == 0.25
    assert s.stage("b").model == "m-b"


def test_topological_order_diamond() -> None:
    s = parse_spec(spec(st("a"), st("b", "a"), st("c", "a"), st("d", "b", "c")))
    assert [x.name for x in s.topological_order()] == ["a", "b", "c", "d"]


def test_topological_order_diamond_listed_backwards() -> None:
    # Stages may name parents defined later in the file; the order still puts parents first,
    # and keeps the spec's order among stages that are ready together.
    s = parse_spec(spec(st("join", "left", "right"), st("right", "root"), st("left", "root"), st("root")))
    order = [x.name for x in s.topological_order()]
    assert order == ["root", "right", "left", "join"]
    pos = {n: i for i, n in enumerate(order)}
    for stage in s.stages:
        for parent in stage.after:
            assert pos[parent] < pos[stage.name]


def test_two_entry_stages_and_probability_one_are_fine() -> None:
    s = parse_spec(spec(st("x"), st("y"), st("z", "x", "y", probability=1.0)))
    assert [x.name for x in s.topological_order()][-1] == "z"
    assert {x.name for x in s.stages if not x.after} == {"x", "y"}


def test_missing_slo_is_allowed() -> None:
    data = spec(st("a"))
    del data["slo_ms"]
    assert parse_spec(data).slo_ms is None


def test_stage_lookup_suggests_close_name() -> None:
    s = parse_spec(spec(st("detect"), st("vehicle", "detect")))
    with pytest.raises(SpecError, match="did you mean 'vehicle'"):
        s.stage("vehicel")


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.stem)
def test_example_pipelines_load(path: Path) -> None:
    s = load_spec(path)
    assert s.slo_ms is not None and s.slo_ms > 0
    assert len(s.topological_order()) == len(s.stages)


# --- graph errors ------------------------------------------------------------------------------


def test_cycle_is_rejected_naming_the_stages() -> None:
    text = rejected(spec(st("entry"), st("a", "entry", "b"), st("b", "a")))
    assert "cycle" in text
    assert "'a'" in text and "'b'" in text
    assert "'entry'" not in text


def test_three_stage_cycle_names_all_three() -> None:
    text = rejected(spec(st("a", "c"), st("b", "a"), st("c", "b")))
    assert "cycle" in text
    for name in ("'a'", "'b'", "'c'"):
        assert name in text


def test_cycle_error_does_not_name_stages_downstream_of_the_cycle() -> None:
    text = rejected(spec(st("a", "b"), st("b", "a"), st("after_cycle", "b")))
    assert "'after_cycle'" not in text


def test_self_parent_is_rejected() -> None:
    text = rejected(spec(st("a"), st("loop", "loop")))
    assert "'loop'" in text


def test_unknown_parent_names_stage_and_suggests() -> None:
    text = rejected(spec(st("detect"), st("vehicle", "detct")))
    assert "'vehicle'" in text
    assert "'detct'" in text
    assert "did you mean 'detect'" in text


def test_unknown_parent_without_close_name_has_no_suggestion() -> None:
    text = rejected(spec(st("detect"), st("vehicle", "zzzzzz")))
    assert "'vehicle'" in text and "'zzzzzz'" in text
    assert "did you mean" not in text


def test_duplicate_stage_is_rejected() -> None:
    text = rejected(spec(st("a"), st("b", "a"), st("b")))
    assert "'b'" in text
    assert "twice" in text or "duplicate" in text.lower()


def test_parent_listed_twice_is_rejected() -> None:
    text = rejected(spec(st("a"), st("b", "a", "a")))
    assert "'b'" in text


@pytest.mark.parametrize("prob", [0, 1.5, -0.1])
def test_probability_outside_unit_interval_is_rejected(prob: float) -> None:
    text = rejected(spec(st("a"), st("b", "a", probability=prob)))
    assert "stages[1].probability" in text
    assert str(prob) in text or f"{float(prob)}" in text


def test_several_errors_are_reported_on_one_line() -> None:
    text = rejected(spec(st("a", probability=2), st("b", "a", probability=0)))
    assert "stages[0].probability" in text
    assert "stages[1].probability" in text


# --- field errors ------------------------------------------------------------------------------


def test_unknown_stage_key_is_rejected_with_its_path() -> None:
    text = rejected(spec(st("a"), st("b", "a", probabilty=0.5)))
    assert "stages[1].probabilty" in text


def test_unknown_top_level_key_is_rejected() -> None:
    text = rejected(spec(st("a"), slo=100))
    assert "slo" in text


@pytest.mark.parametrize("slo", [-5, 0])
def test_non_positive_slo_is_rejected(slo: float) -> None:
    text = rejected(spec(st("a"), slo_ms=slo))
    assert "slo_ms" in text


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (spec(), "stages"),
        ({"name": "p"}, "stages"),
        ({"stages": [st("a")]}, "name"),
        (spec({"name": "a"}), "stages[0].model"),
        (spec({"model": "m"}), "stages[0].name"),
        (spec({"name": "", "model": "m"}), "stages[0].name"),
        (["not", "a", "mapping"], "pipeline spec"),
        (None, "pipeline spec"),
    ],
    ids=[
        "no-stages",
        "stages-missing",
        "name-missing",
        "model-missing",
        "stage-name-missing",
        "empty-name",
        "list",
        "none",
    ],
)
def test_malformed_specs_are_rejected(data: object, needle: str) -> None:
    assert needle in rejected(data)


# --- load_spec ---------------------------------------------------------------------------------


def test_load_spec_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(SpecError) as info:
        load_spec(path)
    text = str(info.value)
    assert "\n" not in text
    assert "nope.yaml" in text


def test_load_spec_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: p\nstages:\n  - {name: a, model: m\n  - [unclosed\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    text = str(info.value)
    assert "\n" not in text
    assert "bad.yaml" in text
    assert "YAML" in text
    assert "line" in text


def test_load_spec_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert "\n" not in str(info.value)
    assert "empty.yaml" in str(info.value)


def test_load_spec_error_names_file_and_stage(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("name: p\nstages:\n  - {name: a, model: m}\n  - {name: b, model: m, after: [c]}\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    text = str(info.value)
    assert "p.yaml" in text and "'b'" in text and "'c'" in text
    assert "\n" not in text


def test_load_spec_valid_file(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        "name: p\nstages:\n  - {name: a, model: m}\n  - {name: b, model: m, after: [a], probability: 0.5}\n"
    )
    s = load_spec(str(path))
    assert s.slo_ms is None
    assert [x.name for x in s.topological_order()] == ["a", "b"]


def test_route_must_name_module_and_function() -> None:
    msg = rejected(spec(st("a"), st("b", "a", route="not a callable")))
    assert "stages[1].route" in msg and "must name a Python callable as 'module:function'" in msg


def test_entry_stage_cannot_have_a_route() -> None:
    assert "entry stage 'a' has a route" in rejected(spec(st("a", route="inferline.routes:low_confidence")))


def test_route_resolves_and_unknown_route_is_a_one_line_error() -> None:
    import numpy as np

    from inferline.routes import resolve_route

    route = resolve_route("inferline.routes:low_confidence", "b")
    assert route({"PROBS": np.array([0.5, 0.5])}) and not route({"PROBS": np.array([0.9, 0.1])})
    with pytest.raises(SpecError, match="stage 'b': cannot import route module 'nope'"):
        resolve_route("nope:f", "b")
    with pytest.raises(SpecError, match="names no callable"):
        resolve_route("inferline.routes:missing", "b")


def test_measured_probabilities_round_trip_through_write_spec(tmp_path: Path) -> None:
    from inferline.spec import with_probabilities, write_spec

    original = parse_spec(spec(st("a"), st("b", "a", probability=0.5, route="inferline.routes:low_confidence")))
    write_spec(with_probabilities(original, {"b": 0.25, "a": float("nan")}), tmp_path / "s.yaml")
    again = load_spec(tmp_path / "s.yaml")
    assert again.stage("b").probability == 0.25 and again.stage("b").route == original.stage("b").route
    assert again.stage("a").probability == 1.0
