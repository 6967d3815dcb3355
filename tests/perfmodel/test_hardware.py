"""Hardware profiles: the bundled reference GPUs load and round-trip through YAML, every malformed
profile fails naming its file and the bad key, and the copy / call roofline arithmetic."""

from __future__ import annotations

import re

import attrs
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from moepic.errors import ConfigError
from moepic.perfmodel.hardware import (
    PROFILES_DIR,
    HardwareProfile,
    known_profiles,
    load_profile,
    profile_from_dict,
    save_profile,
)

BUNDLED = known_profiles()
REQUIRED = [f.name for f in attrs.fields(HardwareProfile) if f.default is attrs.NOTHING]


def _reference() -> dict:
    return load_profile("a6000").as_dict()


def _write(path, data) -> str:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def test_known_profiles_are_the_bundled_yaml_files():
    assert BUNDLED == sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
    assert "a6000" in BUNDLED and len(BUNDLED) >= 2


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_profile_loads_by_name_says_it_is_not_measured_and_round_trips(name, tmp_path):
    profile = load_profile(name)
    assert profile.name == name
    assert "not measured here" in profile.source
    path = tmp_path / f"{name}.yaml"
    save_profile(profile, path)
    assert load_profile(path) == profile
    assert load_profile(str(path)).as_dict() == profile.as_dict()


def test_measured_style_profile_without_optional_keys_round_trips(tmp_path):
    data = {k: v for k, v in _reference().items() if k in REQUIRED} | {"name": "mine", "source": "measured by hand"}
    profile = profile_from_dict(data, "here")
    assert profile.pageable_link_gbps is None and profile.cpu_expert_gbps is None
    assert "pageable_link_gbps" not in profile.as_dict()
    save_profile(profile, tmp_path / "mine.yaml")
    assert load_profile(tmp_path / "mine.yaml") == profile


def test_unknown_name_lists_the_known_profiles():
    with pytest.raises(ConfigError) as e:
        load_profile("no-such-gpu")
    message = str(e.value)
    assert "'no-such-gpu'" in message
    assert all(name in message for name in BUNDLED)


def test_missing_yaml_file_is_named(tmp_path):
    path = tmp_path / "gone.yaml"
    with pytest.raises(ConfigError, match=re.escape(f"{path}: hardware profile file not found")):
        load_profile(path)


