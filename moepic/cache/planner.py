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
from typing import Literal, NamedTuple

import attrs
import numpy as np

from moepic.cache.layout import LayerCacheLayout
from moepic.policies.base import CachePolicy, LayerStep

Outcome = Literal["hit", "partial", "miss"]
FREE = -1


class LayerCache:
    """Which expert's top segment each slot holds (FREE when empty). An immutable value."""

    __slots__ = ("slots_S", "_slot_of")

    def __init__(self, slots_S: tuple[int, ...], slot_of: dict[int, int] | None = None) -> None:
        self.slots_S = tuple(slots_S)
        # expert → slot, derived once per cache state (the planner asks on every step).
        self._slot_of = slot_of if slot_of is not None else {e: s for s, e in enumerate(self.slots_S) if e != FREE}

    @classmethod
    def empty(cls, slots: int) -> LayerCache:
        return cls((FREE,) * slots)

    def slot_of(self) -> dict[int, int]:
        """expert → slot (a shared view: do not mutate)."""
        return self._slot_of

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LayerCache) and self.slots_S == other.slots_S

    def __hash__(self) -> int:
        return hash(self.slots_S)

    def __repr__(self) -> str:
        return f"LayerCache({self.slots_S})"


class ExpertPlan(NamedTuple):  # tuples, not attrs: the planner makes ~10⁵ a second in the simulator
    expert: int
    outcome: Outcome
    slot: int | None  # its cached top (hit, partial) or the slot it is admitted to (miss); None: not cached
    load: Literal["none", "bottom", "whole"]
    bytes_loaded: int

    @property
    def admitted(self) -> bool:
        return self.outcome == "miss" and self.slot is not None


class LayerPlan(NamedTuple):
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
    used: Sequence[int],
    priority_E: np.ndarray,
    loaded: Sequence[int] = (),
) -> tuple[LayerPlan, LayerCache]:
    """Plan one step of a layer: `used` are the experts it routes to (ascending ids), `priority_E`
    ranks all; `loaded` experts are on the device whole without being used (admission candidates).

    Written for speed (the simulator runs it ~10⁵ times a second): plain lists and dicts, and the
    priorities are read only when something misses."""
    slot_of = cache._slot_of
    extra = [e for e in loaded if e not in slot_of and e not in used] if loaded else []
    misses = [e for e in used if e not in slot_of] + extra
    admitted: dict[int, int] = {}
    evicted: list[tuple[int, int]] = []
    if misses and layout.slots:
        # Misses in order of priority (ties: lower id first); each takes a free slot or displaces the
        # lowest-priority cached expert this step does not use, if it is worth more.
        worth = priority_E.tolist()
        by_worth = worth.__getitem__
        # Two stable sorts order by worth with ties to the lower id, with no Python-level key tuples.
        if len(misses) > 1:
            misses.sort()
            misses.sort(key=by_worth, reverse=True)
        slots_S = list(cache.slots_S)
        free = [s for s, e in enumerate(slots_S) if e == FREE] if len(slot_of) < len(slots_S) else []
        victims = []
        if len(misses) > len(free):
            victims = sorted([e for e in slot_of if e not in used])
            victims.sort(key=by_worth)
        v = 0
        for e in misses:
            if free:
                slot = free.pop(0)
            elif v < len(victims) and worth[e] > worth[victims[v]]:
                slot = slot_of[victims[v]]
                evicted.append((victims[v], slot))
                v += 1
            else:
                break
            slots_S[slot] = e
            admitted[e] = slot
        if admitted:
            new_slot_of = dict(slot_of)
            for victim, _ in evicted:
                del new_slot_of[victim]
            new_slot_of.update(admitted)
            cache = LayerCache(tuple(slots_S), new_slot_of)
    if layout.top_neurons == layout.ffn_size:
        outcome, load, nbytes = "hit", "none", 0
    else:
        outcome, load, nbytes = "partial", "bottom", layout.bottom_bytes
    whole = layout.whole_load_bytes
    plans = tuple([
        ExpertPlan(e, outcome, slot_of[e], load, nbytes) if e in slot_of
        else ExpertPlan(e, "miss", admitted.get(e), "whole", whole)
        for e in used
    ])
    kept = tuple([(e, admitted[e]) for e in extra if e in admitted]) if extra else ()
    return LayerPlan(layout.layer, plans, tuple(evicted), kept), cache


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
    plan, cache = plan_layer_step(layout, residency.cache, np.flatnonzero(counts_E).tolist(), policy.priority(policy_state), loaded)
    return plan, LayerResidency(cache, policy_state, residency.clock + tokens)
