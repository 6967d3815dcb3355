"""A grid of experiment cells, declared in Python and derived from one base config. Pure + file reading.

    axes: policy × budget × …  (each level: a label, overrides, optionally a system file)
    for each combination: load_experiment(base, system, script defaults ← user overrides ← levels)

Every cell's config is resolved (and validated) here, before anything runs, so a misspelled key
fails at once and with its file.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs

from moepic.errors import ConfigError
from moepic.experiments.config import ExperimentConfig, load_experiment


@attrs.frozen
class Level:
    label: Any  # what tables and plots show
    overrides: tuple[str, ...] = ()
    system: str | None = None  # a system file overlaid on the base


@attrs.frozen
class Axis:
    name: str
    levels: tuple[Level, ...]


def sweep(name: str, key: str, values: Iterable[Any]) -> Axis:
    """One config key through values: `sweep("budget", "cache.budget", [0.25, 0.5])`."""
    return Axis(name, tuple(Level(v, (f"{key}={_literal(v)}",)) for v in values))


def choices(name: str, levels: dict[Any, Sequence[str]]) -> Axis:
    """Named levels, each a list of overrides: `choices("policy", {"lru": ["cache.policy.name=lru"]})`."""
    return Axis(name, tuple(Level(label, tuple(overrides)) for label, overrides in levels.items()))


def systems(names: Iterable[str]) -> Axis:
    """Named systems (baseline files) as the levels of an axis."""
    return Axis("system", tuple(Level(n, system=n) for n in names))


def _literal(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(_literal, value)) + "]"
    if value is None:
        return "null"
    return str(value)


@attrs.frozen(eq=False)
class Cell:
    index: int
    key: dict[str, Any]  # axis name → level label
    config: ExperimentConfig


def expand(
    base: str | Path | None, axes: Sequence[Axis], overrides: Sequence[str] = (), system: str | None = None,
    keep: Callable[[dict[str, Any]], bool] | None = None,
    derive: Callable[[dict[str, Any]], Sequence[str]] | None = None,
    allow_env: bool = False,
) -> list[Cell]:
    """One cell per combination of the axes' levels, in order (the last axis varies fastest), less
    the combinations `keep` rejects (given the cell's key: axis name → label). `derive` adds
    overrides that depend on several levels at once (after the levels' own)."""
    cells = []
    for combo in itertools.product(*(axis.levels for axis in axes)):
        key = {axis.name: level.label for axis, level in zip(axes, combo)}
        if keep is not None and not keep(key):
            continue
        named = [*([system] if system is not None else []), *(level.system for level in combo if level.system is not None)]
        if len(named) > 1:  # --system on a grid that has a systems axis, say
            raise ConfigError(f"a cell names two systems: {', '.join(named)}")
        cell_overrides = [*overrides, *(o for level in combo for o in level.overrides), *(derive(key) if derive else ())]
        config = load_experiment(base, named[0] if named else None, cell_overrides, allow_env=allow_env)
        cells.append(Cell(len(cells), key, config))
    return cells
