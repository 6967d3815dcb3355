"""moepic/experiments/grid.py: axes of levels expanded into cells, each a validated ExperimentConfig."""

from __future__ import annotations

import itertools

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from moepic.structure import unstructure
from moepic.errors import ConfigError
from moepic.experiments.config import load_experiment
from moepic.experiments.grid import Axis, Level, choices, expand, sweep, systems
from moepic.policies.lcp import LCPConfig
from moepic.policies.lfu import LFUConfig
from moepic.policies.lru import LRUConfig
from moepic.sim.baseline import load_baseline

from experiments_support import BASE, TOY


def _at(config, override: str) -> bool:
    """`key=value` holds in the config."""
    key, value = override.split("=", 1)
    node = unstructure(config)
    for part in key.split("."):
        node = node[part]
    return node == yaml.safe_load(value)


POLICY = choices("policy", {"lru": ["cache.policy.name=lru"], "lfu": ["cache.policy.name=lfu"], "lcp": []})
BUDGET = sweep("budget", "cache.budget", [0.25, 0.5])


def test_expand_gives_the_product_of_the_axes_last_axis_fastest():
    cells = expand(BASE, [POLICY, BUDGET], TOY)
    assert [c.index for c in cells] == list(range(6))
    assert [c.key for c in cells] == [
        {"policy": "lru", "budget": 0.25}, {"policy": "lru", "budget": 0.5},
        {"policy": "lfu", "budget": 0.25}, {"policy": "lfu", "budget": 0.5},
        {"policy": "lcp", "budget": 0.25}, {"policy": "lcp", "budget": 0.5},
    ]


def test_each_levels_overrides_land_in_its_cells_config():
    expected_policy = {"lru": LRUConfig(), "lfu": LFUConfig(), "lcp": load_experiment(BASE).cache.policy}
    for cell in expand(BASE, [POLICY, BUDGET], TOY):
        assert cell.config.cache.budget == cell.key["budget"]
        assert cell.config.cache.policy == expected_policy[cell.key["policy"]]
        assert all(_at(cell.config, item) for item in TOY)  # the common overrides


def test_a_sweep_writes_one_override_per_value():
    assert sweep("budget", "cache.budget", [0.25, 0.5]) == Axis(
        "budget", (Level(0.25, ("cache.budget=0.25",)), Level(0.5, ("cache.budget=0.5",)))
    )
    # Lists (one value per layer) and None go through as YAML literals.
    per_layer = tuple([0.25, 0.75] * 16)
    cells = expand(BASE, [sweep("theta", "cache.theta", [per_layer]), sweep("budget", "cache.budget", [None])], TOY)
    assert cells[0].config.cache.theta == per_layer
    assert cells[0].config.cache.budget is None


def test_levels_come_after_the_common_overrides():
    cells = expand(BASE, [BUDGET], [*TOY, "cache.budget=0.125", "cache.theta=0.75"])
    assert [c.config.cache.budget for c in cells] == [0.25, 0.5]
    assert all(c.config.cache.theta == 0.75 for c in cells)


def test_a_policy_knob_for_every_cell_stays_with_that_policy():
    # cache.policy.rho applies to the base's LCP; a level switching the policy drops it.
    cells = expand(BASE, [POLICY], [*TOY, "cache.policy.rho=0.5"])
    by_policy = {c.key["policy"]: c.config.cache.policy for c in cells}
    assert by_policy["lcp"] == LCPConfig(rho=0.5, window=load_experiment(BASE).cache.policy.window)
    assert by_policy["lru"] == LRUConfig() and by_policy["lfu"] == LFUConfig()


def test_a_systems_axis_sets_the_system_and_its_strategies():
    names = ["adapmoe", "on-demand-lru", "oracle"]
    cells = expand(BASE, [systems(names), BUDGET], TOY)
    assert [c.key["system"] for c in cells] == [n for n in names for _ in range(2)]
    for cell in cells:
        assert cell.config.system == cell.key["system"]
        baseline = load_baseline(cell.key["system"])
        assert (cell.config.cache.policy, cell.config.cache.predictor, cell.config.configurator) == (
            baseline.policy, baseline.predictor, baseline.configurator,
        )
        assert cell.config.cache.budget == cell.key["budget"]


def test_the_system_argument_applies_where_no_level_names_one():
    assert {c.config.system for c in expand(BASE, [BUDGET], TOY, system="adapmoe")} == {"adapmoe"}


def test_the_system_argument_on_a_grid_of_systems_is_an_error_not_ignored():
    with pytest.raises(ConfigError) as e:
        expand(BASE, [systems(["oracle"])], TOY, system="adapmoe")
    assert str(e.value) == "a cell names two systems: adapmoe, oracle"


def test_a_cell_naming_two_systems_is_an_error():
    with pytest.raises(ConfigError) as e:
        expand(BASE, [systems(["adapmoe"]), Axis("other", (Level("o", system="oracle"),))], TOY)
    assert str(e.value) == "a cell names two systems: adapmoe, oracle"


def test_a_misspelled_key_in_a_level_fails_when_the_grid_is_expanded():
    bad = choices("policy", {"ok": [], "typo": ["cache.policy.rhoo=0.5"]})
    with pytest.raises(ConfigError) as e:
        expand(BASE, [bad], TOY)
    assert str(e.value) == "unknown config key cache.policy.rhoo; known keys here: rho, window"


@given(st.lists(st.integers(1, 3), min_size=1, max_size=3))
def test_one_cell_per_combination_keyed_by_axis(sizes):
    axes = [sweep(f"a{i}", "workload.context_tokens", [100 * i + j + 1 for j in range(n)]) for i, n in enumerate(sizes)]
    cells = expand(None, axes)
    combos = list(itertools.product(*(axis.levels for axis in axes)))
    assert len(cells) == len(combos)
    for cell, combo in zip(cells, combos):
        assert cell.key == {axis.name: level.label for axis, level in zip(axes, combo)}
        assert cell.config.workload.context_tokens == combo[-1].label  # the last axis's override is applied last
