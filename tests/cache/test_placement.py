"""cache/placement.py: where a step's demand loads run — copied over the link or computed on the host
(unit and property).

Placements are checked against the two queues they are priced on: the link finishes its backlog,
its copies and its fills; the host finishes a hand-off, its jobs and a result back. The makespan of
a step's loads is the later of the two, computed here from the placements and the `LoadCosts`.
"""

from __future__ import annotations

import numpy as np
import attrs
import pytest
from hypothesis import given, strategies as st

from moepic.cache.layout import LayerCacheLayout
from moepic.cache.placement import (
    HYBRID_MODES, LoadCosts, Placement, check_mode, link_share, loads_finish_s, place_loads, prefetch_share, settle_fills,
    way_of,
)
from moepic.cache.planner import FREE, ExpertPlan, LayerCache, plan_layer_step

# --- builders ----------------------------------------------------------------------------------------


def costs(*, copy_whole=4.0, copy_bottom=2.0, host_whole=3.0, host_bottom=1.5, handoff=0.5, fill=1.0) -> LoadCosts:
    return LoadCosts(copy_whole_s=copy_whole, copy_bottom_s=copy_bottom, host_whole_s=host_whole,
                     host_bottom_s=host_bottom, handoff_s=handoff, fill_s=fill)


def miss(expert: int, slot: int | None = None) -> ExpertPlan:
    return ExpertPlan(expert, "miss", slot, "whole", 100)


def partial(expert: int, slot: int) -> ExpertPlan:
    return ExpertPlan(expert, "partial", slot, "bottom", 50)


seconds = st.floats(1e-6, 1.0, allow_nan=False, allow_infinity=False)


@st.composite
def load_costs(draw) -> LoadCosts:
    """Arbitrary prices per part, or (as the engine's pricing gives) prices linear in the bytes
    moved, with a top that lets an admitted miss be split between link and host."""
    handoff = draw(st.floats(0.0, 0.5))
    if not draw(st.booleans()):
        return LoadCosts(copy_whole_s=draw(seconds), copy_bottom_s=draw(seconds), host_whole_s=draw(seconds),
                         host_bottom_s=draw(seconds), handoff_s=handoff, fill_s=draw(seconds))
    return linear_costs(top=draw(st.floats(0.0, 1.0)), copy_fixed=draw(st.floats(0.0, 0.2)), copy_whole=draw(seconds),
                        host_fixed=draw(st.floats(0.0, 0.2)), host_whole=draw(seconds), handoff=handoff)


def linear_costs(*, top, copy_fixed, copy_whole, host_fixed, host_whole, handoff) -> LoadCosts:
    """A fixed price plus one per byte on each side, as HostPricing makes them; `top`: θ."""
    return LoadCosts(
        copy_whole_s=copy_fixed + copy_whole, copy_bottom_s=copy_fixed + (1 - top) * copy_whole,
        host_whole_s=host_fixed + host_whole, host_bottom_s=host_fixed + (1 - top) * host_whole,
        handoff_s=handoff, fill_s=copy_fixed + top * copy_whole, can_split=0 < top < 1,
    )


@st.composite
def demand(draw, max_loads: int = 8) -> list[ExpertPlan]:
    """A step's demand loads in plan order: misses (admitted or not) and partial hits, distinct experts and slots."""
    n = draw(st.integers(0, max_loads))
    out = []
    for e in range(n):
        kind = draw(st.sampled_from(["admitted miss", "miss", "partial"]))
        out.append(miss(e, slot=e) if kind == "admitted miss" else miss(e) if kind == "miss" else partial(e, e))
    return out


def makespan(placed: list[Placement], c: LoadCosts, link_busy_s: float) -> float:
    """The later of the link's finish and the host's."""
    return max(link_finish(placed, c, link_busy_s), host_finish(placed, c))


def link_finish(placed: list[Placement], c: LoadCosts, link_busy_s: float) -> float:
    """The backlog, then the copies (a split miss's top), then the fills."""
    copies = {"copy": lambda pl: c.copy_s(pl.plan.load), "split": lambda pl: c.fill_s}
    return link_busy_s + sum(copies[pl.place](pl) for pl in placed if pl.place in copies) + c.fill_s * sum(pl.fill for pl in placed)