def test_invalid_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nlink_gbps: [1, 2\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: not valid YAML")):
        load_profile(path)


def test_yaml_that_is_not_a_mapping_names_the_file(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: expected a mapping")):
        load_profile(path)


def test_profile_missing_a_required_field_names_the_file_and_the_key(tmp_path):
    data = _reference()
    del data["link_gbps"]
    path = _write(tmp_path / "partial.yaml", data)
    with pytest.raises(ConfigError) as e:
        load_profile(path)
    assert str(e.value) == f"{path}: hardware profile misses 'link_gbps'"


@given(st.sets(st.sampled_from(REQUIRED), min_size=1))
def test_every_dropped_required_key_is_named_and_no_other(dropped):
    data = {k: v for k, v in _reference().items() if k not in dropped}
    with pytest.raises(ConfigError) as e:
        profile_from_dict(data, "somewhere.yaml")
    message = str(e.value)
    assert message.startswith("somewhere.yaml: hardware profile misses ")
    named = {part.strip("'") for part in message.removeprefix("somewhere.yaml: hardware profile misses ").split(", ")}
    assert named == set(dropped)


def test_unknown_key_is_named(tmp_path):
    path = _write(tmp_path / "typo.yaml", _reference() | {"link_gbs": 12.0})
    with pytest.raises(ConfigError) as e:
        load_profile(path)
    assert str(e.value).startswith(f"{path}: unknown hardware profile key 'link_gbs'")
    assert "link_gbps" in str(e.value)  # the known keys are listed


@pytest.mark.parametrize(
    "key,value,complaint",
    [
        ("link_gbps", 0, "link_gbps must be a positive number, got 0"),
        ("link_gbps", -1, "link_gbps must be a positive number, got -1"),
        ("link_gbps", float("inf"), "link_gbps must be a positive number, got inf"),
        ("link_gbps", "fast", "link_gbps must be a positive number, got 'fast'"),
        ("memory_gbps", 0.0, "memory_gbps must be a positive number"),
        ("pageable_link_gbps", 0, "pageable_link_gbps must be a positive number"),
        ("link_latency_us", -1, "link_latency_us must be a number >= 0, got -1"),
        ("expert_overhead_us", float("nan"), "expert_overhead_us must be a number >= 0"),
        ("name", 7, "key 'name' should be text, got 7"),
    ],
)
def test_out_of_range_or_mistyped_value_fails_naming_the_field(tmp_path, key, value, complaint):
    path = _write(tmp_path / "bad.yaml", _reference() | {key: value})
    with pytest.raises(ConfigError) as e:
        load_profile(path)
    assert str(e.value).startswith(f"{path}: ")
    assert complaint in str(e.value)


def test_zero_latency_and_overheads_are_allowed():
    profile = profile_from_dict(_reference() | {"link_latency_us": 0, "expert_overhead_us": 0.0, "layer_overhead_us": 0}, "x")
    assert profile.copy_s(0) == 0.0
    assert profile.call_s(0, 0, profile.expert_overhead_us) == 0.0


def test_boolean_rate_is_rejected():
    with pytest.raises(ConfigError, match="link_gbps"):
        profile_from_dict(_reference() | {"link_gbps": True}, "x")


rates = st.floats(min_value=1e-3, max_value=1e5, allow_nan=False, allow_infinity=False)
amounts = st.floats(min_value=0, max_value=1e12, allow_nan=False, allow_infinity=False)


def _profile(**values) -> HardwareProfile:
    return attrs.evolve(load_profile("a6000"), **values)


@given(nbytes=amounts, copies=st.floats(0, 1e4), gbps=rates, latency_us=st.floats(0, 1e4))
def test_copy_seconds_are_bytes_over_bandwidth_plus_latency_per_copy(nbytes, copies, gbps, latency_us):
    profile = _profile(link_gbps=gbps, link_latency_us=latency_us)
    expected = nbytes / (gbps * 1e9) + copies * latency_us * 1e-6
    assert profile.copy_s(nbytes, copies) == pytest.approx(expected, rel=1e-9, abs=1e-300)
    assert profile.copy_s(nbytes) == pytest.approx(nbytes / (gbps * 1e9) + latency_us * 1e-6, rel=1e-9, abs=1e-300)


@given(weight_bytes=amounts, flops=amounts, overhead_us=st.floats(0, 1e4), memory_gbps=rates, tflops=rates)
def test_call_seconds_are_overhead_plus_the_slower_of_memory_and_compute(weight_bytes, flops, overhead_us, memory_gbps, tflops):
    profile = _profile(memory_gbps=memory_gbps, matmul_tflops=tflops)
    memory_s, compute_s = weight_bytes / (memory_gbps * 1e9), flops / (tflops * 1e12)
    got = profile.call_s(weight_bytes, flops, overhead_us)
    assert got == pytest.approx(overhead_us * 1e-6 + max(memory_s, compute_s), rel=1e-9, abs=1e-300)
    assert got >= overhead_us * 1e-6


def test_call_seconds_switch_from_memory_bound_to_compute_bound():
    profile = _profile(memory_gbps=100.0, matmul_tflops=1.0, link_latency_us=0.0)
    # 1 GB at 100 GB/s is 10 ms; 1 TFLOP at 1 TFLOPS is 1 s.
    assert profile.call_s(1e9, 1e6, 0) == pytest.approx(0.01)
    assert profile.call_s(1e9, 1e12, 0) == pytest.approx(1.0)
    assert profile.call_s(1e9, 1e12, 50) == pytest.approx(1.0 + 50e-6)
