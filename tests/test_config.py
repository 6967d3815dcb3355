"""moepic/config.py: defaults ← YAML ← overrides into a frozen RunConfig, and the errors on the way."""

from __future__ import annotations

import subprocess
import sys

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moepic.config import CacheConfig, GenerateConfig, ModelConfig, RunConfig, SamplingConfig, load_config
from moepic.errors import ConfigError
from moepic.policies import POLICIES
from moepic.predictors import PREDICTORS


def _yaml(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_no_yaml_and_no_overrides_gives_the_attrs_defaults():
    cfg = load_config()
    assert cfg == RunConfig()
    assert cfg.model == ModelConfig(path=None, dtype="auto", device="cpu")
    assert cfg.generate == GenerateConfig(prompt=None, prompt_ids=None, max_new_tokens=32)
    assert cfg.sampling == SamplingConfig(greedy=False, temperature=0.8, top_p=0.95, seed=0)


def test_yaml_setting_one_key_of_a_section_keeps_the_other_defaults(tmp_path):
    cfg = load_config(_yaml(tmp_path, "sampling:\n  temperature: 0.5\n"))
    assert cfg.sampling == SamplingConfig(temperature=0.5)
    assert cfg.generate == GenerateConfig() and cfg.model == ModelConfig()


def test_empty_yaml_file_means_all_defaults(tmp_path):
    assert load_config(_yaml(tmp_path, "")) == RunConfig()


def test_override_beats_the_yaml_value_and_leaves_its_siblings(tmp_path):
    path = _yaml(tmp_path, "sampling: {seed: 1, top_p: 0.5}\ngenerate: {max_new_tokens: 7}\n")
    cfg = load_config(path, ["sampling.seed=9"])
    assert cfg.sampling.seed == 9
    assert cfg.sampling.top_p == 0.5
    assert cfg.generate.max_new_tokens == 7


def test_later_override_beats_earlier_one():
    assert load_config(None, ["sampling.seed=1", "sampling.seed=2"]).sampling.seed == 2


def test_int_written_for_a_float_key_becomes_a_float():
    cfg = load_config(None, ["sampling.temperature=2"])
    assert cfg.sampling.temperature == 2.0 and type(cfg.sampling.temperature) is float


def test_prompt_ids_list_becomes_a_tuple_of_ints(tmp_path):
    assert load_config(None, ["generate.prompt_ids=[4,5,6]"]).generate.prompt_ids == (4, 5, 6)
    assert load_config(_yaml(tmp_path, "generate: {prompt_ids: [7, 8]}\n")).generate.prompt_ids == (7, 8)


def test_run_config_is_frozen():
    cfg = load_config()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        cfg.sampling.seed = 3
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        cfg.model = ModelConfig(device="cuda")


def test_attrs_evolve_derives_a_variant_and_leaves_the_base_alone():
    base = load_config(None, ["sampling.seed=4"])
    variant = attrs.evolve(base, sampling=attrs.evolve(base.sampling, greedy=True))
    assert variant.sampling == SamplingConfig(greedy=True, seed=4)
    assert base.sampling.greedy is False
    assert variant.generate is base.generate


def test_evolve_runs_the_same_validation_as_load_config():
    with pytest.raises(ValueError, match="top_p"):
        attrs.evolve(SamplingConfig(), top_p=1.5)


@given(
    max_new_tokens=st.integers(1, 10_000),
    temperature=st.floats(1e-6, 100.0, allow_nan=False, allow_infinity=False),
    top_p=st.floats(1e-6, 1.0, allow_nan=False, allow_infinity=False),
    seed=st.integers(0, 2**63 - 1),
)
def test_valid_values_written_as_overrides_come_back_exactly(max_new_tokens, temperature, top_p, seed):
    cfg = load_config(
        None,
        [
            f"generate.max_new_tokens={max_new_tokens}",
            f"sampling.temperature={temperature!r}",
            f"sampling.top_p={top_p!r}",
            f"sampling.seed={seed}",
        ],
    )
    assert cfg.generate.max_new_tokens == max_new_tokens
    assert cfg.sampling.temperature == temperature
    assert cfg.sampling.top_p == top_p
    assert cfg.sampling.seed == seed


# --- errors: each one a ConfigError whose message names the key and the value -----------------------


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["generate.max_new_tokens=abc"], ["generate.max_new_tokens", "int", "'abc'"]),
        (["generate.max_new_tokens=0"], ["generate.max_new_tokens", "an integer in [1, 1048576]", "0"]),
        (["sampling.top_p=2"], ["sampling.top_p", "(0, 1]", "2"]),
        (["sampling.temperature=0"], ["sampling.temperature", "(0, 100]"]),
        (["sampling.seed=-1"], ["sampling.seed", "-1"]),
        ([f"sampling.seed={2**64}"], ["sampling.seed", str(2**64)]),
        (["sampling.greedy=3"], ["sampling.greedy", "bool", "3"]),
        (["model.dtype=int8"], ["model.dtype", "'bfloat16'", "'int8'"]),
        (["generate.prompt_ids=[1,x]"], ["generate.prompt_ids", "'x'"]),
        (["sampling=3"], ["sampling", "mapping", "3"]),
        (["sampling.foo=1"], ["sampling.foo", "greedy, seed, temperature, top_p"]),
        (["generate.max_new_tokens"], ["generate.max_new_tokens", "key=value"]),
        (["sampling.seed=["], ["sampling.seed=["]),
        (["sampling.seed=${nope}"], ["nope"]),
        (['generate.prompt="x"', "generate.prompt_ids=[1]"], ["generate.prompt", "generate.prompt_ids"]),
    ],
)
def test_bad_override_is_a_config_error_naming_the_key(overrides, named):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    message = str(info.value)
    assert "\n" not in message
    for part in named:
        assert part in message


