"""Strategies chosen by name in YAML: one registry per kind (cache policy, predictor, …). Pure.

A registry maps a name to (config class, factory) and holds the kind's default name. A YAML node
`{name: lcp, rho: 0.25}` becomes that name's frozen config (`structure_node`); `build(config, …)`
makes the strategy. Unknown names and keys fail with the known ones listed. Config classes
subclass `StrategyConfig` (a `TaggedNode` of moepic/structure.py) and point at their registry,
which is how `structure` knows to build such a field by its `name`. Layering: structure ◀─ registry
◀─ policies, predictors, configurators ◀─ config (the run schema, which takes their defaults).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

import attrs

from moepic.errors import ConfigError
from moepic.structure import TaggedNode, structure

T = TypeVar("T", bound=type)


@attrs.frozen
class Entry:
    config: type
    factory: Callable[..., Any]


class Registry(dict[str, Entry]):
    def __init__(self, kind: str, default: str) -> None:
        super().__init__()
        self.kind = kind  # "policy", "predictor": for messages
        self.default = default  # the name a node without one gets

    def register(self, name: str, config: type[StrategyConfig]) -> Callable[[T], T]:
        """Class decorator: `name` in YAML builds `cls(config_instance, …)`."""

        def register(cls: T) -> T:
            if name in self:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            config.name = name
            self[name] = Entry(config, cls)
            return cls

        return register

    def known(self) -> str:
        return ", ".join(sorted(self))

    def default_config(self) -> StrategyConfig:
        """The default strategy's config with its own defaults (`{name: <default>}` in YAML)."""
        return self.structure_node({"name": self.default}, self.kind)

    def structure_node(self, data: Any, key: str) -> StrategyConfig:
        """The config class registered under `data['name']`, built from the node's other keys."""
        if isinstance(data, StrategyConfig):
            return data
        if isinstance(data, str):  # `policy: lru` is shorthand for `policy: {name: lru}`
            data = {"name": data}
        if not isinstance(data, Mapping):
            raise ConfigError(f"config key {key}: expected a mapping with a 'name' (one of {self.known()}), got {data!r}")
        data = {"name": self.default} | dict(data)  # `cache.policy.rho=0.5` tunes the default
        entry = self.get(data["name"])
        if entry is None:
            raise ConfigError(f"config key {key}.name: unknown {self.kind} {data['name']!r}; known: {self.known()}")
        return structure(entry.config, {k: v for k, v in data.items() if k != "name"}, key)

    def build(self, config: StrategyConfig, *args: Any, **kwargs: Any) -> Any:
        return self[config.name].factory(config, *args, **kwargs)


class StrategyConfig(TaggedNode):
    """Base of a strategy's frozen config; subclasses name their registry."""

    name: ClassVar[str]
    registry: ClassVar[Registry]

    @classmethod
    def structure_node(cls, data: Any, key: str) -> StrategyConfig:
        return cls.registry.structure_node(data, key)

    def node_tag(self) -> dict[str, Any]:
        return {"name": self.name}

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name} | attrs.asdict(self)
