"""Hardware profiles: the measured (or published) speeds the latency model needs. Pure, plus YAML I/O.

A profile is a handful of rates and fixed costs, enough for a roofline estimate of every part of
a decode step (moepic/perfmodel/latency.py):
- host→device copies: `link_gbps` with `link_latency_us` per copy (pinned memory);
- device→device copies (a cached top segment into a staging buffer): `device_copy_gbps`;
- compute: an expert or attention call costs its fixed launch overhead plus the larger of its
  weight bytes over `memory_gbps` and its flops over `matmul_tflops` (decode is memory-bound);
- the engine's own host work per planned layer step and per loaded expert.
`moepic profile` measures one on the current machine; `moepic/perfmodel/profiles/*.yaml` holds
reference GPUs from published figures, each saying so in `source`. `save_profile` writes the file
whole or not at all.

A `HostProfile` describes the CPU beside the device, for experts computed where their weights
already are (host memory): its expert GEMV rate, hand-off cost per call, the DRAM bandwidth that
CPU compute and host→device copies share, and how long a result takes to reach the device. It has
its own YAML (`moepic/perfmodel/profiles/host/*.yaml`: reference CPUs) and is carried by a
`HardwareProfile` as its `host` section: one YAML may hold both (`moepic profile` writes them so),
or a run names them apart (`--hardware a6000 --host desktop-ddr5`).
"""

from __future__ import annotations

import math
from pathlib import Path

import attrs
import yaml

from moepic.errors import ConfigError
from moepic.outputs import write_text_atomic
from moepic.ranges import OutOfRange, Range

PROFILES_DIR = Path(__file__).parent / "profiles"
HOST_PROFILES_DIR = PROFILES_DIR / "host"

# A host profile's ranges: 10 TB/s is far above any CPU's DRAM, one second above any hand-off.
HOST_GBPS = Range(0, 10_000, low_open=True)
HOST_US = Range(0, 1e6)
HOST_GFLOPS = Range(0, 1e7, low_open=True)  # 10 PFLOP/s: far above any socket
PHYSICAL_CORES = Range(1, 65_536, whole=True)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)  # YAML `yes` is no rate


def _positive(instance, attribute, value) -> None:
    if value is not None and not (_number(value) and 0 < value < math.inf):
        raise ValueError(f"{attribute.name} must be a positive number, got {value!r}")


def _non_negative(instance, attribute, value) -> None:
    if not (_number(value) and 0 <= value < math.inf):
        raise ValueError(f"{attribute.name} must be a number >= 0, got {value!r}")


