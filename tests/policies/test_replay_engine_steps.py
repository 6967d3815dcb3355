"""A replay cut into the engine's steps (cache/replay.py with sim/steps.py `trace_steps`: a prompt is
one step): the same as a token-by-token replay where there is no prompt, every token counted once,
and Belady still the bound of every online policy."""

from __future__ import annotations

import attrs
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from moepic.cache.replay import replay_trace
from moepic.cache.stats import total
from moepic.policies import POLICIES
from moepic.sim.steps import trace_steps
from policy_support import skewed_traces, whole_expert_cache
from tests_support import policy_for


@given(trace=skewed_traces(), slots=st.integers(0, 8), name=st.sampled_from(sorted(POLICIES)))
def test_without_prompts_the_engines_steps_are_the_tokens(trace, slots, name):
    layout = whole_expert_cache(trace, min(slots, trace.num_experts))
    by_token = replay_trace(trace, layout, policy_for(name, trace))
    by_step = replay_trace(trace, layout, policy_for(name, trace), trace_steps(trace))
    assert by_step == by_token


@given(trace=skewed_traces(), slots=st.integers(0, 8), data=st.data())
def test_with_prompts_every_token_counts_once_and_belady_stays_the_bound(trace, slots, data):
    prompt_N = np.array(data.draw(st.lists(st.booleans(), min_size=trace.num_tokens, max_size=trace.num_tokens)), bool)
    trace = attrs.evolve(trace, prefill_N=prompt_N)
    steps = trace_steps(trace)
    layout = whole_expert_cache(trace, min(slots, trace.num_experts))
    stats = {name: replay_trace(trace, layout, policy_for(name, trace), steps) for name in POLICIES}
    for per_layer in stats.values():
        assert all(s.tokens == trace.num_tokens and s.steps == steps.num_steps for s in per_layer)
    best = total(stats.pop("belady"))
    for name, per_layer in stats.items():
        assert best.hits >= total(per_layer).hits, name
