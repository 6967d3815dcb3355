"""Run configuration: frozen attrs classes, and the one function where YAML + overrides become them.

OmegaConf is used only inside `load_config`; everything after it is typed Python. Unknown keys,
ill-typed values and values outside their stated range (moepic/ranges.py) fail here, with the
dotted key, what was expected and the value found. Keys may interpolate other keys (`${a.b}`), but
no OmegaConf resolver runs (`check_resolvers`: a shared file must not read the environment).
Pure, apart from reading the YAML files.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, Literal

import attrs
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import InterpolationResolutionError, OmegaConfBaseException

from moepic.cache.layout import budget_bytes
from moepic.errors import ConfigError
from moepic.interpolation import check_resolvers
from moepic.policies import PolicyConfig
from moepic.registry import StrategyConfig
from moepic.policies.lcp import LCPConfig
from moepic.predictors import PredictorConfig
from moepic.predictors.base import NoneConfig
from moepic.ranges import LINK_GBPS, LINK_LATENCY_US, SEED, THETA, OutOfRange, Range


@attrs.frozen(kw_only=True)
class ModelConfig:
    # A Hugging Face model folder; None means the built-in default model.
    path: str | None = None
    # "auto" keeps the checkpoint's dtype.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "cpu"
    # Refuse a weight with NaN/Inf as it loads (one sum per tensor: 0.01-0.03 s per GB
    # with the file in the page cache, up to 0.26 s per GB cold; experiments/bench_weight_check.py).
    check_weights: bool = True


@attrs.frozen(kw_only=True)
class SamplingConfig:
    greedy: bool = False
    # Above 100 the distribution is uniform to within float rounding: a larger value is a typo.
    temperature: float = attrs.field(default=0.8, validator=Range(0, 100, low_open=True))
    top_p: float = attrs.field(default=0.95, validator=Range(0, 1, low_open=True))
    seed: int = attrs.field(default=0, validator=SEED)


@attrs.frozen(kw_only=True)
class GenerateConfig:
    prompt: str | None = None
    prompt_ids: tuple[int, ...] | None = attrs.field(default=None, validator=Range(0, 2**31 - 1, whole=True))
    # 2**20: beyond every model's context (the model's own limit is checked once its config is read).
    max_new_tokens: int = attrs.field(default=32, validator=Range(1, 2**20, whole=True))
    # Write the routing of every token (prompt and generated) to this .npz file (moepic/tracing).
    record_trace: str | None = None
    # Also store each MoE layer's router input in the trace (for training predictors).
    trace_hidden: bool = False
    # Offloaded runs: write one JSON line per token (latency, exposed copy time, bytes) to this file.
    token_log: str | None = None

    def __attrs_post_init__(self) -> None:
        if self.prompt is not None and self.prompt_ids is not None:
            raise ValueError("give generate.prompt or generate.prompt_ids, not both")


def _budget_value(instance, attribute, value) -> None:
    """A budget's form (unit, sign, size) is checked on load, before any work; its bytes need the model."""
    values = value if isinstance(value, tuple) else () if value is None else (value,)
    for i, item in enumerate(values):
        budget_bytes(item, 1, f"cache.budget[{i}]" if isinstance(value, tuple) else "cache.budget")


@attrs.frozen(kw_only=True)
class CacheConfig:
    """Expert offloading (README, "Offloading"). No budget: every expert stays on the device."""

    # Device memory for routed experts: bytes ("512MiB") or a fraction of all expert bytes (0.25),
    # cache and staging together; or a list with one cache size per MoE layer.
    budget: str | float | tuple[str | float, ...] | None = attrs.field(default=None, validator=_budget_value)
    # Split ratio θ: the share of each expert's neurons (its top segment) that the cache keeps.
    # One value, or one per MoE layer; rounded down to whole neuron blocks. None: automatic
    # (moepic.cache.layout.plan_layout: whole experts when the budget holds them all, else 0.5).
    theta: float | tuple[float, ...] | None = attrs.field(default=None, validator=THETA)
    # Replacement policy, by name: {name: lcp, rho: 0.25, window: 128}; see moepic/policies.
    policy: PolicyConfig = LCPConfig()  # POLICIES.default
    # Expert predictor for prefetching: {name: gate_lookahead, candidates: 2, horizon: 1}; see moepic/predictors.
    predictor: PredictorConfig = NoneConfig()  # PREDICTORS.default: load on demand
    # CPU runs only: emulate a host→device link of this bandwidth (GB/s) and per-copy latency (µs).
    link_gbps: float | None = attrs.field(default=None, validator=LINK_GBPS)
    link_latency_us: float = attrs.field(default=0.0, validator=LINK_LATENCY_US)
    # Compute a partial hit's cached top while its bottom is still being copied. Faster where copies
    # are exposed, but the split sum rounds differently: results equal the dense model's only up to
    # floating-point rounding (off: bit for bit).
    overlap_top: bool = False


@attrs.frozen(kw_only=True)
class RunConfig:
    model: ModelConfig = ModelConfig()
    generate: GenerateConfig = GenerateConfig()
    sampling: SamplingConfig = SamplingConfig()
    cache: CacheConfig = CacheConfig()