def host_finish(placed: list[Placement], c: LoadCosts) -> float:
    """The hand-off, the host's jobs one after another (a split miss's bottom), the result back; 0 where it has none."""
    jobs = {"host": lambda pl: c.host_s(pl.plan.load), "split": lambda pl: c.host_bottom_s}
    hosted = [jobs[pl.place](pl) for pl in placed if pl.place in jobs]
    return c.handoff_s + sum(hosted) + c.handoff_s if hosted else 0.0


# --- modes -------------------------------------------------------------------------------------------


def test_off_copies_every_load_and_fills_nothing():
    loads = [miss(0, 0), partial(1, 1), miss(2)]
    placed = place_loads(loads, "off")
    assert [pl.place for pl in placed] == ["copy"] * 3
    assert [pl.plan for pl in placed] == loads and not any(pl.fill for pl in placed)
    # Costs change nothing when off: the copy-only engine, bit for bit.
    assert place_loads(loads, "off", costs(host_whole=1e-9, host_bottom=1e-9, handoff=0.0)) == placed


def test_host_only_computes_every_load_on_the_host_however_slow():
    loads = [miss(0), partial(1, 1), miss(2)]
    placed = place_loads(loads, "host-only", costs(host_whole=1e3, host_bottom=1e3, copy_whole=1e-6, copy_bottom=1e-6))
    assert [pl.place for pl in placed] == ["host"] * 3
    assert [pl.way for pl in placed] == ["host whole", "device top + host bottom", "host whole"]


def test_auto_without_costs_is_refused():
    with pytest.raises(ValueError, match="hybrid auto needs LoadCosts"):
        place_loads([miss(0)], "auto")
    assert place_loads([], "auto") == []  # nothing to place needs no prices





def test_check_mode_names_the_modes_and_asks_for_costs():
    with pytest.raises(ValueError, match=r"^hybrid must be one of off, auto, host-only, got 'banana'$"):
        check_mode("banana", True)
    with pytest.raises(ValueError, match="hybrid auto needs the costs"):
        check_mode("auto", False)
    assert check_mode("off", False) == "off"
    assert [check_mode(m, True) for m in HYBRID_MODES] == list(HYBRID_MODES)


def test_auto_puts_each_load_on_the_queue_that_finishes_it_first_ties_to_the_copy():
    c = costs(copy_whole=4.0, host_whole=3.0, handoff=0.5)  # hosted: 0.5 + 3 + 0.5 = 4 == copied: a tie
    assert [pl.place for pl in place_loads([miss(0)], "auto", c)] == ["copy"]
    # With the link busy for 1 s the copy would finish at 5: the host is sooner.
    assert [pl.place for pl in place_loads([miss(0)], "auto", c, link_busy_s=1.0)] == ["host"]
    # Two loads: the first copies (tie), the second would copy at 8 and hosts at 4.
    assert [pl.place for pl in place_loads([miss(0), miss(1)], "auto", c)] == ["copy", "host"]


def test_the_five_ways_an_expert_runs():
    assert way_of(ExpertPlan(0, "hit", 0, "none", 0), None) == "device"
    assert way_of(partial(0, 0), "host") == "device top + host bottom"
    assert way_of(partial(0, 0), "copy") == "device top + copied bottom"
    assert way_of(partial(0, 0), None) == "device top + copied bottom"  # a prefetch brought the bottom
    assert way_of(miss(0), "copy") == "copied whole"
    assert way_of(miss(0), "host") == "host whole"


# --- auto: never slower than either pure placement ----------------------------------------------


@given(loads=demand(), c=load_costs(), link_busy_s=st.floats(0.0, 2.0))
def test_auto_finishes_no_later_than_copying_all_or_hosting_all(loads, c, link_busy_s):
    """Each host choice is made when the host finishes before the copy would (and the link so far
    carries no more than all-copy's), and each copy when it finishes no later than the host would."""
    auto = makespan(place_loads(loads, "auto", c, link_busy_s=link_busy_s), c, link_busy_s)
    all_copy = makespan(place_loads(loads, "off", c, link_busy_s=link_busy_s), c, link_busy_s)
    all_host = makespan(place_loads(loads, "host-only", c, link_busy_s=link_busy_s), c, link_busy_s)
    slack = 1e-12 * max(1.0, all_copy, all_host)
    assert auto <= all_copy + slack
    assert auto <= all_host + slack