@attrs.frozen(kw_only=True)
class HardwareProfile:
    name: str
    # Where the numbers come from: "measured by moepic profile on …" or "published figures …; not measured here".
    source: str
    device: str  # "cuda", "cpu"
    link_gbps: float = attrs.field(validator=_positive)  # pinned host→device, 1e9 bytes/s
    link_latency_us: float = attrs.field(validator=_non_negative)  # fixed cost of one copy
    device_copy_gbps: float = attrs.field(validator=_positive)  # device→device copies
    memory_gbps: float = attrs.field(validator=_positive)  # what a decode matmul reads weights at
    matmul_tflops: float = attrs.field(validator=_positive)  # dense half-precision matmul throughput
    expert_overhead_us: float = attrs.field(validator=_non_negative)  # launches of one expert call
    layer_overhead_us: float = attrs.field(validator=_non_negative)  # launches of a layer's attention, norms, router
    pageable_link_gbps: float | None = attrs.field(default=None, validator=_positive)  # unpinned host memory
    # Read from older profiles only: `moepic profile` wrote the host's fp32 expert rate here before
    # host profiles existed; `host.fp32_expert_gbps` supersedes it and nothing reads it.
    cpu_expert_gbps: float | None = attrs.field(default=None, validator=_positive)
    # The offloading engine's own host work, beyond copies and compute: per MoE layer step that
    # plans a cache (planner, policy, prefetch bookkeeping) and per loaded expert (staging, submit,
    # wait, reassembly). Fitted by `moepic profile` to engine runs of the calibration model; 0 in
    # the reference profiles (not measured there).
    offload_step_us: float = attrs.field(default=0.0, validator=_non_negative)
    load_us: float = attrs.field(default=0.0, validator=_non_negative)
    # Hybrid runs: the engine's own work per load computed on the host (staging its input, handing
    # the job over, taking its result in), beyond the host's compute; fitted like the two above.
    host_load_us: float = attrs.field(default=0.0, validator=_non_negative)
    host: HostProfile | None = None  # the CPU beside the device; None: not described

    def copy_s(self, nbytes: float, copies: float = 1.0) -> float:
        """Seconds to copy `nbytes` host→device in `copies` copies."""
        return nbytes / (self.link_gbps * 1e9) + copies * self.link_latency_us * 1e-6

    def call_s(self, weight_bytes: float, flops: float, overhead_us: float) -> float:
        """Roofline time of one call that reads `weight_bytes` and computes `flops`."""
        return overhead_us * 1e-6 + max(weight_bytes / (self.memory_gbps * 1e9), flops / (self.matmul_tflops * 1e12))

    def as_dict(self) -> dict:
        values = attrs.asdict(self, recurse=False) | {"host": self.host and self.host.as_dict()}
        return {k: v for k, v in values.items() if v is not None}


@attrs.frozen(kw_only=True)
class HostProfile:
    """The host CPU as a place to run experts, at decode (one token: a GEMV per projection)."""

    name: str
    source: str  # as HardwareProfile's: measured where and when, or which published figures
    # Expert weight bytes streamed through SwiGLU per second, 1e9 bytes/s, per weight dtype: CPUs
    # without native bf16 arithmetic convert on the fly, so bf16 may stream slower than fp32.
    bf16_expert_gbps: float = attrs.field(validator=HOST_GBPS)
    fp32_expert_gbps: float = attrs.field(validator=HOST_GBPS)
    call_overhead_us: float = attrs.field(validator=HOST_US)  # handing one expert call to the worker threads and back
    # DRAM bandwidth (read + write traffic) that CPU compute and host→device copies share.
    memory_gbps: float = attrs.field(validator=HOST_GBPS)
    physical_cores: int = attrs.field(validator=PHYSICAL_CORES)
    # Dense matmul throughput of the worker threads (10⁹ flop/s), for a prompt's many tokens at
    # once; None: not described, and each token is priced as streaming the weights again (an
    # upper bound that leaves large prompts to the device).
    matmul_gflops: float | None = attrs.field(default=None, validator=HOST_GFLOPS)
    # A host-computed result (a D-vector per token) reaching the device; None where no device was
    # there to measure it (a CPU-only machine).
    result_latency_us: float | None = attrs.field(default=None, validator=HOST_US)
    # int4-fused experts (quant/int4_fused.py): their stored bytes (codes and scales) through torch's
    # fused CPU int4 kernel per second, 1e9 bytes/s; None: not described, and hybrid auto with
    # int4-fused experts is refused naming this key.
    int4_expert_gbps: float | None = attrs.field(default=None, validator=attrs.validators.optional(HOST_GBPS))

    def expert_gbps(self, dtype_bytes: int, kernel: str = "dense") -> float:
        """The expert rate of a format's host kernel (ExpertFormat.host_kernel): dense weights of
        `dtype_bytes` bytes (2: bf16 or fp16, 4: fp32), or int4-fused's stored bytes."""
        if kernel == "int4":
            if self.int4_expert_gbps is None:
                raise ConfigError(f"host profile {self.name!r} has no int4_expert_gbps to price host compute of int4-fused "
                                  "experts; measure one with moepic profile, or add it to the profile")
            return self.int4_expert_gbps
        if kernel != "dense":
            raise ValueError(f"no host rate for kernel {kernel!r}")
        return self.fp32_expert_gbps if dtype_bytes >= 4 else self.bf16_expert_gbps

    def as_dict(self) -> dict:
        return {k: v for k, v in attrs.asdict(self).items() if v is not None}


