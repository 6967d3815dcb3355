"""Named baselines: ready configurations of moepic's own strategies, one YAML file each. Pure + file reading.

Each file in `moepic/sim/baselines/` says which published system it approximates and where it
differs, and holds a `cache:` node (θ, policy, predictor, as `moepic generate` reads them) and
optionally a `configurator:` that picks per-layer budgets and θ on the latency model. A run
config (`moepic generate --config` YAML, e.g. from `moepic configure`) is a setup too.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import yaml

from moepic.configurators import CONFIGURATORS, ConfiguratorConfig
from moepic.configurators.base import AUTO_POLICIES
from moepic.errors import ConfigError
from moepic.policies.base import POLICIES, PolicyConfig
from moepic.predictors import PREDICTORS, PredictorConfig

BASELINES_DIR = Path(__file__).parent / "baselines"
# The comparison's row order: published systems, ablations, ours, the bound.
ORDER = (
    "on-demand-lru", "lru-prefetch", "pre-gated", "adapmoe", "moe-infinity", "prefetch-only", "cache-only", "moepic-lcp", "moepic", "oracle",
)


@attrs.frozen(kw_only=True)
class Setup:
    """What to simulate: the strategies, θ (one or per layer), and optionally a budget and a configurator."""

    name: str
    approximates: str = ""
    theta: float | tuple[float, ...] = 0.5
    policy: PolicyConfig
    predictor: PredictorConfig
    configurator: ConfiguratorConfig | None = None
    # With a configurator: candidate policies; the one whose configuration the latency model
    # predicts fastest on the profiling trace is used (`policy` is then the first).
    policy_choices: tuple[PolicyConfig, ...] = ()
    budget: str | float | tuple[str | float, ...] | None = None  # a run config's own; --budget replaces it


def known_baselines() -> str:
    return ", ".join(ORDER)


def load_baseline(name: str) -> Setup:
    path = BASELINES_DIR / f"{name}.yaml"
    if name not in ORDER or not path.is_file():
        raise ConfigError(f"unknown baseline {name!r}; known: {known_baselines()}")
    data = yaml.safe_load(path.read_text())
    unknown = set(data) - {"approximates", "cache", "configurator"}
    if unknown:
        raise ConfigError(f"{path}: unknown key {sorted(unknown)[0]!r}; known: approximates, cache, configurator")
    cache = data["cache"]
    configurator = data.get("configurator")
    policies = AUTO_POLICIES if cache["policy"] == "auto" else cache["policy"] if isinstance(cache["policy"], list) else [cache["policy"]]
    choices = tuple(POLICIES.structure_node(p, f"{path}: cache.policy") for p in policies)
    if len(choices) > 1 and not configurator:
        raise ConfigError(f"{path}: a list of policies needs a configurator to choose among them")
    return Setup(
        name=name,
        approximates=str(data.get("approximates", "")),
        theta=float(cache["theta"]),
        policy=choices[0],
        policy_choices=choices if len(choices) > 1 else (),
        predictor=PREDICTORS.structure_node(cache["predictor"], f"{path}: cache.predictor"),
        configurator=CONFIGURATORS.structure_node(configurator, f"{path}: configurator") if configurator else None,
    )


def setup_from_run_config(path: str) -> Setup:
    """The `cache:` section of a run config (`moepic generate --config` YAML)."""
    from moepic.config import load_config

    cache = load_config(path).cache
    return Setup(name=Path(path).stem, theta=cache.theta, policy=cache.policy, predictor=cache.predictor, budget=cache.budget)
