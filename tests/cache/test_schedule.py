"""cache/schedule.py: the copy decisions the engine executes and the simulator times (unit).

The engine/simulator parity tests (tests/sim/test_simulate.py) check that both follow these
decisions alike; here each rule is checked on its own, on hand-made plans and caches.
"""

from __future__ import annotations

import attrs
import numpy as np

from moepic.cache.layout import LayerCacheLayout, PrefetchShape
from moepic.cache.planner import FREE, LayerCache, plan_layer_step
from moepic.cache.schedule import (
    Prefetch,
    PrefetchTarget,
    admission_candidates,
    demand_in_flight,
    demand_loads,
    demand_reserve,
    demand_room,
    plan_prefetches,
    prefetch_fates,
    prefetch_part,
    prefetch_room,
    top_copy,
)


def layout(*, theta_blocks: int = 2, slots: int = 2, experts: int = 8) -> LayerCacheLayout:
    """Four neuron blocks of 4; the top is `theta_blocks` of them."""
    return LayerCacheLayout(
        layer=3, num_experts=experts, ffn_size=16, block=4, top_neurons=4 * theta_blocks, slots=slots, neuron_bytes=10
    )


def cache(*experts: int, slots: int = 2) -> LayerCache:
    return LayerCache(tuple(experts) + (FREE,) * (slots - len(experts)))


# --- staging room --------------------------------------------------------------------------------


def test_the_demand_reserve_is_what_prefetching_leaves_and_never_less_than_one():
    assert demand_reserve(6, PrefetchShape(candidates=2, horizon=1)) == 2  # 6 − 2·(1+1)
    assert demand_reserve(4, PrefetchShape(candidates=2, horizon=1)) == 1  # all prefetch: still one
    assert demand_reserve(3, PrefetchShape(candidates=5, horizon=0)) == 3  # no prefetching: all of it


def test_demand_copies_fill_the_reserve_counting_matched_prefetches():
    assert demand_room(1, 3) == 2
    assert demand_in_flight(matched=1, demanded=5, reserve=3) == 2
    assert demand_in_flight(matched=0, demanded=1, reserve=3) == 1
    assert demand_in_flight(matched=4, demanded=2, reserve=3) == 0  # prefetches already fill it
    assert prefetch_room(free=5, reserve=2) == 3
    assert prefetch_room(free=2, reserve=2) == 0


# --- prefetching -----------------------------------------------------------------------------------


def test_a_cached_top_prefetches_its_bottom_an_uncached_expert_whole_a_whole_hit_nothing():
    assert prefetch_part(layout(), cache(5), 5) == "bottom"
    assert prefetch_part(layout(), cache(5), 6) == "whole"
    assert prefetch_part(layout(theta_blocks=4), cache(5), 5) is None
    assert prefetch_part(layout(theta_blocks=4), cache(5), 6) == "whole"


def test_prefetches_skip_what_is_on_its_way_or_a_whole_hit_and_stop_at_the_room():
    whole_tops = layout(theta_blocks=4)
    targets = [
        PrefetchTarget("a", layout(), cache(1), experts=[1, 2, 2, 3], on_the_way={3}),
        PrefetchTarget("b", whole_tops, cache(4), experts=[4, 5, 6], on_the_way=()),
    ]
    assert plan_prefetches(targets, room=10) == [
        Prefetch("a", 1, "bottom"), Prefetch("a", 2, "whole"), Prefetch("b", 5, "whole"), Prefetch("b", 6, "whole")
    ]
    assert plan_prefetches(targets, room=3) == [Prefetch("a", 1, "bottom"), Prefetch("a", 2, "whole"), Prefetch("b", 5, "whole")]
    assert plan_prefetches(targets, room=0) == []
    assert plan_prefetches(targets, room=-1) == []


def test_targets_are_read_no_further_than_the_room_lasts():
    read = []

    def targets():
        for key in ("a", "b"):
            read.append(key)
            yield PrefetchTarget(key, layout(), cache(), experts=[1, 2], on_the_way=())

    assert plan_prefetches(targets(), room=2) == [Prefetch("a", 1, "whole"), Prefetch("a", 2, "whole")]
    assert read == ["a"]


# --- a layer's prefetches when it routes -----------------------------------------------------------


def test_a_prefetch_is_used_where_the_plan_loads_that_part_kept_if_admitted_else_dropped():
    # Expert 1's top is cached (its bottom is loaded); 2 misses; 7 was prefetched whole, unused.
    priority_E = np.zeros(8)
    priority_E[7] = 5.0
    plan, _ = plan_layer_step(layout(slots=3), cache(1, slots=3), [1, 2], priority_E, loaded=[7])
    assert plan.kept == ((7, 1),)  # the planner admits it (it outranks the miss)
    prefetched = {1: "bottom", 2: "bottom", 7: "whole", 4: "whole"}
    assert prefetch_fates(plan, prefetched) == {1: "use", 2: "drop", 7: "keep", 4: "drop"}
    assert [p.expert for p in demand_loads(plan, {1: None})] == [2]
    assert [p.expert for p in demand_loads(plan, {})] == [1, 2]


def test_hits_are_never_demand_loads():
    plan, _ = plan_layer_step(layout(theta_blocks=4), cache(1, 2), [1, 2, 3], np.zeros(8))
    assert [p.expert for p in demand_loads(plan, ())] == [3]
    assert prefetch_fates(plan, {1: "bottom"}) == {1: "drop"}  # a whole hit loads nothing


def test_only_whole_prefetches_that_have_landed_are_offered_for_admission():
    prefetched = {1: "whole", 2: "bottom", 3: "whole"}
    assert admission_candidates(prefetched, lambda e: e != 3) == [1]
    assert admission_candidates(prefetched, lambda e: True) == [1, 3]


def test_a_partial_hit_joins_its_cached_top_and_an_admitted_miss_leaves_its_top_in_its_slot():
    split = layout(slots=2)
    plan, _ = plan_layer_step(split, cache(1), [1, 2, 3, 4], np.arange(8.0))
    by_expert = {p.expert: p for p in plan.experts}
    assert top_copy(by_expert[1], split) == "slot_to_staging"
    admitted = [e for e in (2, 3, 4) if by_expert[e].admitted]
    assert admitted == [4]  # one free slot, the highest priority miss
    assert top_copy(by_expert[4], split) == "staging_to_slot"
    assert top_copy(by_expert[2], split) is None and top_copy(by_expert[3], split) is None
    whole = layout(theta_blocks=4)
    hits, _ = plan_layer_step(whole, cache(1), [1], np.zeros(8))
    assert top_copy(hits.experts[0], whole) is None  # a whole hit runs in its slot


def test_with_a_miss_format_a_miss_moves_its_low_bit_copy_and_an_admitted_top_comes_from_the_host():
    """The planner prices a whole load at the low-bit copy's bytes (what the engine copies and the
    simulator times); the cache keeps the expert itself, so an admitted top is filled from the host."""
    low = attrs.evolve(layout(slots=2), miss_neuron_bytes=3)
    plan, _ = plan_layer_step(low, cache(1), [1, 2, 4], np.arange(8.0))
    by_expert = {p.expert: p for p in plan.experts}
    assert by_expert[2].bytes_loaded == low.ffn_size * 3 == low.whole_load_bytes < low.expert_bytes
    assert by_expert[1].bytes_loaded == low.bottom_bytes  # a partial hit's bottom: the expert's own bytes
    assert top_copy(by_expert[4], low) == "host_to_slot" and top_copy(by_expert[1], low) == "slot_to_staging"

