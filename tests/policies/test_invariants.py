"""Every registered cache policy, driven through the residency planner, keeps the cache's invariants (property).

Parametrized over `moepic.policies.POLICIES`, so a newly registered policy gets this suite with no edit.
"""

from __future__ import annotations

import functools
import pickle

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moepic.cache.layout import LayerCacheLayout
from moepic.cache.planner import FREE, initial_residency, residency_step
from moepic.cache.stats import LayerCacheStats
from moepic.policies import POLICIES
from moepic.policies.base import LayerStep, priority_series
from tests_support import policy_for
from tests_support import traces

POLICY_NAMES = sorted(POLICIES)


@st.composite
def layouts(draw, layer: int, num_experts: int) -> LayerCacheLayout:
    """Any slot count and any whole number of neuron blocks in the top (no top: no slots, as plan_layout does)."""
    block = draw(st.sampled_from([1, 2, 4]))
    blocks = draw(st.integers(1, 4))
    top = block * draw(st.integers(0, blocks))
    return LayerCacheLayout(
        layer=layer,
        num_experts=num_experts,
        ffn_size=block * blocks,
        block=block,
        top_neurons=top,
        slots=draw(st.integers(0, num_experts)) if top else 0,
        neuron_bytes=draw(st.integers(1, 7)),
    )


@st.composite
def scenarios(draw):
    """A routing trace cut into layer steps (prefill-like steps of several tokens included), a layout per layer."""
    trace = draw(traces())
    N = trace.num_tokens
    new_sequence = [n == 0 or trace.sequence_N[n] != trace.sequence_N[n - 1] for n in range(N)]
    cut = [new_sequence[n] or draw(st.booleans()) for n in range(N)]
    starts = [n for n in range(N) if cut[n]]
    steps = [(a, b, new_sequence[a]) for a, b in zip(starts, starts[1:] + [N])]
    layer_layouts = [draw(layouts(layer, trace.num_experts)) for layer in trace.moe_layers]
    return trace, steps, layer_layouts, draw(st.integers(0, 2**16))


def step_counts(trace, column: int, start: int, stop: int) -> np.ndarray:
    return np.bincount(trace.expert_ids_NLK[start:stop, column].ravel(), minlength=trace.num_experts).astype(np.int64)


def play(policy, layout, trace, column, steps, check=None):
    """Run the steps of one layer; `check(layout, before, counts, tokens, plan, after)` sees each one."""
    residency = initial_residency(policy, layout)
    plans = []
    for start, stop, new_request in steps:
        counts_E = step_counts(trace, column, start, stop)
        plan, after = residency_step(policy, layout, residency, counts_E, tokens=stop - start, new_request=new_request)
        if check is not None:
            check(layout, residency, counts_E, stop - start, plan, after)
        plans.append(plan)
        residency = after
    return plans, residency


def for_every_layer(name, scenario, check=None):
    trace, steps, layer_layouts, seed = scenario
    policy = policy_for(name, trace, seed=seed)
    return [play(policy, layout, trace, column, steps, check) for column, layout in enumerate(layer_layouts)]


@pytest.mark.parametrize("name", POLICY_NAMES)
@given(scenario=scenarios())
def test_the_cache_never_grows_holds_each_expert_once_and_changes_only_by_admissions(name, scenario):
    def check(layout, before, counts_E, tokens, plan, after):
        old, new = before.cache.slots_S, after.cache.slots_S
        assert len(new) == len(old) == layout.slots
        cached = [e for e in new if e != FREE]
        assert len(cached) == len(set(cached)) and all(0 <= e < layout.num_experts for e in cached)
        admitted = {p.slot: p.expert for p in plan.experts if p.admitted}
        assert len(admitted) == sum(p.admitted for p in plan.experts)  # one admission a slot
        for s in range(layout.slots):
            assert new[s] == admitted.get(s, old[s])
        assert sorted(plan.evicted) == sorted((old[s], s) for s in admitted if old[s] != FREE)
        assert after.clock == before.clock + tokens

    for_every_layer(name, scenario, check)


