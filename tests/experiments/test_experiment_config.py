"""moepic/experiments/config.py: base.yaml ← a system file ← overrides into a frozen ExperimentConfig.

(Named test_experiment_config.py, not test_config.py: the test folders have no __init__.py, so two
test modules may not share a basename, and tests/test_config.py exists.)
"""

from __future__ import annotations

import attrs
import pytest

from moepic.structure import load_layers, read_yaml, unstructure
from moepic.configurators.dp import DPConfig
from moepic.errors import ConfigError
from moepic.experiments.config import ExperimentConfig, load_experiment, system_file
from moepic.policies.lfu import LFUConfig
from moepic.policies.lru import LRUConfig
from moepic.sim.baseline import HYBRID_ORDER, ORDER, SystemConfig, baseline_path, load_baseline

from experiments_support import BASE, ROOT

SYSTEM_KEYS = ("approximates", "configurator", "policy_choices")


def _system(name: str) -> SystemConfig:
    return load_layers(SystemConfig, [baseline_path(name)])


def _base_yaml() -> dict:
    return read_yaml(BASE)


def test_the_systems_folder_of_the_configs_is_the_baselines():
    assert (ROOT / "experiments" / "configs" / "systems").resolve() == baseline_path("moepic").parent.resolve()


def test_the_base_config_loads_the_system_it_names():
    named = _base_yaml()["system"]
    assert named in ORDER
    cfg = load_experiment(BASE)
    system = _system(named)
    assert cfg.system == named
    assert (cfg.cache.theta, cfg.cache.policy, cfg.cache.predictor) == (system.cache.theta, system.cache.policy, system.cache.predictor)
    assert cfg.configurator == system.configurator and cfg.configurator is not None
    assert cfg.approximates == system.approximates


def test_the_base_config_adds_the_budget_the_link_and_the_workload():
    base = _base_yaml()
    cfg = load_experiment(BASE)
    assert cfg.cache.budget == base["cache"]["budget"]
    assert cfg.cache.link_gbps == base["cache"]["link_gbps"]
    assert cfg.workload.trace == base["workload"]["trace"]
    assert cfg.workload.model_shape == base["workload"]["model_shape"]
    assert cfg.workload.hardware == base["workload"]["hardware"]
    assert cfg.backend == base["backend"]
    assert cfg.executor.kind == base["executor"]["kind"]


def test_a_system_argument_replaces_the_named_system_and_keeps_the_budget_and_workload():
    base = load_experiment(BASE)
    cfg = load_experiment(BASE, system="adapmoe")
    assert cfg.system == "adapmoe"
    assert cfg.cache.policy == LRUConfig()
    assert cfg.configurator == DPConfig(theta_steps=1)
    assert cfg.cache.theta == 1.0
    assert cfg.approximates == "AdapMoE"
    assert cfg.cache.budget == base.cache.budget
    assert (cfg.cache.link_gbps, cfg.cache.link_latency_us) == (base.cache.link_gbps, base.cache.link_latency_us)
    assert cfg.workload == base.workload
    assert (cfg.engine, cfg.wandb, cfg.executor) == (base.engine, base.wandb, base.executor)


@pytest.mark.parametrize("name", ORDER)
def test_every_named_system_on_the_base_is_that_system_on_the_base_workload(name):
    cfg = load_experiment(BASE, name)
    system = _system(name)
    base = load_experiment(BASE)
    for key in SYSTEM_KEYS:
        assert getattr(cfg, key) == getattr(system, key), key
    assert (cfg.cache.theta, cfg.cache.policy, cfg.cache.predictor) == (system.cache.theta, system.cache.policy, system.cache.predictor)
    assert cfg.cache.budget == base.cache.budget and cfg.workload == base.workload
    # The same system as `moepic compare --baseline NAME` runs, with the base's budget.
    assert attrs.evolve(cfg.setup(), budget=None) == load_baseline(name)
    assert cfg.setup().budget == base.cache.budget


def test_override_switching_the_policy_gives_lfu_without_lcps_knobs():
    cfg = load_experiment(BASE, overrides=["cache.policy.name=lfu"])
    assert cfg.system == "moepic-lcp"
    assert cfg.cache.policy == LFUConfig()
    assert unstructure(cfg)["cache"]["policy"] == {"name": "lfu"}
    # Only the policy node changed.
    assert attrs.evolve(cfg, cache=attrs.evolve(cfg.cache, policy=load_experiment(BASE).cache.policy)) == load_experiment(BASE)


def test_overrides_beat_the_system_file():
    cfg = load_experiment(BASE, "adapmoe", ["cache.theta=0.25", "configurator.theta_steps=2"])
    assert cfg.cache.theta == 0.25
    assert cfg.configurator == DPConfig(theta_steps=2)


def test_a_system_yaml_path_is_overlaid_and_labelled_by_its_stem(tmp_path):
    path = tmp_path / "my-system.yaml"
    path.write_text("approximates: mine\ncache:\n  policy: {name: lfu}\n  theta: 0.25\n")
    assert system_file(str(path)) == path
    cfg = load_experiment(BASE, str(path))
    assert cfg.system == "my-system"
    assert (cfg.approximates, cfg.cache.policy, cfg.cache.theta) == ("mine", LFUConfig(), 0.25)
    assert cfg.cache.budget == load_experiment(BASE).cache.budget


def test_no_base_and_no_system_is_the_defaults():
    assert load_experiment(None) == ExperimentConfig()
    assert load_experiment(None, "oracle").system == "oracle"


def test_an_unknown_system_name_fails_listing_the_known_ones():
    with pytest.raises(ConfigError) as e:
        load_experiment(BASE, "moepic-lcpp")
    message = str(e.value)
    assert message.startswith("unknown baseline 'moepic-lcpp'; known: ")
    assert message.split("known: ")[1].split(", ") == list(ORDER + HYBRID_ORDER)


def test_a_missing_system_file_names_it(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as e:
        load_experiment(BASE, str(missing))
    assert str(e.value) == f"{missing}: config file not found"


@pytest.mark.parametrize("where", ["base", "system"])
def test_an_unknown_top_level_key_names_its_file(tmp_path, where):
    bad = tmp_path / "bad.yaml"
    bad.write_text("budgett: 0.25\n")
    with pytest.raises(ConfigError) as e:
        load_experiment(bad) if where == "base" else load_experiment(BASE, str(bad))
    message = str(e.value)
    assert message.startswith(f"{bad}: unknown config key budgett; known keys here: ")
    fields = sorted(f.name for f in attrs.fields(ExperimentConfig))
    assert message.endswith(", ".join(fields))


def test_an_ill_typed_workload_value_names_the_key():
    with pytest.raises(ConfigError) as e:
        load_experiment(BASE, overrides=["workload.synthetic.tokens=0"])
    assert str(e.value) == "config key workload.synthetic.tokens: expected an integer in [1, 10000000], got 0"
    with pytest.raises(ConfigError) as e:
        load_experiment(BASE, overrides=["workload.batch=0"])
    assert str(e.value) == "config key workload.batch: expected an integer in [1, 1024], got 0"
    with pytest.raises(ConfigError) as e:
        load_experiment(BASE, overrides=["workload.stream_tokens=-8"])
    assert str(e.value) == "config key workload.stream_tokens: expected an integer in [1, 10000000], got -8"
    with pytest.raises(ConfigError) as e:
        load_experiment(BASE, overrides=["executor.kind=slurm"])
    assert str(e.value) == "config key executor.kind: expected one of 'local', 'ray', got 'slurm'"
