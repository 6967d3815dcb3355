"""Host profiles (the CPU beside the device): the bundled reference CPUs load and round-trip, a
hardware profile carries one as its `host` section (inline or by name) while older profiles without
it load as before, and every malformed host profile fails in one line naming the file, the key,
what was expected and what was found."""

from __future__ import annotations

import re

import attrs
import pytest
import yaml

from moepic.errors import ConfigError
from moepic.perfmodel.hardware import (
    HOST_PROFILES_DIR,
    PROFILES_DIR,
    HostProfile,
    host_from_dict,
    known_hosts,
    known_profiles,
    load_host,
    load_profile,
    profile_from_dict,
    save_profile,
)

HOSTS = known_hosts()
REQUIRED = [f.name for f in attrs.fields(HostProfile) if f.default is attrs.NOTHING]


def _desktop() -> dict:
    return load_host("desktop-ddr5").as_dict()


def _write(path, data) -> str:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def test_the_three_reference_hosts_are_bundled_apart_from_the_gpus():
    assert {"desktop-ddr5", "workstation-ddr5", "server-amx"} <= set(HOSTS)
    assert HOSTS == sorted(p.stem for p in HOST_PROFILES_DIR.glob("*.yaml"))
    assert not set(HOSTS) & set(known_profiles())


@pytest.mark.parametrize("name", HOSTS)
def test_bundled_host_loads_by_name_says_it_is_not_measured_and_round_trips(name, tmp_path):
    host = load_host(name)
    assert host.name == name and "not measured here" in host.source
    assert host.memory_gbps >= max(host.bf16_expert_gbps, host.fp32_expert_gbps)  # a GEMV cannot outrun DRAM
    # Every reference host prices int4-fused experts, never above what DRAM gives a GEMV.
    assert host.int4_expert_gbps is not None and host.int4_expert_gbps <= host.fp32_expert_gbps
    path = _write(tmp_path / f"{name}.yaml", host.as_dict())
    assert load_host(path) == host


def test_more_memory_channels_mean_faster_reference_hosts():
    desktop, workstation, server = (load_host(n) for n in ("desktop-ddr5", "workstation-ddr5", "server-amx"))
    assert desktop.memory_gbps < workstation.memory_gbps <= server.memory_gbps
    assert desktop.physical_cores < workstation.physical_cores < server.physical_cores


def test_expert_rate_follows_the_weight_dtype():
    host = attrs.evolve(load_host("desktop-ddr5"), bf16_expert_gbps=10.0, fp32_expert_gbps=30.0)
    assert (host.expert_gbps(2), host.expert_gbps(4)) == (10.0, 30.0)


def test_int4_fused_experts_are_priced_at_the_int4_rate_and_their_flops_from_their_bytes():
    from moepic.perfmodel.host_costs import HostPricing
    from moepic.quant import build_format

    host = attrs.evolve(load_host("desktop-ddr5"), bf16_expert_gbps=10.0, int4_expert_gbps=20.0, memory_gbps=1000.0,
                        call_overhead_us=0.0, matmul_gflops=100.0)
    fmt = build_format("int4-fused")
    assert fmt.weight_bytes(2) == 0.5 + 4 / 64  # half a byte of code, a bf16 scale and offset per 64
    int4 = HostPricing(host=host, link_gbps=10.0, link_latency_us=0.0, dtype_bytes=2, kernel=fmt.host_kernel,
                       weight_bytes=fmt.weight_bytes(2))
    dense = HostPricing(host=host, link_gbps=10.0, link_latency_us=0.0, dtype_bytes=2)
    nbytes = 2**20
    assert int4.host_s(nbytes, 1) == pytest.approx(nbytes / 20e9) and dense.host_s(nbytes, 1) == pytest.approx(nbytes / 10e9)
    # a prompt's tokens: 2 flops per weight per token, the weights behind the bytes
    assert int4.host_s(nbytes, 64) == pytest.approx(2 * nbytes / fmt.weight_bytes(2) * 64 / 100e9)


def test_a_host_without_an_int4_rate_cannot_price_int4_fused_experts():
    host = load_host("desktop-ddr5")
    assert attrs.evolve(host, int4_expert_gbps=None).as_dict().get("int4_expert_gbps") is None
    with pytest.raises(ConfigError, match="host profile 'desktop-ddr5' has no int4_expert_gbps"):
        attrs.evolve(host, int4_expert_gbps=None).expert_gbps(2, "int4")


@pytest.mark.parametrize("name", known_profiles())
def test_older_gpu_profiles_load_unchanged_without_a_host(name):
    profile = load_profile(name)
    assert profile.host is None and "host" not in profile.as_dict()
    written = yaml.safe_load((PROFILES_DIR / f"{name}.yaml").read_text())
    assert profile.as_dict() == {"offload_step_us": 0.0, "load_us": 0.0, "host_load_us": 0.0} | written


