"""YAML → frozen attrs: the one place plain data becomes typed config, for any attrs class. Pure,
apart from reading the YAML files.

    YAML files ─read_yaml─▶ dicts ─merge_layers (+ key=value overrides)─▶ one dict ─structure─▶ frozen attrs
                                                         frozen attrs ─unstructure─▶ plain dicts (logged, written)

OmegaConf is used only here, and only for its YAML reading, dotted overrides and interpolation
(`${a.b}`); no OmegaConf resolver runs (moepic/interpolation.py). Unknown keys, ill-typed values and
values outside their stated range (moepic/ranges.py) fail with the dotted key, what was expected
and the value found. A node whose class depends on its data (a strategy's `{name: lcp, …}`)
subclasses `TaggedNode`; moepic/registry.py is the one that does. This module knows no schema and
no strategy: the run schema is moepic/config.py, the experiment schema moepic/experiments/config.py.
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

from moepic.errors import ConfigError
from moepic.interpolation import check_resolvers
from moepic.ranges import OutOfRange


class TaggedNode:
    """Base of a config class whose YAML node names the class it becomes (a strategy: `name`).

    `structure` hands such a field's node to `structure_node`, which picks the class and builds it;
    `unstructure` writes `node_tag()` ahead of the fields, so the plain form reads back the same."""

    @classmethod
    def structure_node(cls, data: Any, key: str) -> TaggedNode:
        raise NotImplementedError

    def node_tag(self) -> dict[str, Any]:
        raise NotImplementedError


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
    if isinstance(tp, type) and issubclass(tp, TaggedNode):  # a strategy node: its class depends on `name`
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


def unstructure(value: Any) -> Any:
    """The inverse of `structure`: plain dicts, lists and scalars (strategies with their `name`)."""
    if isinstance(value, TaggedNode):
        return value.node_tag() | {k: unstructure(v) for k, v in attrs.asdict(value, recurse=False).items()}
    if attrs.has(type(value)):
        return {f.name: unstructure(getattr(value, f.name)) for f in attrs.fields(type(value))}
    if isinstance(value, (list, tuple)):
        return [unstructure(v) for v in value]
    return value
