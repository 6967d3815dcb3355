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
"""

from __future__ import annotations

import math
from pathlib import Path

import attrs
import yaml

from moepic.errors import ConfigError
from moepic.outputs import write_text_atomic

PROFILES_DIR = Path(__file__).parent / "profiles"


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
    # Host memory bandwidth an expert computed on the CPU reaches (a future compute-on-CPU path).
    cpu_expert_gbps: float | None = attrs.field(default=None, validator=_positive)
    # The offloading engine's own host work, beyond copies and compute: per MoE layer step that
    # plans a cache (planner, policy, prefetch bookkeeping) and per loaded expert (staging, submit,
    # wait, reassembly). Fitted by `moepic profile` to engine runs of the calibration model; 0 in
    # the reference profiles (not measured there).
    offload_step_us: float = attrs.field(default=0.0, validator=_non_negative)
    load_us: float = attrs.field(default=0.0, validator=_non_negative)

    def copy_s(self, nbytes: float, copies: float = 1.0) -> float:
        """Seconds to copy `nbytes` host→device in `copies` copies."""
        return nbytes / (self.link_gbps * 1e9) + copies * self.link_latency_us * 1e-6

    def call_s(self, weight_bytes: float, flops: float, overhead_us: float) -> float:
        """Roofline time of one call that reads `weight_bytes` and computes `flops`."""
        return overhead_us * 1e-6 + max(weight_bytes / (self.memory_gbps * 1e9), flops / (self.matmul_tflops * 1e12))

    def as_dict(self) -> dict:
        return {k: v for k, v in attrs.asdict(self).items() if v is not None}


def known_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def load_profile(name_or_path: str | Path) -> HardwareProfile:
    """A bundled profile by name (`a6000`) or a YAML file written by `moepic profile`."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = PROFILES_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown hardware profile {str(name_or_path)!r}; known: {', '.join(known_profiles())} (or a YAML file)")
    if not path.is_file():
        raise ConfigError(f"{path}: hardware profile file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return profile_from_dict(data, str(path))


def profile_from_dict(data: object, where: str) -> HardwareProfile:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of hardware profile keys, got {type(data).__name__}")
    fields = {f.name: f for f in attrs.fields(HardwareProfile)}
    unknown = sorted(set(map(str, data)) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown hardware profile key {unknown[0]!r}; known: {', '.join(fields)}")
    missing = [name for name, f in fields.items() if f.default is attrs.NOTHING and name not in data]
    if missing:
        raise ConfigError(f"{where}: hardware profile misses {', '.join(map(repr, missing))}")
    for name, value in data.items():
        if fields[name].type in ("str",) and not isinstance(value, str):
            raise ConfigError(f"{where}: key {name!r} should be text, got {value!r}")
    try:
        return HardwareProfile(**data)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: {e}") from None


def save_profile(profile: HardwareProfile, path: str | Path) -> None:
    """Write `profile` as YAML, all or nothing (moepic.outputs): a failure leaves an older file at `path` intact."""
    write_text_atomic(path, "hardware profile", yaml.safe_dump(profile.as_dict(), sort_keys=False))