def test_an_older_measured_profile_with_cpu_expert_gbps_still_loads(tmp_path):
    data = load_profile("a6000").as_dict() | {"name": "old-box", "cpu_expert_gbps": 12.5}
    profile = load_profile(_write(tmp_path / "old.yaml", data))
    assert profile.cpu_expert_gbps == 12.5 and profile.host is None


def test_one_yaml_holds_a_gpu_and_its_host_and_round_trips(tmp_path):
    both = attrs.evolve(load_profile("a6000"), host=load_host("workstation-ddr5"))
    path = tmp_path / "both.yaml"
    save_profile(both, path)
    assert yaml.safe_load(path.read_text())["host"]["name"] == "workstation-ddr5"
    assert load_profile(path) == both
    # The same file names a host on its own: its host section.
    assert load_host(path) == both.host


def test_a_hardware_yaml_may_name_its_host(tmp_path):
    by_name = _write(tmp_path / "named.yaml", load_profile("a6000").as_dict() | {"host": "server-amx"})
    assert load_profile(by_name).host == load_host("server-amx")
    _write(tmp_path / "mine-host.yaml", _desktop() | {"name": "mine"})
    by_file = _write(tmp_path / "filed.yaml", load_profile("a6000").as_dict() | {"host": "mine-host.yaml"})
    assert load_profile(by_file).host.name == "mine"  # found beside the profile, not in the working folder


def test_result_latency_may_be_unset():
    data = {k: v for k, v in _desktop().items() if k != "result_latency_us"}
    host = host_from_dict(data, "x")
    assert host.result_latency_us is None and "result_latency_us" not in host.as_dict()


def test_unknown_host_name_lists_the_known_hosts():
    with pytest.raises(ConfigError) as e:
        load_host("no-such-cpu")
    assert str(e.value).startswith("unknown host profile 'no-such-cpu'; known: ")
    assert all(name in str(e.value) for name in HOSTS)


def test_missing_host_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'gone.yaml'}: host profile file not found")):
        load_host(tmp_path / "gone.yaml")


@pytest.mark.parametrize("dropped", REQUIRED)
def test_host_profile_missing_a_field_names_the_file_and_the_key(dropped, tmp_path):
    path = _write(tmp_path / "partial.yaml", {k: v for k, v in _desktop().items() if k != dropped})
    with pytest.raises(ConfigError) as e:
        load_host(path)
    assert str(e.value) == f"{path}: host profile misses {dropped!r}"


@pytest.mark.parametrize("key,value,expected", [
    ("memory_gbps", 0, "a number in (0, 10000]"),
    ("memory_gbps", -65.0, "a number in (0, 10000]"),
    ("bf16_expert_gbps", float("inf"), "a number in (0, 10000]"),
    ("fp32_expert_gbps", float("nan"), "a number in (0, 10000]"),
    ("fp32_expert_gbps", "fast", "a number in (0, 10000]"),
    ("bf16_expert_gbps", True, "a number in (0, 10000]"),
    ("call_overhead_us", -1, "a number in [0, 1000000]"),
    ("result_latency_us", 1e9, "a number in [0, 1000000]"),
    ("physical_cores", 0, "an integer in [1, 65536]"),
    ("physical_cores", 8.5, "an integer in [1, 65536]"),
])
def test_bad_host_value_is_one_line_naming_file_key_expected_and_got(key, value, expected, tmp_path):
    path = _write(tmp_path / "bad.yaml", _desktop() | {key: value})
    with pytest.raises(ConfigError) as e:
        load_host(path)
    assert str(e.value) == f"{path}: {key}: expected {expected}, got {value!r}"


def test_bad_value_in_a_host_section_names_the_section_key(tmp_path):
    data = load_profile("a6000").as_dict() | {"host": _desktop() | {"memory_gbps": 0}}
    path = _write(tmp_path / "both.yaml", data)
    with pytest.raises(ConfigError) as e:
        load_profile(path)
    assert str(e.value) == f"{path}: host.memory_gbps: expected a number in (0, 10000], got 0"
    del data["host"]["physical_cores"]
    with pytest.raises(ConfigError, match=re.escape(f"{path}: host profile misses 'host.physical_cores'")):
        profile_from_dict(data, path)


@pytest.mark.parametrize("host,complaint", [
    (_desktop() | {"memory_gbs": 1.0}, "unknown host profile key 'host.memory_gbs'"),
    (_desktop() | {"name": 7}, "key 'host.name' should be text, got 7"),
    ([1, 2], "expected a mapping of host profile keys, got list"),
    ("no-such-cpu", "unknown host profile 'no-such-cpu'"),
])
def test_malformed_host_section_is_one_line(host, complaint):
    with pytest.raises(ConfigError) as e:
        profile_from_dict(load_profile("a6000").as_dict() | {"host": host}, "gpu.yaml")
    assert complaint in str(e.value) and "\n" not in str(e.value)
