"""The copy schedule: which host → device copies a layer step starts, and what becomes of each
prefetch. Pure, and shared by the engine (moepic/runtime/offload.py executes these decisions with
real copies and staging buffers) and the simulator (moepic/sim/simulate.py times them on a link),
so that both copy the same experts, in the same order, into the same number of buffers.

    layer routes ─▶ plan (planner.py) ─▶ prefetch_fates: each prefetch for it is used, kept or dropped
                                     ├─▶ demand_loads: the plan's loads no prefetch brings (urgent)
                                     └─▶ plan_prefetches: later layers' named experts, within the
                                         staging room the demand reserve leaves

Staging is shared by a layer's own loads and the prefetches for later layers. A reserve of buffers
is kept for the layer computing (`demand_reserve`): it issues demand copies while fewer than the
reserve are in flight (`demand_room`), and prefetching stops where it would take the reserve
(`prefetch_room`). A dropped prefetch is cancelled if its copy has not started and wasted if it
has: that is a fact of timing (the copy engine's or the simulator's), not a decision, so the
schedule says only "drop".
"""

from __future__ import annotations

from collections.abc import Callable, Container, Hashable, Iterable, Mapping, Sequence
import math
from typing import Literal

import attrs

from moepic.cache.layout import LayerCacheLayout, PrefetchShape, prefetch_buffers
from moepic.cache.planner import ExpertPlan, LayerCache, LayerPlan

Part = Literal["whole", "bottom"]
Fate = Literal["use", "keep", "drop"]
TopCopy = Literal["slot_to_staging", "staging_to_slot", "host_to_slot"]


def demand_reserve(staging_experts: int, prefetch: PrefetchShape) -> int:
    """Staging buffers prefetching never takes, so the computing layer's own loads always find one."""
    return max(1, staging_experts - prefetch_buffers(prefetch))


def demand_room(in_flight: int, reserve: int) -> int:
    """Demand copies a layer may still start now: its loads in flight (matched prefetches
    included) stay within the reserve; more start as its experts finish with their buffers."""
    return reserve - in_flight


def demand_in_flight(matched: int, demanded: int, reserve: int) -> int:
    """Demand copies in flight once a layer has started what `demand_room` allows, with `matched`
    prefetches already holding buffers and `demanded` loads to make."""
    return min(demanded, max(0, demand_room(matched, reserve)))


def prefetch_room(free: int, reserve: int) -> int:
    """Prefetches that may start with `free` staging buffers: never the demand reserve."""
    return free - reserve


def prefetch_part(layout: LayerCacheLayout, cache: LayerCache, expert: int) -> Part | None:
    """What to copy ahead for `expert`: its bottom if its top is cached, all of it if not, nothing
    if its cached top is the whole expert (θ = 1: a hit)."""
    if expert not in cache.slot_of():
        return "whole"
    return None if layout.top_neurons == layout.ffn_size else "bottom"


@attrs.frozen
class PrefetchTarget:
    """A later layer a predictor named experts for, as the layer prefetching sees it."""

    key: Hashable  # how the caller names the layer (the engine: its id; the simulator: its column)
    layout: LayerCacheLayout
    cache: LayerCache
    experts: Sequence[int]  # named, best first (at most k′)
    on_the_way: Container[int]  # experts already prefetched for it by an earlier layer
    # Hybrid runs: the share of its loads the link should carry (placement.link_share); the rest
    # is left to the host, which computes them when the layer routes. 1: prefetch all.
    link_share: float = 1.0


@attrs.frozen
class Prefetch:
    key: Hashable  # the target layer, as its PrefetchTarget names it
    expert: int
    part: Part


def plan_prefetches(targets: Iterable[PrefetchTarget], room: int) -> list[Prefetch]:
    """The prefetches to start, in order: each target's named experts, skipping those already on
    their way and whole-expert hits, until `room` staging buffers are taken. `targets` is read
    lazily and no further than the room lasts (the simulator builds them on demand)."""
    out: list[Prefetch] = []
    if room <= 0:
        return out
    for target in targets:
        issued: set[int] = set()
        wanted = [e for e in dict.fromkeys(target.experts) if prefetch_part(target.layout, target.cache, e) is not None]
        # The link's share of the named loads, rounded half up (one of two at a share ≥ 0.5).
        allowed = len(wanted) if target.link_share >= 1 else math.floor(len(wanted) * target.link_share + 0.5)
        for e in wanted[:allowed]:
            if e in target.on_the_way or e in issued:
                continue  # already on its way
            out.append(Prefetch(target.key, e, prefetch_part(target.layout, target.cache, e)))
            issued.add(e)
            if len(out) == room:
                return out
    return out


def admission_candidates(prefetched: Mapping[int, Part], landed: Callable[[int], bool]) -> list[int]:
    """The prefetches for a layer offered to the planner for admission when it routes: those
    copied whole whose copy has landed (`landed(expert)`); a wrong one may still be worth caching."""
    return [e for e, part in prefetched.items() if part == "whole" and landed(e)]


def prefetch_fates(plan: LayerPlan, prefetched: Mapping[int, Part]) -> dict[int, Fate]:
    """What becomes of each prefetch for the layer `plan` plans, in `prefetched` order: used where
    the plan loads that expert and that part, kept where the planner admitted it (`plan.kept`),
    dropped otherwise."""
    load_of = {p.expert: p.load for p in plan.experts}
    kept = {e for e, _ in plan.kept}
    return {
        e: "use" if load_of.get(e) == part else "keep" if e in kept else "drop"
        for e, part in prefetched.items()
    }


def top_copy(p: ExpertPlan, layout: LayerCacheLayout) -> TopCopy | None:
    """The copy a loaded expert's top needs: a partial hit's cached top joins its bottom in
    staging (one buffer in the compute layout); an admitted miss leaves its top in its slot. None:
    a hit (computed in its slot) or a miss the cache does not keep. (A kept prefetch's top goes to
    its slot too: `plan.kept`, through `admitted_top_copy`.)"""
    if p.load == "none" or p.slot is None:
        return None
    return "slot_to_staging" if p.outcome == "partial" else admitted_top_copy(layout)


def admitted_top_copy(layout: LayerCacheLayout) -> TopCopy:
    """Where the top of an expert loaded whole and admitted to the cache comes from: its staging
    buffer (a device copy), or, where misses are served from a low-bit copy (`cache.miss_format`),
    the host: the cache keeps the expert itself, filled behind the step's other copies."""
    return "host_to_slot" if layout.low_bit_misses else "staging_to_slot"


def demand_loads(plan: LayerPlan, matched: Container[int]) -> list[ExpertPlan]:
    """The plan's loads no prefetch brings, in plan order: demand copies, urgent."""
    return [p for p in plan.experts if p.load != "none" and p.expert not in matched]


def host_filled_tops(plan: LayerPlan, layout: LayerCacheLayout) -> list[int]:
    """The experts whose tops the cache fills from the host this step, in plan order: where misses
    are served from a low-bit copy, each one loaded whole and admitted, and each kept prefetch."""
    if admitted_top_copy(layout) != "host_to_slot":
        return []
    admitted = [p.expert for p in plan.experts if p.load == "whole" and p.slot is not None]
    return admitted + [e for e, _ in plan.kept]
