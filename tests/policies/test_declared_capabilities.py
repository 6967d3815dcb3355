"""What a strategy needs is declared by its config class (never inferred from its name or from type
annotations): these tests hold every registered strategy's declaration to what its class takes."""

from __future__ import annotations

import inspect

import attrs
import pytest

from moepic.policies import POLICIES
from moepic.policies.base import auto_policies, build_policy_on
from moepic.predictors import PREDICTORS
from policy_support import one_layer_trace


def _keywords(factory) -> set[str]:
    return set(inspect.signature(factory.__init__).parameters)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_a_policy_that_reads_a_trace_names_its_key_and_its_keyword(name):
    config, factory = POLICIES[name].config, POLICIES[name].factory
    assert (config.trace_key is None) == (config.trace_keyword is None)
    if config.trace_key is not None:
        assert config.trace_key in attrs.fields_dict(config)
        assert config.trace_keyword in _keywords(factory)


@pytest.mark.parametrize("name", sorted(PREDICTORS))
def test_a_predictor_that_reads_the_future_takes_it(name):
    config, factory = PREDICTORS[name].config, PREDICTORS[name].factory
    assert ("future" in _keywords(factory)) == config.reads_the_future


@pytest.mark.parametrize("name", ["static", "belady"])
def test_a_replay_gives_a_policy_without_a_file_the_trace_it_replays(name):
    trace = one_layer_trace([[0, 1], [2, 1], [0, 3]], num_experts=4)
    policy = build_policy_on(POLICIES.structure_node({"name": name}, "cache.policy"), trace)
    state = policy.init(0, 4)  # a policy without its trace could not start
    assert policy.priority(state).shape == (4,)


def test_auto_offers_online_policies_that_need_no_trace_the_default_first():
    offered = auto_policies()
    assert offered[0] == POLICIES.default and len(offered) >= 2
    assert all(POLICIES[name].config.trace_key is None for name in offered)