@given(loads=demand(), c=load_costs(), link_busy_s=st.floats(0.0, 2.0), mode=st.sampled_from(HYBRID_MODES))
def test_placement_is_a_pure_function_that_keeps_plan_order_one_placement_per_load(loads, c, link_busy_s, mode):
    given_loads = list(loads)
    placed = place_loads(loads, mode, c, link_busy_s=link_busy_s)
    assert loads == given_loads  # its input untouched
    assert place_loads(tuple(loads), mode, c, link_busy_s=link_busy_s) == placed
    assert [pl.plan for pl in placed] == loads
    for pl in placed:
        assert pl.place in (("copy", "host", "split") if mode == "auto" else ("copy", "host"))
        if pl.place == "split":  # only an admitted miss, only where θ cuts the expert in two
            assert pl.plan.admitted and c.can_split


# --- fills ----------------------------------------------------------------------------------------------


@given(loads=demand(), c=load_costs(), link_busy_s=st.floats(0.0, 2.0), mode=st.sampled_from(HYBRID_MODES))
def test_fills_are_only_host_computed_admitted_misses_and_never_make_the_link_finish_after_the_host(
    loads, c, link_busy_s, mode,
):
    placed = place_loads(loads, mode, c, link_busy_s=link_busy_s)
    for pl in placed:
        if pl.fill:
            assert pl.place == "host" and pl.plan.admitted
    host = host_finish(placed, c)
    link = link_finish(placed, c, link_busy_s)
    if mode == "host-only":  # it fills every admission, however long the link takes (tested below)
        return
    if any(pl.fill for pl in placed):
        assert link <= host * (1 + 1e-12)
    # Fills are taken while they fit: one left unfilled would not have fitted at the end either.
    if any(pl.place == "host" and pl.plan.admitted and not pl.fill for pl in placed):
        assert link + c.fill_s > host * (1 - 1e-12)


def test_host_only_fills_every_admitted_miss_whatever_the_prices():
    """host-only copies nothing else, so the link is free for every fill (and it needs no prices)."""
    for c in (None, costs(host_whole=3.0, handoff=0.5, fill=1e3)):
        placed = place_loads([miss(0, slot=1), miss(2), partial(3, 0)], "host-only", c)
        assert placed == [Placement(miss(0, slot=1), "host", True), Placement(miss(2), "host", False),
                          Placement(partial(3, 0), "host", False)]  # no slot to fill; a partial hit's top is cached


def test_auto_fills_in_plan_order_while_the_link_has_room():
    c = costs(copy_whole=100.0, host_whole=3.0, handoff=0.5, fill=1.5)  # host: 0.5 + 3·3 + 0.5 = 10; room for 6 fills of 1.5
    placed = place_loads([miss(0, 0), miss(1, 1), miss(2, 2)], "auto", c, link_busy_s=6.5)
    assert [pl.place for pl in placed] == ["host"] * 3
    assert [pl.fill for pl in placed] == [True, True, False]  # 6.5 + 1.5 + 1.5 = 9.5 ≤ 10; a third would end at 11
    # A busy link that would finish the fill after the host: no fill.
    assert not place_loads([miss(0, slot=0)], "auto", c, link_busy_s=9.9)[0].fill


def test_a_copied_miss_is_never_filled():
    placed = place_loads([miss(0, 0)], "auto", costs(copy_whole=1.0, host_whole=10.0, fill=0.1))
    assert placed == [Placement(miss(0, 0), "copy", False)]


# --- settle_fills ------------------------------------------------------------------------------------------


def layer(*, slots: int, experts: int, theta_blocks: int) -> LayerCacheLayout:
    return LayerCacheLayout(layer=0, num_experts=experts, ffn_size=16, block=4, top_neurons=4 * theta_blocks, slots=slots,
                            neuron_bytes=10)


