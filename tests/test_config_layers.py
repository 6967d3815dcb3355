"""moepic/structure.py's layers: defaults ← each YAML file ← overrides (`merge_layers`), where a strategy
node whose name changes is replaced whole; each file validated on its own, so an error names its
file; and `unstructure` as the inverse of `structure`."""

from __future__ import annotations

import copy
from pathlib import Path

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moepic.config import RunConfig, load_config
from moepic.policies.base import auto_policies
from moepic.configurators.dp import DPConfig
from moepic.configurators.uniform import UniformConfig
from moepic.errors import ConfigError
from moepic.experiments.config import ExperimentConfig, load_experiment
from moepic.policies.lcp import LCPConfig
from moepic.policies.lfu import LFUConfig
from moepic.policies.lru import LRUConfig
from moepic.policies.random import RandomConfig
from moepic.sim.baseline import ORDER, load_baseline
from moepic.structure import load_layers, merge_layers, structure, unstructure

BASE = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "base.yaml"
LCP_YAML = "cache:\n  policy: {name: lcp, rho: 0.5, window: 64}\n"


def _yaml(tmp_path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- merge_layers: plain dicts -------------------------------------------------------------------


def test_a_strategy_node_whose_name_changes_is_replaced_whole():
    merged = merge_layers({"cache": {"policy": {"name": "lcp", "rho": 0.25}}}, {"cache": {"policy": {"name": "lfu"}}})
    assert merged == {"cache": {"policy": {"name": "lfu"}}}


def test_a_strategy_node_of_the_same_name_merges_its_knobs():
    base = {"cache": {"policy": {"name": "lcp", "rho": 0.25, "window": 128}, "theta": 0.5}}
    assert merge_layers(base, {"cache": {"policy": {"name": "lcp", "window": 64}}}) == {
        "cache": {"policy": {"name": "lcp", "rho": 0.25, "window": 64}, "theta": 0.5}
    }
    # A node without a name (what `cache.policy.rho=0.5` gives) tunes the policy already there.
    assert merge_layers(base, {"cache": {"policy": {"rho": 0.5}}})["cache"]["policy"] == {"name": "lcp", "rho": 0.5, "window": 128}


def test_a_string_shorthand_old_value_keeps_its_name_under_knobs():
    # `policy: lru` is {name: lru}: knobs merged onto it keep the name ...
    assert merge_layers({"cache": {"policy": "random"}}, {"cache": {"policy": {"seed": 3}}}) == {
        "cache": {"policy": {"name": "random", "seed": 3}}
    }
    # ... and a node naming another policy replaces it.
    assert merge_layers({"cache": {"policy": "lcp"}}, {"cache": {"policy": {"name": "lru"}}}) == {
        "cache": {"policy": {"name": "lru"}}
    }


def test_a_string_new_value_replaces_a_strategy_node():
    assert merge_layers({"cache": {"policy": {"name": "lcp", "rho": 0.5}}}, {"cache": {"policy": "lru"}}) == {
        "cache": {"policy": "lru"}
    }


def test_the_top_level_is_never_replaced_wholesale():
    # The root mapping is merged key by key even when both layers carry a `name` that differs.
    assert merge_layers({"name": "a", "x": 1, "cache": {"theta": 0.5}}, {"name": "b", "cache": {"budget": 0.25}}) == {
        "name": "b", "x": 1, "cache": {"theta": 0.5, "budget": 0.25},
    }


def test_merging_leaves_both_layers_unchanged():
    base = {"cache": {"policy": {"name": "lcp", "rho": 0.25}, "theta": [0.5, 0.25]}}
    over = {"cache": {"policy": {"name": "lfu"}, "theta": [1.0]}}
    before = copy.deepcopy((base, over))
    merge_layers(base, over)
    assert (base, over) == before


# --- merge_layers: properties --------------------------------------------------------------------

SCALARS = st.integers(-3, 3) | st.sampled_from(["lru", "lcp", "x"]) | st.none()


def _trees(keys, leaves):
    return st.dictionaries(keys, st.recursive(leaves, lambda inner: st.dictionaries(keys, inner, max_size=3), max_leaves=8), max_size=4)


ANY_TREES = _trees(st.sampled_from(["a", "b", "policy", "name"]), SCALARS)
# No `name` keys and no strings: no strategy switch and no shorthand anywhere.
PLAIN_TREES = _trees(st.sampled_from(["a", "b", "c"]), st.integers(-3, 3) | st.none())


def _paths(tree: dict, prefix=()):
    """(path, value) for every node below the root, leaves and mappings alike."""
    for key, value in tree.items():
        yield prefix + (key,), value
        if isinstance(value, dict):
            yield from _paths(value, prefix + (key,))


def _leaves(tree: dict) -> dict:
    return {path: value for path, value in _paths(tree) if not isinstance(value, dict)}


@given(ANY_TREES)
def test_merging_with_nothing_is_the_identity(tree):
    assert merge_layers(tree, {}) == tree
    assert merge_layers({}, tree) == tree


@given(ANY_TREES, ANY_TREES)
def test_merging_the_same_layer_twice_is_merging_it_once(base, over):
    once = merge_layers(base, over)
    assert merge_layers(once, over) == once


@given(PLAIN_TREES, PLAIN_TREES)
def test_without_a_strategy_switch_over_wins_at_its_leaves_and_base_keeps_the_rest(base, over):
    merged = _leaves(merge_layers(base, over))
    over_nodes = dict(_paths(over))
    # Every leaf of `over` is in the result with its value.
    assert all(merged.get(path, object()) == value for path, value in _leaves(over).items())
    # A leaf of `base` survives unless `over` has a node at its path, or a leaf above it.
    surviving = {
        path: value for path, value in _leaves(base).items()
        if path not in over_nodes and not any(not isinstance(over_nodes.get(path[:i], {}), dict) for i in range(1, len(path)))
    }
    assert merged == _leaves(over) | surviving


@given(
    st.sampled_from(["lcp", "lru", "lfu"]), st.sampled_from(["lcp", "lru", "lfu"]),
    st.dictionaries(st.sampled_from(["rho", "window", "seed"]), st.integers(0, 9), max_size=3),
    st.dictionaries(st.sampled_from(["rho", "window", "seed"]), st.integers(0, 9), max_size=3),
)
def test_a_strategy_node_is_replaced_exactly_when_its_name_changes(old, new, old_knobs, new_knobs):
    merged = merge_layers({"cache": {"policy": {"name": old, **old_knobs}}}, {"cache": {"policy": {"name": new, **new_knobs}}})
    expected = {"name": new, **new_knobs} if old != new else {"name": old, **old_knobs, **new_knobs}
    assert merged == {"cache": {"policy": expected}}


# --- load_config: the layers into a frozen RunConfig ---------------------------------------------


def test_override_switching_the_policy_drops_the_old_policys_knobs(tmp_path):
    path = _yaml(tmp_path, LCP_YAML)
    assert load_config(path).cache.policy == LCPConfig(rho=0.5, window=64.0)
    assert load_config(path, ["cache.policy.name=lru"]).cache.policy == LRUConfig()
    assert load_config(path, ["cache.policy.name=lfu"]).cache.policy == LFUConfig()


def test_override_of_a_knob_keeps_the_policy_and_its_other_knobs(tmp_path):
    path = _yaml(tmp_path, LCP_YAML)
    assert load_config(path, ["cache.policy.rho=0.75"]).cache.policy == LCPConfig(rho=0.75, window=64.0)


def test_knobs_given_after_a_switch_belong_to_the_new_policy(tmp_path):
    path = _yaml(tmp_path, LCP_YAML)
    assert load_config(path, ["cache.policy.name=random", "cache.policy.seed=7"]).cache.policy == RandomConfig(seed=7)
    # LFU takes no knobs: LCP's window given after the switch is refused, not silently kept.
    with pytest.raises(ConfigError) as e:
        load_config(path, ["cache.policy.name=lfu", "cache.policy.window=32"])
    assert str(e.value) == "unknown config key cache.policy.window; this node takes no other keys"


def test_a_later_file_naming_another_policy_replaces_the_node(tmp_path):
    first = _yaml(tmp_path, LCP_YAML, "first.yaml")
    second = _yaml(tmp_path, "cache:\n  policy: {name: lfu}\n  theta: 0.25\n", "second.yaml")
    cfg = load_layers(RunConfig, [first, second])
    assert cfg.cache.policy == LFUConfig()
    assert cfg.cache.theta == 0.25


def test_string_shorthand_in_a_file_then_a_knob_override(tmp_path):
    path = _yaml(tmp_path, "cache:\n  policy: random\n")
    assert load_config(path, ["cache.policy.seed=5"]).cache.policy == RandomConfig(seed=5)


# --- errors name the file, the key and the known choices -----------------------------------------


def test_misspelled_policy_name_in_a_file(tmp_path):
    path = _yaml(tmp_path, "cache:\n  policy: {name: lfuu}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    message = str(e.value)
    assert message.startswith(f"{path}: ")
    assert "cache.policy.name" in message and "'lfuu'" in message
    assert "known: " in message and all(name in message.split("known: ")[1] for name in ("lcp", "lfu", "lru", "belady"))


def test_misspelled_policy_knob_in_a_file(tmp_path):
    path = _yaml(tmp_path, "cache:\n  policy: {name: lcp, rhoo: 0.5}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"{path}: unknown config key cache.policy.rhoo; known keys here: rho, window"


def test_a_file_is_checked_on_its_own_so_an_override_does_not_hide_its_mistake(tmp_path):
    path = _yaml(tmp_path, "cache:\n  policy: {name: lfuu}\n")
    with pytest.raises(ConfigError, match="cache.policy.name") as e:
        load_config(path, ["cache.policy.name=lru"])
    assert str(e.value).startswith(f"{path}: ")


def test_the_error_names_the_file_it_is_in_not_an_earlier_one(tmp_path):
    good = _yaml(tmp_path, LCP_YAML, "good.yaml")
    bad = _yaml(tmp_path, "cache:\n  thetaa: 0.5\n", "bad.yaml")
    with pytest.raises(ConfigError) as e:
        load_layers(RunConfig, [good, bad])
    assert str(e.value).startswith(f"{bad}: unknown config key cache.thetaa; known keys here: ")
    assert str(good) not in str(e.value)


def test_misspelled_configurator_in_a_system_file(tmp_path):
    system = _yaml(tmp_path, "configurator: {name: moepicc}\n", "mine.yaml")
    with pytest.raises(ConfigError) as e:
        load_experiment(BASE, system=str(system))
    message = str(e.value)
    assert message.startswith(f"{system}: ")
    assert "configurator.name" in message and "'moepicc'" in message
    assert message.endswith("known: dp, moepic, n_cpu_moe, uniform")


# --- the configurator is a top-level strategy node: switching it must drop its knobs -------------


def test_override_switching_the_configurator_drops_the_old_configurators_knobs():
    cfg = load_experiment(BASE, "adapmoe", ["configurator.name=uniform"])  # adapmoe: {name: dp, theta_steps: 1}
    assert cfg.configurator == UniformConfig()


def test_configurator_shorthand_in_a_file_keeps_its_name_under_a_knob_override(tmp_path):
    system = _yaml(tmp_path, "configurator: dp\n", "mine.yaml")
    assert load_experiment(BASE, str(system)).configurator == DPConfig()
    assert load_experiment(BASE, str(system), ["configurator.budget_units=100"]).configurator == DPConfig(budget_units=100)


# --- unstructure inverts structure; the baseline files agree with the code -----------------------


@pytest.mark.parametrize("name", ORDER)
def test_unstructure_then_structure_gives_the_experiment_config_back(name):
    cfg = load_experiment(BASE, name)
    plain = unstructure(cfg)
    assert structure(ExperimentConfig, plain) == cfg
    assert plain["system"] == name


def test_unstructure_gives_strategies_with_their_name_and_knobs_only():
    cfg = load_config(None, ["cache.policy.name=lcp", "cache.policy.rho=0.5", "generate.prompt_ids=[3,4]"])
    plain = unstructure(cfg)
    assert plain["cache"]["policy"] == {"name": "lcp", "rho": 0.5, "window": 128.0}
    assert plain["generate"]["prompt_ids"] == [3, 4]
    assert structure(RunConfig, plain) == cfg


def test_the_moepic_baseline_chooses_among_the_auto_policies():
    # moepic.yaml's policy_choices and `moepic configure --policy auto` must agree.
    setup = load_baseline("moepic")
    assert sorted(p.name for p in setup.policy_choices) == sorted(auto_policies())
    assert setup.policy == setup.policy_choices[0]
    assert attrs.asdict(setup.policy_choices[0]) == attrs.asdict(LCPConfig())


def test_a_file_may_interpolate_a_key_an_earlier_file_sets_and_a_missing_key_is_named(tmp_path):
    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    first.write_text("model: {device: cpu}\n")
    second.write_text("generate: {prompt: '${model.device}'}\n")
    assert load_layers(RunConfig, [first, second]).generate.prompt == "cpu"
    second.write_text("generate: {prompt: '${model.nope}'}\n")
    with pytest.raises(ConfigError) as e:
        load_layers(RunConfig, [first, second])
    assert "model.nope" in str(e.value) and str(e.value).startswith("config: ")


# --- trust: configs interpolate keys but call no OmegaConf resolver (no environment without --allow-env) ---


def test_oc_env_in_a_yaml_file_is_an_error_naming_the_file_and_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEPIC_TEST_SECRET", "s3cret")
    path = _yaml(tmp_path, "generate:\n  prompt: ${oc.env:MOEPIC_TEST_SECRET}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: config key generate.prompt: '${{oc.env:MOEPIC_TEST_SECRET}}' calls the resolver oc.env;")
    assert "--allow-env" in message and "s3cret" not in message and "\n" not in message


def test_oc_env_in_an_override_is_an_error_naming_the_override():
    with pytest.raises(ConfigError, match=r"^override 'model.path=\$\{oc.env:HOME\}': config key model.path: "):
        load_config(None, ["model.path=${oc.env:HOME}"])
    with pytest.raises(ConfigError, match="calls the resolver oc.env"):  # nested in an interpolation, too
        load_config(None, ["model.path=x${model.${oc.env:HOME}}"])


def test_allow_env_lets_oc_env_read_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEPIC_TEST_PROMPT", "hello")
    path = _yaml(tmp_path, "generate:\n  prompt: ${oc.env:MOEPIC_TEST_PROMPT}\n")
    assert load_config(path, allow_env=True).generate.prompt == "hello"


@pytest.mark.parametrize("value", ["${oc.decode:'3'}", "${oc.create:{a: 1}}", "x ${model.${oc.decode:'1'}}", "${custom:1}"])
def test_every_other_resolver_is_refused_even_with_allow_env(value):
    with pytest.raises(ConfigError, match="calls the resolver"):
        load_config(None, [f'generate.prompt="{value}"'], allow_env=True)


def test_a_resolver_inside_a_list_is_named_by_its_index(tmp_path):
    path = _yaml(tmp_path, "cache:\n  budget: [0.5, '${oc.env:HOME}']\n")
    with pytest.raises(ConfigError, match=r"config key cache\.budget\[1\]: "):
        load_config(path)


def test_plain_interpolation_and_escaped_text_still_work(tmp_path):
    path = _yaml(tmp_path, "model:\n  device: cpu\ngenerate:\n  prompt: 'on ${model.device}, \\${oc.env:HOME}'\n")
    assert load_config(path).generate.prompt == "on cpu, ${oc.env:HOME}"


def test_an_experiment_config_refuses_oc_env_unless_allowed(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEPIC_TEST_HW", "h100-pcie")
    with pytest.raises(ConfigError, match="oc.env"):
        load_experiment(BASE, overrides=["workload.hardware=${oc.env:MOEPIC_TEST_HW}"])
    assert load_experiment(BASE, overrides=["workload.hardware=${oc.env:MOEPIC_TEST_HW}"], allow_env=True).workload.hardware == "h100-pcie"


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("workload.link_gbps=.nan", "workload.link_gbps"), ("workload.recall=1.5", "workload.recall"),
        ("workload.context_tokens=-1", "workload.context_tokens"), ("workload.synthetic.tokens=1000000000", "workload.synthetic.tokens"),
        ("workload.max_tokens=0", "workload.max_tokens"), ("executor.workers=0", "executor.workers"),
    ],
)
def test_an_experiment_key_outside_its_range_is_named_with_the_range(override, key):
    with pytest.raises(ConfigError, match=rf"^config key {key}: expected an? (number|integer) in "):
        load_experiment(BASE, overrides=[override])
