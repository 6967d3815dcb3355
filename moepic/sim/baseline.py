"""Named baselines: ready configurations of moepic's own strategies, one YAML file each. Pure + file reading.

Each file in `moepic/sim/baselines/` says which published system it approximates and where it
differs, and holds a `cache:` node (θ, policy, predictor, as `moepic generate` reads them) and
optionally a `configurator:` that picks per-layer budgets and θ on the latency model. A run
config (`moepic generate --config` YAML, e.g. from `moepic configure`) is a setup too.
"""

from __future__ import annotations

from pathlib import Path

import attrs

from moepic.config import CacheConfig, load_config
from moepic.configurators import ConfiguratorConfig
from moepic.errors import ConfigError
from moepic.quant import FormatConfig
from moepic.policies.base import PolicyConfig
from moepic.predictors import PredictorConfig
from moepic.structure import load_layers

BASELINES_DIR = Path(__file__).parent / "baselines"
# The comparison's row order: published systems, ablations, ours, the bound. The hybrid systems
# (some experts computed on the host CPU) need a host profile, and run only where one is given.
ORDER = (
    "on-demand-lru", "lru-prefetch", "pre-gated", "adapmoe", "moe-infinity", "prefetch-only", "cache-only", "moepic-lcp", "moepic", "oracle",
)
HYBRID_ORDER = ("fiddler", "llama-cpp-n-cpu-moe", "ktransformers", "hybrimoe", "moepic-hybrid")


@attrs.frozen(kw_only=True)
class Setup:
    """What to simulate: the strategies, θ (one or per layer), and optionally a budget and a configurator."""

    name: str
    approximates: str = ""
    theta: float | tuple[float, ...] | None = None  # None: automatic (moepic.cache.layout.plan_layout)
    policy: PolicyConfig
    predictor: PredictorConfig
    configurator: ConfiguratorConfig | None = None
    # With a configurator: candidate policies; the one whose configuration the latency model
    # predicts fastest on the profiling trace is used (`policy` is then the first).
    policy_choices: tuple[PolicyConfig, ...] = ()
    budget: str | float | tuple[str | float, ...] | None = None  # a run config's own; --budget replaces it
    hybrid: str = "off"  # where loads run (moepic/cache/placement.py); --hybrid replaces it
    miss_format: FormatConfig | None = None  # serve misses from a low-bit copy (cache.miss_format)


@attrs.frozen(kw_only=True)
class SystemConfig:
    """A named system: what a baseline file holds (and the system part of an experiment config)."""

    approximates: str = ""
    # As `moepic generate` reads it: θ, policy, predictor (and a budget, which --budget replaces).
    cache: CacheConfig = CacheConfig()
    # Picks per-layer budgets and θ on the latency model; None: θ and an even split.
    configurator: ConfiguratorConfig | None = None
    # With a configurator: candidate policies, the fastest predicted on the profiling trace is
    # used (as `moepic configure --policy auto`); empty: `cache.policy`.
    policy_choices: tuple[PolicyConfig, ...] = ()

    def __attrs_post_init__(self) -> None:
        if self.policy_choices and self.configurator is None:
            raise ValueError("policy_choices needs a configurator to choose among them")

    def setup(self, name: str) -> Setup:
        choices = self.policy_choices
        return Setup(
            name=name, approximates=self.approximates, theta=self.cache.theta, policy=choices[0] if choices else self.cache.policy,
            policy_choices=choices if len(choices) > 1 else (), predictor=self.cache.predictor,
            configurator=self.configurator, budget=self.cache.budget, hybrid=self.cache.hybrid,
            miss_format=self.cache.miss_format,
        )


def known_baselines() -> str:
    return ", ".join(ORDER + HYBRID_ORDER)


def baseline_path(name: str) -> Path:
    path = BASELINES_DIR / f"{name}.yaml"
    if name not in ORDER + HYBRID_ORDER or not path.is_file():
        raise ConfigError(f"unknown baseline {name!r}; known: {known_baselines()}")
    return path


def load_baseline(name: str) -> Setup:
    return load_layers(SystemConfig, [baseline_path(name)]).setup(name)


def setup_from_run_config(path: str) -> Setup:
    """The `cache:` section of a run config (`moepic generate --config` YAML)."""
    return SystemConfig(cache=load_config(path).cache).setup(Path(path).stem)