@pytest.mark.parametrize("name", POLICY_NAMES)
@given(scenario=scenarios())
def test_an_expert_the_step_uses_is_never_evicted_and_stays_in_its_slot(name, scenario):
    def check(layout, before, counts_E, tokens, plan, after):
        used = set(np.flatnonzero(counts_E).tolist())
        assert not used & {e for e, _ in plan.evicted}
        old_slot = before.cache.slot_of()
        new_slot = after.cache.slot_of()
        for e in used & set(old_slot):
            assert new_slot[e] == old_slot[e]

    for_every_layer(name, scenario, check)


@pytest.mark.parametrize("name", POLICY_NAMES)
@given(scenario=scenarios())
def test_each_used_expert_gets_one_outcome_and_its_bytes(name, scenario):
    def check(layout, before, counts_E, tokens, plan, after):
        F, top, neuron = layout.ffn_size, layout.top_neurons, layout.neuron_bytes
        used = np.flatnonzero(counts_E).tolist()
        assert [p.expert for p in plan.experts] == used
        outcomes = [p.outcome for p in plan.experts]
        assert outcomes.count("hit") + outcomes.count("partial") + outcomes.count("miss") == len(used)
        cached_before = before.cache.slot_of()
        expected_bytes = 0
        for p in plan.experts:
            if p.outcome == "hit":
                assert top == F and p.expert in cached_before and p.slot == cached_before[p.expert]
                assert (p.load, p.bytes_loaded) == ("none", 0)
            elif p.outcome == "partial":
                assert 0 < top < F and p.expert in cached_before and p.slot == cached_before[p.expert]
                assert (p.load, p.bytes_loaded) == ("bottom", (F - top) * neuron)
            else:
                assert p.outcome == "miss" and p.expert not in cached_before
                assert (p.load, p.bytes_loaded) == ("whole", F * neuron)
                if p.admitted:
                    assert after.cache.slots_S[p.slot] == p.expert
                else:
                    assert p.expert not in after.cache.slot_of()
            expected_bytes += {"hit": 0, "partial": (F - top) * neuron, "miss": F * neuron}[p.outcome]
        assert plan.bytes_loaded == expected_bytes
        assert plan.layer == layout.layer

    for_every_layer(name, scenario, check)


@pytest.mark.parametrize("name", POLICY_NAMES)
@given(scenario=scenarios())
def test_folded_stats_equal_the_sums_of_the_step_plans(name, scenario):
    trace, steps, layer_layouts, seed = scenario
    for (plans, _), layout in zip(for_every_layer(name, scenario), layer_layouts):
        tokens = [stop - start for start, stop, _ in steps]
        stats = functools.reduce(lambda s, pt: s.add(*pt), zip(plans, tokens), LayerCacheStats(layer=layout.layer))
        experts = [p for plan in plans for p in plan.experts]
        assert stats.steps == len(steps) and stats.tokens == trace.num_tokens
        assert stats.activations == len(experts)
        assert stats.hits == sum(p.outcome == "hit" for p in experts)
        assert stats.partial_hits == sum(p.outcome == "partial" for p in experts)
        assert stats.misses == sum(p.outcome == "miss" for p in experts)
        assert stats.hits + stats.partial_hits + stats.misses == stats.activations
        assert stats.admissions == sum(p.admitted for p in experts)
        assert stats.evictions == sum(len(plan.evicted) for plan in plans) <= stats.admissions
        assert stats.bytes_loaded == sum(plan.bytes_loaded for plan in plans)
        assert 0.0 <= stats.hit_rate <= 1.0
        if stats.activations:
            assert stats.hit_rate == (stats.hits + stats.partial_hits) / stats.activations


