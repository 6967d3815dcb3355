"""Wrong prefetches: an expert loaded whole without being routed competes for admission by the
policy's own rule, never displaces what the step uses, and is never counted as an activation."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from moepic.cache.layout import LayerCacheLayout
from moepic.cache.planner import FREE, LayerCache, plan_layer_step


def layout(slots: int, E: int = 6) -> LayerCacheLayout:
    return LayerCacheLayout(layer=0, num_experts=E, ffn_size=4, block=1, top_neurons=4, slots=slots, neuron_bytes=3)


def counts(used) -> list[int]:
    """The planner takes a step's routed experts as ascending ids."""
    return sorted(set(used))


def test_a_loaded_unused_expert_takes_a_free_slot():
    plan, cache = plan_layer_step(layout(3), LayerCache((0, FREE, FREE)), counts([0]), np.arange(6.0), loaded=[4])
    assert plan.kept == ((4, 1),) and cache.slots_S == (0, 4, FREE)
    assert [p.expert for p in plan.experts] == [0]  # not an activation


def test_a_loaded_unused_expert_displaces_only_a_lower_priority_expert_the_step_does_not_use():
    priority = np.array([5.0, 1.0, 9.0, 0.0, 3.0, 0.5])
    plan, cache = plan_layer_step(layout(2), LayerCache((0, 1)), counts([0]), priority, loaded=[4])
    assert plan.kept == ((4, 1),) and plan.evicted == ((1, 1),) and cache.slots_S == (0, 4)
    plan, cache = plan_layer_step(layout(2), LayerCache((0, 1)), counts([0]), priority, loaded=[5])
    assert plan.kept == () and cache.slots_S == (0, 1)  # 0.5 < 1.0: dropped


@given(
    slots=st.integers(0, 6),
    cached=st.lists(st.integers(0, 5), max_size=6, unique=True),
    used=st.sets(st.integers(0, 5), min_size=1, max_size=3),
    loaded=st.lists(st.integers(0, 5), max_size=4, unique=True),
    seed=st.integers(0, 2**16),
)
def test_kept_experts_are_loaded_unrouted_uncached_and_never_evict_what_the_step_uses(slots, cached, used, loaded, seed):
    cached = cached[:slots]
    cache = LayerCache(tuple(cached) + (FREE,) * (slots - len(cached)))
    priority = np.random.default_rng(seed).random(6)
    plan, after = plan_layer_step(layout(slots), cache, counts(used), priority, loaded=loaded)
    for e, slot in plan.kept:
        assert e in loaded and e not in used and e not in cached and after.slots_S[slot] == e
    assert all(e in after.slots_S for e in cached if e in used)
    assert len(plan.experts) == len(used)
    occupied = [e for e in after.slots_S if e != FREE]
    assert len(occupied) == len(set(occupied)) and len(after.slots_S) == slots
