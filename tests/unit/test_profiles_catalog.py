"""Profiles (service-time interpolation, validation, loading) and the hardware catalog."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from inferline.catalog import DEFAULT_CATALOG, HardwareCatalog, load_catalog
from inferline.errors import CatalogError, ProfileError
from inferline.profiles import ModelProfile, load_profile, load_profiles, parse_profile, require_profiles
from inferline.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
REPRESENTATIVE = EXAMPLES / "profiles" / "representative"


def points(*pairs: tuple[int, float]) -> list[dict[str, Any]]:
    return [{"batch_size": b, "latency_ms": {"mean": ms, "p50": ms, "p99": ms * 1.1}} for b, ms in pairs]


def profile_data(model: str = "m", **hw: list[dict[str, Any]]) -> dict[str, Any]:
    return {"model": model, "profiles": hw or {"v100": points((1, 10.0), (4, 16.0), (8, 30.0))}}


def write_profile(directory: Path, data: dict[str, Any], name: str | None = None) -> Path:
    path = directory / (name or f"{data['model']}.json")
    path.write_text(json.dumps(data))
    return path


def profile_error(data: object) -> str:
    with pytest.raises(ProfileError) as info:
        parse_profile(data, "profile 'x.json'")
    text = str(info.value)
    assert "\n" not in text
    return text


# --- service times -------------------------------------------------------------------------------


def test_service_times_interpolate_linearly() -> None:
    prof = parse_profile(profile_data(), "p")
    table = prof.service_times_ms("v100", 8)
    assert table.shape == (9,)
    assert table[0] == 0.0
    # Profiled sizes: exactly the profile's mean.
    assert table[1] == 10.0 and table[4] == 16.0 and table[8] == 30.0
    # Between 1 and 4: 10 + 2 per query; between 4 and 8: 16 + 3.5 per query.
    np.testing.assert_allclose(table[1:5], [10.0, 12.0, 14.0, 16.0])
    np.testing.assert_allclose(table[4:9], [16.0, 19.5, 23.0, 26.5, 30.0])


def test_service_times_up_to_a_smaller_profiled_size() -> None:
    prof = parse_profile(profile_data(), "p")
    np.testing.assert_allclose(prof.service_times_ms("v100", 4), [0.0, 10.0, 12.0, 14.0, 16.0])
    np.testing.assert_allclose(prof.service_times_ms("v100", 1), [0.0, 10.0])


def test_service_times_below_smallest_profiled_size_hold_its_latency() -> None:
    prof = parse_profile(profile_data(cpu=points((2, 8.0), (4, 12.0))), "p")
    np.testing.assert_allclose(prof.service_times_ms("cpu", 4), [0.0, 8.0, 8.0, 10.0, 12.0])


def test_service_times_match_every_representative_profile() -> None:
    for path in sorted(REPRESENTATIVE.glob("*.json")):
        prof = load_profile(path)
        for hw, pts in prof.profiles.items():
            largest = pts[-1].batch_size
            table = prof.service_times_ms(hw, largest)
            for p in pts:
                assert table[p.batch_size] == pytest.approx(p.latency_ms.mean), (path.name, hw, p.batch_size)
            assert np.all(np.diff(table[1:]) >= 0), (path.name, hw)


def test_service_times_need_a_profiled_max_batch_size() -> None:
    prof = parse_profile(profile_data(), "p")
    with pytest.raises(ProfileError) as info:
        prof.service_times_ms("v100", 3)
    text = str(info.value)
    assert "3" in text and "'v100'" in text and "'m'" in text
    assert "[1, 4, 8]" in text


def test_throughput_is_batch_over_mean_latency() -> None:
    prof = parse_profile(profile_data(), "p")
    assert prof.throughput_qps("v100", 1) == pytest.approx(100.0)
    assert prof.throughput_qps("v100", 4) == pytest.approx(250.0)
    assert prof.throughput_qps("v100", 8) == pytest.approx(8 / 0.030)
    assert prof.batch_sizes("v100") == (1, 4, 8)


def test_missing_hardware_names_model_and_hardware() -> None:
    prof = parse_profile(profile_data(model="resnet50"), "p")
    with pytest.raises(ProfileError) as info:
        prof.service_times_ms("v10", 1)
    text = str(info.value)
    assert "'resnet50'" in text and "'v10'" in text
    assert "did you mean 'v100'" in text
    with pytest.raises(ProfileError, match=r"'resnet50'.*'tpu'"):
        prof.points("tpu")


# --- profile validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sizes",
    [[(1, 5.0), (1, 6.0)], [(4, 5.0), (2, 6.0)], [(1, 5.0), (8, 9.0), (4, 7.0)]],
    ids=["equal", "decreasing", "later-decrease"],
)
def test_non_increasing_batch_sizes_are_rejected(sizes: list[tuple[int, float]]) -> None:
    text = profile_error(profile_data(cpu=points((1, 1.0), (2, 2.0)), k80=points(*sizes)))
    assert "'k80'" in text
    assert "increase" in text


@pytest.mark.parametrize("mean", [0.0, -3.0])
def test_non_positive_latency_is_rejected_naming_hardware(mean: float) -> None:
    text = profile_error(profile_data(k80=[{"batch_size": 1, "latency_ms": {"mean": mean}}]))
    assert "k80" in text
    assert "latency_ms.mean" in text


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"model": "m", "profiles": {}}, "profiles"),
        ({"model": "m", "profiles": {"cpu": []}}, "'cpu'"),
        ({"profiles": {"cpu": points((1, 1.0))}}, "model"),
        ({"model": "m", "profiles": {"cpu": [{"batch_size": 0, "latency_ms": {"mean": 1}}]}}, "batch_size"),
        ({"model": "m", "profiles": {"cpu": [{"batch_size": 1}]}}, "latency_ms"),
        ({"model": "m", "profiles": {"cpu": [{"batch_size": 1, "latency_ms": {"p50": 1}}]}}, "mean"),
        ([1, 2], "x.json"),
    ],
    ids=["no-hardware", "no-points", "no-model", "batch-0", "no-latency", "no-mean", "not-object"],
)
def test_malformed_profiles_are_rejected(data: object, needle: str) -> None:
    assert needle in profile_error(data)


def test_extra_profile_keys_are_kept() -> None:
    data = profile_data()
    data["source"] = "measured"
    prof = parse_profile(data, "p")
    assert isinstance(prof, ModelProfile)
    assert prof.model_extra == {"source": "measured"}


# --- loading profiles ----------------------------------------------------------------------------


def test_load_profile_bad_json_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": "m",\n "profiles": ')
    with pytest.raises(ProfileError, match=r"bad\.json.*not valid JSON \(line 2\)"):
        load_profile(bad)
    with pytest.raises(ProfileError, match=r"missing\.json"):
        load_profile(tmp_path / "missing.json")


def test_load_profiles_keys_by_model_name_not_file_name(tmp_path: Path) -> None:
    write_profile(tmp_path, profile_data(model="yolo"), name="detector.json")
    write_profile(tmp_path, profile_data(model="alpr"))
    (tmp_path / "notes.txt").write_text("not a profile")
    profiles = load_profiles(tmp_path)
    assert sorted(profiles) == ["alpr", "yolo"]


def test_load_profiles_empty_dir(tmp_path: Path) -> None:
    with pytest.raises(ProfileError) as info:
        load_profiles(tmp_path)
    assert "no *.json" in str(info.value)
    assert str(tmp_path) in str(info.value)


def test_load_profiles_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(ProfileError) as info:
        load_profiles(tmp_path / "nowhere")
    assert "nowhere" in str(info.value)
    assert "does not exist" in str(info.value)


def test_load_profiles_duplicate_model(tmp_path: Path) -> None:
    write_profile(tmp_path, profile_data(model="resnet50"), name="a.json")
    write_profile(tmp_path, profile_data(model="resnet50"), name="b.json")
    with pytest.raises(ProfileError) as info:
        load_profiles(tmp_path)
    assert "'resnet50'" in str(info.value)
    assert "twice" in str(info.value)


def test_load_profiles_names_the_broken_file(tmp_path: Path) -> None:
    write_profile(tmp_path, profile_data(model="ok"))
    write_profile(tmp_path, profile_data(model="broken", gpu=points((2, 3.0), (1, 2.0))))
    with pytest.raises(ProfileError) as info:
        load_profiles(tmp_path)
    assert "broken.json" in str(info.value)
    assert "'gpu'" in str(info.value)


def test_require_profiles_names_missing_model_with_suggestion() -> None:
    profiles = {"resnet50": parse_profile(profile_data(model="resnet50"), "p")}
    require_profiles(["resnet50"], profiles)
    with pytest.raises(ProfileError) as info:
        require_profiles(["resnet50", "resnet52"], profiles)
    text = str(info.value)
    assert "'resnet52'" in text
    assert "did you mean 'resnet50'" in text
    with pytest.raises(ProfileError, match="'yolo'"):
        require_profiles(["yolo"], profiles)


# --- examples ------------------------------------------------------------------------------------


def test_every_representative_profile_loads() -> None:
    files = sorted(REPRESENTATIVE.glob("*.json"))
    assert files
    for path in files:
        prof = load_profile(path)
        assert prof.model == path.stem
        assert prof.profiles
    assert len(load_profiles(REPRESENTATIVE)) == len(files)


@pytest.mark.parametrize("path", sorted((EXAMPLES / "pipelines").glob("*.yaml")), ids=lambda p: p.stem)
def test_example_pipelines_have_profiles_on_catalog_hardware(path: Path) -> None:
    spec = load_spec(path)
    local = path.stem.startswith("local-")  # the embedded default's pipelines run on measured CPU profiles
    profiles = load_profiles(EXAMPLES / "profiles" / "measured-cpu" if local else REPRESENTATIVE)
    require_profiles([s.model for s in spec.stages], profiles)
    catalog = load_catalog(EXAMPLES / ("catalog-local.yaml" if local else "catalog.yaml"))
    for s in spec.stages:
        assert set(profiles[s.model].profiles) & set(catalog.hardware), s.model


# --- catalog -------------------------------------------------------------------------------------


def test_example_catalog_loads_with_authors_prices() -> None:
    cat = load_catalog(EXAMPLES / "catalog.yaml")
    assert isinstance(cat, HardwareCatalog)
    assert cat.price("cpu") == pytest.approx(0.0665)
    assert cat.price("k80") == pytest.approx(0.634)
    assert cat.price("v100") == pytest.approx(2.528)
    assert cat.get("v100").accelerator is True
    assert cat.get("cpu").accelerator is False


def test_catalog_unknown_hardware_names_it_and_suggests() -> None:
    with pytest.raises(CatalogError) as info:
        DEFAULT_CATALOG.price("v10")
    text = str(info.value)
    assert "'v10'" in text
    assert "did you mean 'v100'" in text
    assert "\n" not in text


def write_catalog(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "catalog.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("price", ["0", "-1.5"])
def test_catalog_non_positive_price_is_rejected(tmp_path: Path, price: str) -> None:
    path = write_catalog(tmp_path, f"hardware:\n  cpu: {{price_per_hour: 0.1}}\n  tpu: {{price_per_hour: {price}}}\n")
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    text = str(info.value)
    assert "hardware.tpu.price_per_hour" in text
    assert "catalog.yaml" in text
    assert "\n" not in text


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("hardware: {}\n", "hardware"),
        ("hardware:\n  cpu: {price: 1}\n", "hardware.cpu"),
        ("hardware:\n  cpu: {price_per_hour: 1, accelerater: true}\n", "accelerater"),
        ("gpus: {}\n", "gpus"),
        ("hardware: [cpu\n", "YAML"),
    ],
    ids=["empty", "missing-price", "typo", "wrong-top", "bad-yaml"],
)
def test_malformed_catalogs_are_rejected(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(CatalogError) as info:
        load_catalog(write_catalog(tmp_path, text))
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_catalog_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match=r"nope\.yaml"):
        load_catalog(tmp_path / "nope.yaml")


def test_custom_catalog(tmp_path: Path) -> None:
    cat = load_catalog(write_catalog(tmp_path, "hardware:\n  a100: {price_per_hour: 4.1, accelerator: true}\n"))
    assert list(cat.hardware) == ["a100"]
    assert cat.price("a100") == pytest.approx(4.1)


def test_cpu_shares_interpolate_and_clip_the_measured_server_cpu() -> None:
    from inferline.profiles import parse_profile

    points = [
        {"batch_size": 1, "latency_ms": {"mean": 10.0, "server_cpu_ms": 2.0}},
        {"batch_size": 4, "latency_ms": {"mean": 20.0}},  # not measured: left out
        {"batch_size": 8, "latency_ms": {"mean": 40.0, "server_cpu_ms": 60.0}},  # several threads: clipped
    ]
    profile = parse_profile({"model": "m", "profiles": {"cpu": points}}, "test")
    shares = profile.cpu_shares("cpu", 8)
    assert shares is not None
    assert shares[0] == 0.0 and shares[1] == pytest.approx(0.2) and shares[8] == 1.0
    assert shares[4] == pytest.approx(0.2 + (1.5 - 0.2) * 3 / 7)  # interpolated between the measured sizes
    bare = [{"batch_size": 1, "latency_ms": {"mean": 1.0}}]
    unmeasured = parse_profile({"model": "m", "profiles": {"cpu": bare}}, "t")
    assert unmeasured.cpu_shares("cpu", 1) is None
