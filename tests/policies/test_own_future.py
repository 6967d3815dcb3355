"""A strategy that reads the run's future (belady, oracle, noisy_oracle) refuses a trace that is not the run's own."""

from __future__ import annotations

import attrs
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moepic.errors import ConfigError
from moepic.policies import own_future
from moepic.policies.base import LayerStep
from moepic.policies.belady import BeladyPolicy
from moepic.tracing import RoutingTrace
from policy_support import one_layer_trace, skewed_traces

USER = "the test strategy"


def steps_of(trace: RoutingTrace, cuts: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(clock_S, tokens_S): the trace's tokens cut into consecutive steps at `cuts`."""
    edges = sorted({0, trace.num_tokens, *(c for c in cuts if 0 < c < trace.num_tokens)})
    return np.array(edges[:-1], np.int64), np.diff(np.array(edges, np.int64))


def counts(trace: RoutingTrace, column: int, clock_S, tokens_S) -> np.ndarray:
    ids = trace.expert_ids_NLK[:, column]
    rows = [np.bincount(ids[c : c + t].ravel(), minlength=trace.num_experts) for c, t in zip(clock_S, tokens_S)]
    return np.array(rows, np.int64).reshape(len(rows), trace.num_experts)


@given(trace=skewed_traces(), cuts=st.lists(st.integers(0, 48), max_size=6))
def test_the_trace_own_routing_in_any_steps_passes(trace, cuts):
    clock_S, tokens_S = steps_of(trace, cuts)
    for column, layer in enumerate(trace.moe_layers):
        own_future.check_steps("t.npz", trace, column, layer, clock_S, tokens_S, counts(trace, column, clock_S, tokens_S), USER)
        for clock, tokens, counts_E in zip(clock_S, tokens_S, counts(trace, column, clock_S, tokens_S)):
            own_future.check_step("t.npz", trace, column, layer, int(clock), int(tokens), counts_E, USER)


@given(trace=skewed_traces(), cuts=st.lists(st.integers(0, 48), max_size=6), data=st.data())
def test_one_changed_expert_anywhere_is_found_and_named(trace, cuts, data):
    if not trace.num_tokens:
        return
    clock_S, tokens_S = steps_of(trace, cuts)
    column = data.draw(st.integers(0, len(trace.moe_layers) - 1))
    counts_SE = counts(trace, column, clock_S, tokens_S)
    s = data.draw(st.integers(0, len(clock_S) - 1))
    routed = np.flatnonzero(counts_SE[s])
    unrouted = np.flatnonzero(counts_SE[s] == 0)
    if not len(unrouted):
        return
    moved_from, moved_to = data.draw(st.sampled_from(routed.tolist())), data.draw(st.sampled_from(unrouted.tolist()))
    counts_SE[s, moved_from] -= 1  # one token of the step routed elsewhere
    counts_SE[s, moved_to] += 1
    layer = trace.moe_layers[column]
    with pytest.raises(ConfigError, match=rf"^t\.npz: {USER} needs the trace of this run, but at layer {layer}, tokens? {clock_S[s]}"):
        own_future.check_steps("t.npz", trace, column, layer, clock_S, tokens_S, counts_SE, USER)


def test_a_decode_step_names_both_expert_sets():
    trace = one_layer_trace([[0, 1], [2, 3]], num_experts=5)
    with pytest.raises(ConfigError, match=r"at layer 0, token 1 the trace routes experts \[2, 3\], this run routed \[2, 4\]"):
        own_future.check_step("t.npz", trace, 0, 0, 1, 1, np.array([0, 0, 1, 0, 1]), USER)


def test_a_prompt_step_names_the_first_expert_whose_count_differs():
    trace = one_layer_trace([[0, 1], [0, 2], [0, 3]], num_experts=4)
    with pytest.raises(ConfigError, match=r"at layer 0, tokens 0-2 the trace routes 1 of them to expert 1, this run 0"):
        own_future.check_step("t.npz", trace, 0, 0, 0, 3, np.array([3, 0, 2, 1]), USER)


def test_a_run_past_the_trace_end_is_an_error():
    trace = one_layer_trace([[0, 1], [0, 2]], num_experts=4)
    own_future.check_step("t.npz", trace, 0, 0, 1, 1, np.array([1, 0, 1, 0]), USER)
    with pytest.raises(ConfigError, match=r"the run goes past its end \(layer 0 routes token 2; the trace has 2 tokens\)"):
        own_future.check_step("t.npz", trace, 0, 0, 2, 1, np.array([1, 0, 1, 0]), USER)


@given(prompt=st.integers(1, 6), decode=st.integers(0, 6), later=st.integers(0, 4))
def test_the_prompt_is_the_first_sequences_prefill(prompt, decode, later):
    # A second sequence's prompt (`later` tokens) does not count: the run's prompt is the first.
    N = prompt + decode + later
    trace = one_layer_trace(np.zeros((N, 1), np.int64), num_experts=1, sequence_N=[0] * (prompt + decode) + [1] * later)
    trace = attrs.evolve(trace, prefill_N=np.array([True] * prompt + [False] * decode + [True] * later, dtype=bool))
    assert own_future.prompt_tokens(trace) == prompt
    own_future.check_prompt("t.npz", trace, prompt, USER)
    with pytest.raises(ConfigError, match=rf"the trace's prompt has {prompt} tokens and this run's {prompt + 1}"):
        own_future.check_prompt("t.npz", trace, prompt + 1, USER)


def test_belady_stops_a_run_whose_routing_is_not_its_traces():
    policy = BeladyPolicy(future=one_layer_trace([[0, 1], [2, 1], [0, 3]], num_experts=4))
    state = policy.update(policy.init(0, 4), LayerStep(layer=0, clock=0, tokens=1, counts_E=np.array([1, 1, 0, 0])))
    with pytest.raises(ConfigError, match=r"the belady policy needs the trace of this run, but at layer 0, token 1 the trace "
                                          r"routes experts \[1, 2\], this run routed \[1, 3\]"):
        policy.update(state, LayerStep(layer=0, clock=1, tokens=1, counts_E=np.array([0, 1, 0, 1])))
    with pytest.raises(ConfigError, match="the run goes past its end"):
        policy.update(state, LayerStep(layer=0, clock=3, tokens=1, counts_E=np.array([1, 1, 0, 0])))


def test_belady_replaying_another_trace_than_its_own_is_an_error():
    """A replay with belady reading a named file (not the replayed trace) would bound another run."""
    from moepic.cache.replay import replay_trace
    from policy_support import whole_expert_cache

    own = one_layer_trace([[0, 1], [2, 1], [0, 3]], num_experts=4)
    other = one_layer_trace([[0, 1], [2, 3], [0, 3]], num_experts=4)
    policy = BeladyPolicy(future=own)
    replay_trace(own, whole_expert_cache(own, 2), policy)  # its own: fine
    with pytest.raises(ConfigError, match=r"at layer 0, token 1 the trace routes experts \[1, 2\], this run routed \[2, 3\]"):
        replay_trace(other, whole_expert_cache(other, 2), policy)