def known_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def known_hosts() -> list[str]:
    return sorted(p.stem for p in HOST_PROFILES_DIR.glob("*.yaml"))


def _read_yaml(name_or_path: str | Path, folder: Path, what: str, known: list[str]) -> tuple[object, str]:
    """(the parsed YAML, its path) of a bundled profile by name or of a YAML file."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = folder / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown {what} {str(name_or_path)!r}; known: {', '.join(known)} (or a YAML file)")
    if not path.is_file():
        raise ConfigError(f"{path}: {what} file not found")
    try:
        return yaml.safe_load(path.read_text()), str(path)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None


def load_profile(name_or_path: str | Path) -> HardwareProfile:
    """A bundled profile by name (`a6000`) or a YAML file written by `moepic profile`."""
    data, where = _read_yaml(name_or_path, PROFILES_DIR, "hardware profile", known_profiles())
    return profile_from_dict(data, where)


def load_host(name_or_path: str | Path) -> HostProfile:
    """A bundled host profile by name (`desktop-ddr5`), a host profile YAML, or a hardware profile
    YAML with a `host` section (as `moepic profile` writes): its host section."""
    data, where = _read_yaml(name_or_path, HOST_PROFILES_DIR, "host profile", known_hosts())
    if isinstance(data, dict) and "host" in data and "device" in data:
        return host_from_dict(data["host"], where, key_prefix="host.")
    return host_from_dict(data, where)


def _from_dict(cls, data: object, where: str, what: str, key_prefix: str = ""):
    """`cls` from a YAML mapping: one line naming the file and the key for what is wrong."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of {what} keys, got {type(data).__name__}")
    fields = {f.name: f for f in attrs.fields(cls)}
    unknown = sorted(set(map(str, data)) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown {what} key {key_prefix + unknown[0]!r}; known: {', '.join(fields)}")
    missing = [key_prefix + name for name, f in fields.items() if f.default is attrs.NOTHING and name not in data]
    if missing:
        raise ConfigError(f"{where}: {what} misses {', '.join(map(repr, missing))}")
    for name, value in data.items():
        if fields[name].type in ("str",) and not isinstance(value, str):
            raise ConfigError(f"{where}: key {key_prefix + name!r} should be text, got {value!r}")
    try:
        return cls(**data)
    except OutOfRange as e:
        raise ConfigError(f"{where}: {key_prefix}{e}") from None
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: {e}") from None


def host_from_dict(data: object, where: str, *, key_prefix: str = "") -> HostProfile:
    return _from_dict(HostProfile, data, where, "host profile", key_prefix)


def profile_from_dict(data: object, where: str) -> HardwareProfile:
    """A hardware profile; its `host` is a mapping (the host profile itself) or the name of a
    bundled host profile or a host YAML file (relative to the profile's folder)."""
    host = data.get("host") if isinstance(data, dict) else None
    profile = _from_dict(HardwareProfile, {k: v for k, v in data.items() if k != "host"} if host is not None else data,
                         where, "hardware profile")
    if host is None:
        return profile
    if isinstance(host, str):
        named = Path(where).parent / host
        return attrs.evolve(profile, host=load_host(named if named.suffix and named.is_file() else host))
    return attrs.evolve(profile, host=host_from_dict(host, where, key_prefix="host."))


def save_profile(profile: HardwareProfile, path: str | Path) -> None:
    """Write `profile` as YAML, all or nothing (moepic.outputs): a failure leaves an older file at `path` intact."""
    write_text_atomic(path, "hardware profile", yaml.safe_dump(profile.as_dict(), sort_keys=False))