@st.composite
def settled_steps(draw):
    """A cache after a few random steps, then one more step planned and placed at random (host
    placements with or without a fill where the load is an admitted miss)."""
    E = draw(st.integers(2, 8))
    lay = layer(slots=draw(st.integers(1, E)), experts=E, theta_blocks=draw(st.integers(1, 3)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    cache = LayerCache.empty(lay.slots)
    for _ in range(draw(st.integers(0, 4))):
        used = sorted(rng.choice(E, draw(st.integers(1, E)), replace=False).tolist())
        _, cache = plan_layer_step(lay, cache, used, rng.random(E))
    used = sorted(rng.choice(E, draw(st.integers(1, E)), replace=False).tolist())
    loaded = [e for e in range(E) if e not in used and draw(st.booleans())][:2]
    plan, after = plan_layer_step(lay, cache, used, rng.random(E), loaded)
    placed = []
    for p in plan.experts:
        if p.load == "none":
            continue
        place = draw(st.sampled_from(["copy", "host"]))
        placed.append(Placement(p, place, place == "host" and p.admitted and draw(st.booleans())))
    return lay, cache, plan, after, placed


@given(step=settled_steps())
def test_settled_fills_leave_a_cache_whose_slots_agree_with_the_plan(step):
    _, before, plan, after, placed = step
    settled_plan, settled = settle_fills(plan, after, placed)
    victims = {slot: e for e, slot in plan.evicted}
    slot_of = settled.slot_of()
    cached = [e for e in settled.slots_S if e != FREE]
    assert len(cached) == len(set(cached)), "an expert in two slots"
    assert len(settled.slots_S) == len(before.slots_S)
    by_expert = {p.expert: p for p in settled_plan.experts}
    assert [p.expert for p in settled_plan.experts] == [p.expert for p in plan.experts]
    for pl in placed:
        p = pl.plan
        if pl.place == "host" and p.admitted and not pl.fill:  # withdrawn: the slot is the victim's again, or free
            assert p.expert not in slot_of and by_expert[p.expert].slot is None
            assert settled.slots_S[p.slot] == victims.get(p.slot, FREE)
            assert settled.slots_S[p.slot] == before.slots_S[p.slot]
            assert p.slot not in {s for _, s in settled_plan.evicted}
        elif p.admitted:  # filled, or copied: it keeps its slot
            assert slot_of.get(p.expert) == p.slot == by_expert[p.expert].slot
    for p in settled_plan.experts:
        if p.slot is not None:
            assert settled.slots_S[p.slot] == p.expert
        else:
            assert p.expert not in slot_of
    for e, slot in settled_plan.kept:
        assert settled.slots_S[slot] == e
    for e, slot in settled_plan.evicted:
        assert e not in slot_of and settled.slots_S[slot] != e


@given(step=settled_steps())
def test_without_a_withdrawn_admission_settling_changes_nothing(step):
    _, _, plan, after, placed = step
    kept = [pl if not (pl.place == "host" and pl.plan.admitted) else pl._replace(fill=True) for pl in placed]
    assert settle_fills(plan, after, kept) == (plan, after)


def test_a_withdrawn_admission_gives_the_slot_back_to_its_victim():
    lay = layer(slots=2, experts=4, theta_blocks=2)
    priority_E = np.array([0.0, 1.0, 0.0, 5.0])
    plan, after = plan_layer_step(lay, LayerCache((0, 1)), [1, 3], priority_E)
    assert plan.evicted == ((0, 0),) and after.slots_S == (3, 1)
    settled_plan, settled = settle_fills(plan, after, [Placement(p, "host") for p in plan.experts])
    assert settled.slots_S == (0, 1) and settled_plan.evicted == ()
    assert settled_plan.experts == (ExpertPlan(1, "partial", 1, "bottom", 80), ExpertPlan(3, "miss", None, "whole", 160))
    # Filled, the admission stands.
    filled = [Placement(plan.experts[0], "host"), Placement(plan.experts[1], "host", True)]
    assert settle_fills(plan, after, filled) == (plan, after)


def test_a_withdrawn_admission_into_a_free_slot_leaves_it_free():
    lay = layer(slots=3, experts=4, theta_blocks=2)
    plan, after = plan_layer_step(lay, LayerCache((1, FREE, FREE)), [1, 2, 3], np.zeros(4))
    assert after.slots_S == (1, 2, 3) and plan.evicted == ()
    hosted = {2: Placement(plan.experts[1], "host", True), 3: Placement(plan.experts[2], "host", False)}
    settled_plan, settled = settle_fills(plan, after, [Placement(plan.experts[0], "copy"), *hosted.values()])
    assert settled.slots_S == (1, 2, FREE)
    assert [p.slot for p in settled_plan.experts] == [0, 1, None]


# --- the link's share ---------------------------------------------------------------------------------------


@given(c=load_costs(), part=st.sampled_from(["whole", "bottom"]), cheaper=st.floats(1.01, 100.0))
def test_the_links_share_is_strictly_between_nothing_and_everything_and_grows_as_copies_get_cheaper(c, part, cheaper):
    share = link_share(c, part)
    assert 0.0 < share < 1.0
    faster = LoadCosts(copy_whole_s=c.copy_whole_s / cheaper, copy_bottom_s=c.copy_bottom_s / cheaper,
                       host_whole_s=c.host_whole_s, host_bottom_s=c.host_bottom_s, handoff_s=c.handoff_s, fill_s=c.fill_s)
    assert link_share(faster, part) > share


def test_the_links_share_balances_the_two_rates():
    # Copy 1 s, host 2 + 2·0.5 = 3 s: the link carries 3 of every 4 loads.
    assert link_share(costs(copy_whole=1.0, host_whole=2.0, handoff=0.5)) == pytest.approx(0.75)
    # Bottoms: copy 3 s, host 0.5 + 2·0.5 = 1.5 s: one of every three.
    assert link_share(costs(copy_bottom=3.0, host_bottom=0.5, handoff=0.5), "bottom") == pytest.approx(1 / 3)


def test_a_free_copy_takes_the_whole_share():
    """A CPU run with no emulated link prices copies at zero: the link carries everything (this
    divided by zero once, with a predictor prefetching under `--hybrid auto`)."""
    assert link_share(costs(copy_whole=0.0, host_whole=2.0, handoff=0.5)) == 1.0
    assert prefetch_share("auto", costs(copy_whole=0.0, host_whole=0.0, handoff=0.0)) == 1.0


def test_auto_splits_an_admitted_miss_where_top_over_the_link_and_bottom_on_the_host_finish_first():
    # Whole: copied 4, hosted 0.5 + 3 + 0.5 = 4; split: max(top copied 2, 0.5 + bottom 1.5 + 0.5 = 2.5) = 2.5.
    c = attrs.evolve(costs(copy_whole=4.0, host_whole=3.0, host_bottom=1.5, handoff=0.5, fill=2.0), can_split=True)
    placed = place_loads([miss(0, slot=3)], "auto", c)
    assert placed == [Placement(miss(0, slot=3), "split", False)] and placed[0].way == "copied top + host bottom"
    # Not admitted (no slot for its top), or θ not cutting the expert in two: never split.
    assert place_loads([miss(0)], "auto", c)[0].place != "split"
    assert place_loads([miss(0, slot=3)], "auto", attrs.evolve(c, can_split=False))[0].place != "split"
    # host-only never copies a top to split a miss.
    assert place_loads([miss(0, slot=3)], "host-only", c)[0].place == "host"
    # A split keeps its admission: settle_fills leaves its slot alone.
    assert loads_finish_s(["whole"], "auto", c, admitted=True) == 2.5
    assert loads_finish_s(["whole"], "auto", c) == 4.0


def test_prefetch_share_is_everything_copy_only_nothing_host_only_and_the_link_s_share_in_auto():
    c = costs(copy_whole=1.0, host_whole=2.0, handoff=0.5)
    assert (prefetch_share("off", None), prefetch_share("host-only", None), prefetch_share("host-only", c)) == (1.0, 0.0, 0.0)
    assert prefetch_share("auto", c) == link_share(c)
    with pytest.raises(ValueError, match="hybrid auto needs LoadCosts"):
        prefetch_share("auto", None)

