"""The residency planner: what one layer step loads, evicts and admits. Pure, and shared by the real
engine (moepic/runtime/offload.py) and trace replays (moepic/cache/replay.py), so a hit rate
replayed on a trace is the hit rate the engine would see on the same routing.

    routed experts ─▶ policy.update ─▶ priority_E ─▶ classify (hit / partial / miss)
                                                  └─▶ admit misses over the lowest-priority
                                                      cached experts the step does not use

Per layer, the cache holds the top segments (the first `top_neurons` neurons) of up to `slots`
experts. For an expert the step routes to:
- hit      its top is cached and is the whole expert (θ = 1): nothing is loaded;
- partial  its top is cached: only the bottom is loaded;
- miss     nothing cached: the whole expert is loaded. It is *admitted* (its top kept in a slot)
           if a slot is free or its priority beats the lowest-priority cached expert that this
           step does not use, which is then evicted. A segment the step uses is never evicted.
An expert that was loaded whole without being routed (a wrong prefetch) competes for admission
by the same rule: the policy decides whether it is kept or dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import attrs
import numpy as np

from moepic.cache.layout import LayerCacheLayout
from moepic.policies.base import CachePolicy, LayerStep

Outcome = Literal["hit", "partial", "miss"]
FREE = -1


@attrs.frozen
class LayerCache:
    """Which expert's top segment each slot holds (FREE when empty)."""

    slots_S: tuple[int, ...]

    @classmethod
    def empty(cls, slots: int) -> LayerCache:
        return cls((FREE,) * slots)

    def slot_of(self) -> dict[int, int]:
        return {e: s for s, e in enumerate(self.slots_S) if e != FREE}


@attrs.frozen(kw_only=True)
class ExpertPlan:
    expert: int
    outcome: Outcome
    slot: int | None  # its cached top (hit, partial) or the slot it is admitted to (miss); None: not cached
    load: Literal["none", "bottom", "whole"]
    bytes_loaded: int

    @property
    def admitted(self) -> bool:
        return self.outcome == "miss" and self.slot is not None


@attrs.frozen(kw_only=True)
class LayerPlan:
    layer: int
    experts: tuple[ExpertPlan, ...]  # one per routed expert, by expert id
    evicted: tuple[tuple[int, int], ...]  # (expert, slot) whose top this step drops
    kept: tuple[tuple[int, int], ...] = ()  # (expert, slot): loaded without being routed, admitted

    @property
    def bytes_loaded(self) -> int:
        return sum(p.bytes_loaded for p in self.experts)


@attrs.frozen(eq=False)
class LayerResidency:
    """Everything the planner carries from one step of a layer to the next."""

    cache: LayerCache
    policy_state: object
    clock: int = 0  # tokens this layer has routed


def initial_residency(policy: CachePolicy, layout: LayerCacheLayout) -> LayerResidency:
    """An empty cache, except that a layer with room for all its whole experts starts with them all
    (the engine loads them up front, as a dense model would: such a layer never loads again)."""
    cache = LayerCache(tuple(range(layout.num_experts))) if layout.fully_resident else LayerCache.empty(layout.slots)
    return LayerResidency(cache, policy.init(layout.layer, layout.num_experts))


def plan_layer_step(
    layout: LayerCacheLayout,
    cache: LayerCache,
    counts_E: np.ndarray,
    priority_E: np.ndarray,
    loaded: Sequence[int] = (),
) -> tuple[LayerPlan, LayerCache]:
    """Plan one step of a layer: the experts with nonzero `counts_E` are used, `priority_E` ranks all;
    `loaded` experts are on the device whole without being used (candidates for admission only)."""
    used = [int(e) for e in np.flatnonzero(counts_E)]
    slot_of = cache.slot_of()
    extra = [e for e in loaded if e not in slot_of and counts_E[e] == 0]
    misses = [e for e in used if e not in slot_of] + extra
    # Misses in order of priority (ties: lower id first); each takes a free slot or displaces the
    # lowest-priority cached expert this step does not use, if it is worth more.
    slots_S = list(cache.slots_S)
    free = [s for s, e in enumerate(slots_S) if e == FREE]
    victims = sorted((e for e in slot_of if counts_E[e] == 0), key=lambda e: (priority_E[e], e))
    admitted: dict[int, int] = {}
    evicted: list[tuple[int, int]] = []
    for e in sorted(misses, key=lambda e: (-priority_E[e], e)):
        if free:
            slot = free.pop(0)
        elif victims and priority_E[e] > priority_E[victims[0]]:
            victim = victims.pop(0)
            slot = slot_of[victim]
            evicted.append((victim, slot))
        else:
            break
        slots_S[slot] = e
        admitted[e] = slot
    whole, bottom = layout.expert_bytes, layout.bottom_bytes
    plans = []
    for e in used:
        if e in slot_of:
            full = layout.top_neurons == layout.ffn_size
            plans.append(ExpertPlan(
                expert=e, outcome="hit" if full else "partial", slot=slot_of[e],
                load="none" if full else "bottom", bytes_loaded=0 if full else bottom,
            ))
        else:
            plans.append(ExpertPlan(expert=e, outcome="miss", slot=admitted.get(e), load="whole", bytes_loaded=whole))
    kept = tuple((e, admitted[e]) for e in extra if e in admitted)
    plan = LayerPlan(layer=layout.layer, experts=tuple(plans), evicted=tuple(evicted), kept=kept)
    return plan, LayerCache(tuple(slots_S))


def residency_step(
    policy: CachePolicy,
    layout: LayerCacheLayout,
    residency: LayerResidency,
    counts_E: np.ndarray,
    *,
    tokens: int,
    new_request: bool = False,
    loaded: Sequence[int] = (),
) -> tuple[LayerPlan, LayerResidency]:
    """One layer step over `tokens` tokens: let the policy see the routing, then plan with its fresh priorities."""
    step = LayerStep(layer=layout.layer, clock=residency.clock, tokens=tokens, counts_E=counts_E, new_request=new_request)
    policy_state = policy.update(residency.policy_state, step)
    plan, cache = plan_layer_step(layout, residency.cache, counts_E, policy.priority(policy_state), loaded)
    return plan, LayerResidency(cache, policy_state, residency.clock + tokens)