def _describe(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the field type `tp`; convert only lossless, obvious cases (int → float, list → tuple)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # X | None: X's own message (a strategy's known names, say)
            return _coerce(value, options[0], key)
        for option in options:
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key {key}: expected {_describe(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config key {key}: expected one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key}: expected a list, got {value!r}")
        return tuple(_coerce(item, args[0], f"{key}[{i}]") for i, item in enumerate(value))
    if isinstance(tp, type) and issubclass(tp, StrategyConfig):  # a strategy node: its class depends on `name`
        return tp.structure_node(value, key)
    if attrs.has(tp):
        return structure(tp, value, key)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"config key {key}: expected {_describe(tp)}, got {value!r}")
    return value


def structure(cls: type, data: Any, prefix: str = "") -> Any:
    """Build the attrs class `cls` from plain dicts, rejecting unknown keys and wrong types."""
    where = prefix or "the config"
    if not isinstance(data, dict):
        raise ConfigError(f"config key {where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in attrs.fields(cls)}
    unknown = sorted(set(data) - fields, key=str)  # YAML keys may be ints
    if unknown:
        known = f"known keys here: {', '.join(sorted(fields))}" if fields else "this node takes no other keys"
        raise ConfigError(f"unknown config key {prefix + '.' if prefix else ''}{unknown[0]}; {known}")
    values = {name: _coerce(value, hints[name], f"{prefix}.{name}" if prefix else name) for name, value in data.items()}
    try:
        return cls(**values)
    except OutOfRange as e:
        raise ConfigError(f"config key {prefix + '.' if prefix else ''}{e.name}: expected {e.expected}, got {e.value!r}") from None
    except ValueError as e:
        message = str(e)
        if prefix and f"{prefix}." not in message:  # a validator that knows only its field's name
            message = f"config key {prefix}: {message}"
        raise ConfigError(message) from None


def merge_layers(base: dict, over: dict) -> dict:
    """`over` on top of `base`, mappings merged key by key, except a strategy node whose name
    changes: it is replaced whole, so `cache.policy.name=lfu` (or `cache.policy: {name: lfu}` in a
    later file) drops the old policy's knobs instead of failing on them. `policy: lru` is shorthand
    for `{name: lru}`. (Only strategy nodes have a `name` key.)"""
    out = dict(base)
    for key, value in over.items():
        old = out.get(key)
        if isinstance(old, str) and isinstance(value, dict):
            old = {"name": old}
        switches = isinstance(value, dict) and "name" in value and isinstance(old, dict) and old.get("name") != value["name"]
        if isinstance(old, dict) and isinstance(value, dict) and not switches:
            out[key] = merge_layers(old, value)
        else:
            out[key] = value
    return out


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except (yaml.YAMLError, OmegaConfBaseException, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    return data


def _override(item: str) -> dict:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value (e.g. sampling.seed=3)")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist([item]), resolve=False)
    except (OmegaConfBaseException, yaml.YAMLError) as e:
        raise ConfigError(f"override {item!r}: {str(e).splitlines()[0]}") from None


def load_layers(
    cls: type, files: typing.Sequence[str | Path | None] = (), overrides: typing.Sequence[str] = (), *, allow_env: bool = False
) -> Any:
    """defaults ← each YAML file in turn ← `key=value` overrides, validated into the frozen `cls`.

    Each file is first validated on its own, so a misspelled key or strategy name is reported with
    the file it is in; then the layers are merged (`merge_layers`) and validated together.
    No layer may call an OmegaConf resolver (`check_resolvers`; `allow_env`: except oc.env).
    """
    merged: dict = {}
    for file in files:
        if file is None:
            continue
        path = Path(file)
        data = read_yaml(path)
        check_resolvers(data, str(path), allow_env=allow_env)
        alone = _resolved(data, alone=True)
        try:
            if alone is not None:  # None: it refers to another layer's keys; checked once merged
                structure(cls, alone)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        merged = merge_layers(merged, data)
    for item in overrides:  # the key is in the message, and the user just typed it
        layer = _override(item)
        check_resolvers(layer, f"override {item!r}", allow_env=allow_env)
        merged = merge_layers(merged, layer)
    # Keys left out keep their attrs defaults, so a YAML may set a single key of a section.
    return structure(cls, _resolved(merged))


def _resolved(data: dict, *, alone: bool = False) -> dict | None:
    """Interpolations (`${model.device}`) resolved, as plain containers. A layer checked `alone`
    may refer to keys another layer sets: then None."""
    try:
        return OmegaConf.to_container(OmegaConf.create(data), resolve=True)
    except OmegaConfBaseException as e:
        if alone and isinstance(e, InterpolationResolutionError):
            return None
        raise ConfigError(f"config: {str(e).splitlines()[0]}") from None


def load_config(
    yaml_path: str | Path | None = None, overrides: typing.Sequence[str] = (), *, allow_env: bool = False
) -> RunConfig:
    """defaults ← YAML file ← `key=value` overrides, validated into a frozen RunConfig."""
    return load_layers(RunConfig, [yaml_path], overrides, allow_env=allow_env)


def unstructure(value: Any) -> Any:
    """The inverse of `structure`: plain dicts, lists and scalars (strategies with their `name`)."""
    if isinstance(value, StrategyConfig):
        return {"name": value.name} | {k: unstructure(v) for k, v in attrs.asdict(value, recurse=False).items()}
    if attrs.has(type(value)):
        return {f.name: unstructure(getattr(value, f.name)) for f in attrs.fields(type(value))}
    if isinstance(value, (list, tuple)):
        return [unstructure(v) for v in value]
    return value
