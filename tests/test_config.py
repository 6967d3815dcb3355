"""moepic/config.py: defaults ← YAML ← overrides into a frozen RunConfig, and the errors on the way."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moepic.config import GenerateConfig, ModelConfig, RunConfig, SamplingConfig, load_config
from moepic.errors import ConfigError


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
        (["generate.max_new_tokens=0"], ["generate.max_new_tokens", ">= 1", "0"]),
        (["sampling.top_p=2"], ["sampling.top_p", "(0, 1]", "2"]),
        (["sampling.temperature=0"], ["sampling.temperature", "> 0"]),
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