@pytest.mark.parametrize("name", POLICY_NAMES)
@given(scenario=scenarios())
def test_update_and_priority_never_mutate_the_state_or_the_routing_passed_in(name, scenario):
    trace, steps, layer_layouts, seed = scenario
    policy = policy_for(name, trace, seed=seed)
    for column, layout in enumerate(layer_layouts):
        residency = initial_residency(policy, layout)
        for start, stop, new_request in steps:
            counts_E = step_counts(trace, column, start, stop)
            state_before, counts_before = pickle.dumps(residency.policy_state), counts_E.copy()
            cache_before, clock_before = residency.cache, residency.clock
            plan, after = residency_step(policy, layout, residency, counts_E, tokens=stop - start, new_request=new_request)
            assert pickle.dumps(residency.policy_state) == state_before
            np.testing.assert_array_equal(counts_E, counts_before)
            assert (residency.cache, residency.clock) == (cache_before, clock_before)
            state_after = pickle.dumps(after.policy_state)
            priority_E = policy.priority(after.policy_state)
            assert pickle.dumps(after.policy_state) == state_after
            assert priority_E.shape == (layout.num_experts,) and not np.isnan(priority_E).any()
            residency = after


@pytest.mark.parametrize("name", POLICY_NAMES)
@given(scenario=scenarios())
def test_the_same_routing_gives_the_same_plans(name, scenario):
    first = for_every_layer(name, scenario)
    again = for_every_layer(name, scenario)  # a fresh policy object, same config and seed
    for (plans_a, end_a), (plans_b, end_b) in zip(first, again):
        assert plans_a == plans_b
        assert end_a.cache == end_b.cache and end_a.clock == end_b.clock


@pytest.mark.parametrize("name", POLICY_NAMES)
@given(scenario=scenarios())
def test_the_priority_series_equals_stepping_update_and_priority(name, scenario):
    """What replays and the simulator rank with (vectorised over steps where the policy offers it)
    is, bit for bit, the priority the engine computes one step at a time."""
    trace, steps, _, seed = scenario
    policy = policy_for(name, trace, seed=seed)
    for column, layer in enumerate(trace.moe_layers):
        counts_SE = np.stack([step_counts(trace, column, a, b) for a, b, _ in steps]) if steps else np.zeros((0, trace.num_experts), np.int64)
        tokens_S = np.array([b - a for a, b, _ in steps], dtype=np.int64)
        new_S = np.array([new for _, _, new in steps], dtype=bool)
        series_SE = priority_series(policy, layer, trace.num_experts, counts_SE, tokens_S, new_S)
        state, clock = policy.init(layer, trace.num_experts), 0
        for s, (a, b, new) in enumerate(steps):
            state = policy.update(state, LayerStep(layer=layer, clock=clock, tokens=b - a, counts_E=counts_SE[s], new_request=new))
            clock += b - a
            np.testing.assert_array_equal(series_SE[s], policy.priority(state), err_msg=f"step {s}")


@pytest.mark.parametrize("name", ["lcp", "lfu", "lru"])
@given(num_experts=st.sampled_from([8, 60, 64, 128]), seed=st.integers(0, 2**16))
def test_the_vectorised_series_is_bit_exact_at_real_expert_counts(name, num_experts, seed):
    """Wide rows take other SIMD paths than the engine's one-row calls; the floats must not differ."""
    rng = np.random.default_rng(seed)
    S = 300
    counts_SE = (rng.random((S, num_experts)) < 4 / num_experts).astype(np.int64)
    new_S = rng.random(S) < 0.02
    policy = POLICIES.build(POLICIES[name].config())
    series_SE = priority_series(policy, 0, num_experts, counts_SE, np.ones(S, np.int64), new_S)
    state = policy.init(0, num_experts)
    for s in range(S):
        state = policy.update(state, LayerStep(layer=0, clock=s, tokens=1, counts_E=counts_SE[s], new_request=bool(new_S[s])))
        np.testing.assert_array_equal(series_SE[s], policy.priority(state))