def test_unknown_yaml_key_is_named_with_the_known_keys_of_its_section(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(_yaml(tmp_path, "generate: {max_tokens: 3}\n"))
    assert "generate.max_tokens" in str(info.value)
    assert "max_new_tokens, prompt, prompt_ids" in str(info.value)


def test_unknown_top_level_key_lists_the_sections(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 1; known keys here: cache, generate, model, sampling"):
        load_config(_yaml(tmp_path, "foo: 1\n1: 2\n"))  # int and str keys together must not break sorting


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("generate: [1, {\n", "not valid YAML"),
        ("sampling:\n\tseed: 1\n", "not valid YAML"),
        ("- 1\n- 2\n", "expected a mapping"),
    ],
)
def test_unreadable_yaml_file_is_named(tmp_path, text, named):
    path = _yaml(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: {named}")


def test_yaml_file_that_is_not_utf8_is_a_config_error(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"\xff\xfe\x00sampling: {}")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_missing_yaml_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_every_example_config_loads(tmp_path):
    from pathlib import Path

    from moepic.experiments.config import load_experiment

    folder = Path(__file__).resolve().parents[1] / "experiments" / "configs"
    files = sorted(folder.glob("*.yaml"))
    assert files, f"no example configs in {folder}"
    load_experiment(folder / "base.yaml")  # the ablations' base: an experiment config, not a run config
    for path in (f for f in files if f.name != "base.yaml"):
        cfg = load_config(path)
        assert cfg.model.path is None  # examples run on the bundled default model


# --- ranges: every numeric key states its range, and NaN, inf, zero, negatives and absurd sizes fail ---


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sampling.temperature=.nan", "config key sampling.temperature: expected a number in (0, 100], got nan"),
        ("sampling.temperature=.inf", "config key sampling.temperature: expected a number in (0, 100], got inf"),
        ("sampling.temperature=-1", "config key sampling.temperature: expected a number in (0, 100], got -1.0"),
        ("sampling.temperature=1e5", "config key sampling.temperature: expected a number in (0, 100], got 100000.0"),
        ("sampling.top_p=.nan", "config key sampling.top_p: expected a number in (0, 1], got nan"),
        ("sampling.top_p=0", "config key sampling.top_p: expected a number in (0, 1], got 0.0"),
        ("sampling.seed=-1", "config key sampling.seed: expected an integer in [0, 18446744073709551615], got -1"),
        ("generate.max_new_tokens=10000000000", "config key generate.max_new_tokens: expected an integer in [1, 1048576], got 10000000000"),
        ("generate.max_new_tokens=-3", "config key generate.max_new_tokens: expected an integer in [1, 1048576], got -3"),
        ("generate.prompt_ids=[1,-2]", "config key generate.prompt_ids[1]: expected an integer in [0, 2147483647], got -2"),
        ("cache.theta=1.5", "config key cache.theta: expected a number in [0, 1], got 1.5"),
        ("cache.theta=.nan", "config key cache.theta: expected a number in [0, 1], got nan"),
        ("cache.theta=[0.5,-1]", "config key cache.theta[1]: expected a number in [0, 1], got -1.0"),
        ("cache.link_gbps=0", "config key cache.link_gbps: expected a number in (0, 10000], got 0.0"),
        ("cache.link_gbps=.nan", "config key cache.link_gbps: expected a number in (0, 10000], got nan"),
        ("cache.link_gbps=1e9", "config key cache.link_gbps: expected a number in (0, 10000], got 1000000000.0"),
        ("cache.link_latency_us=-1", "config key cache.link_latency_us: expected a number in [0, 1000000], got -1.0"),
        ("cache.link_latency_us=.inf", "config key cache.link_latency_us: expected a number in [0, 1000000], got inf"),
        ("cache.budget=-1", "cache.budget: expected a size ≥ 0, got -1.0"),
        ("cache.budget=.nan", "cache.budget: expected a size ≥ 0, got nan"),
        ('cache.budget="1e400"', "cache.budget: expected a size of at most 1 PiB (1125899906842624 bytes), got '1e400'"),
        ("cache.budget=1e400", "cache.budget: expected a size ≥ 0, got inf"),
        ("cache.budget=lots", "cache.budget: expected bytes (512MiB, 2GB) or a fraction (0.25, 25%), got 'lots'"),
        ("cache.budget=[0.5,-1]", "cache.budget[1]: expected a size ≥ 0, got -1.0"),
    ],
)
def test_a_value_outside_its_keys_range_is_one_line_naming_the_key_and_the_range(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert str(info.value) == message


def test_a_budget_is_checked_on_load_before_the_model_is_read():
    # Its form needs no model; the bytes it stands for do (plan_layout), so "0.5" or "24GiB" pass here.
    assert load_config(None, ["cache.budget=24GiB", "cache.theta=0.5"]).cache.budget == "24GiB"
    assert load_config(None, ["cache.budget=[0.5,1GiB]"]).cache.budget == (0.5, "1GiB")


def test_theta_not_given_is_none_so_the_layout_decides():
    assert load_config(None, ["cache.budget=0.5"]).cache.theta is None
    assert load_config(None, ["cache.budget=0.5", "cache.theta=0.5"]).cache.theta == 0.5


# --- layering: the structuring knows no strategy; the run schema takes its defaults from the registries


def test_the_cache_strategies_default_to_their_registries_defaults():
    cache = CacheConfig()
    assert (cache.policy.name, cache.predictor.name) == (POLICIES.default, PREDICTORS.default)
    assert cache.policy == POLICIES.default_config() and cache.predictor == PREDICTORS.default_config()


def test_a_registry_default_is_built_like_a_yaml_node_naming_it():
    for registry in (POLICIES, PREDICTORS):
        assert registry.default_config() == registry.structure_node({"name": registry.default}, "key")


@pytest.mark.parametrize(
    "module, strategies_loaded",
    [("moepic.structure", False), ("moepic.registry", False), ("moepic.config", True)],
)
def test_the_structuring_and_the_registry_load_no_strategy_and_no_run_schema(module, strategies_loaded):
    # In a fresh interpreter: what importing `module` alone pulls in.
    code = f"import sys, {module}; print(' '.join(sorted(sys.modules)))"
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())
    strategies = {"moepic.policies", "moepic.predictors", "moepic.configurators"}
    assert bool(strategies & loaded) == strategies_loaded
    assert ("moepic.config" in loaded) == (module == "moepic.config")
