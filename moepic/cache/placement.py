"""Where each loaded expert of a layer step runs: copied to the device, or computed on the host
CPU where its weights already are. Pure, and shared by the engine (moepic/runtime/offload.py runs
the host's share on its worker threads) and the simulator (moepic/sim/simulate.py times it on a
third resource beside device compute and the link), so both place the same experts alike.

The planner (planner.py) says what a step needs loaded; the copy schedule (schedule.py) says which
of it a prefetch already brings. The rest — the demand loads — is placed here, one expert at a time
in plan order, on whichever of two queues (or both, a miss split between them) finishes it first
(docs/design.md §8):

    link queue  ── backlog (prefetches still in flight) ─ copy whole / copy bottom ─▶ device computes it
    host queue  ── hand-off ─ host computes whole / bottom ─ result back ─▶ device adds it

which gives, per routed expert, one of six ways to run (`Way`):
    device                  its whole expert is cached (θ = 1)            nothing loaded
    device top + host bottom   top cached; the host computes the bottom    nothing copied
    device top + copied bottom top cached; the bottom is copied            (the copy-only engine's partial hit)
    copied whole            nothing cached; the whole expert is copied     (the copy-only engine's miss)
    host whole              nothing cached; the host computes all of it    (its top is *filled* into its slot
                                                                            in the background if admitted)
    copied top + host bottom   nothing cached, admitted: its top copied into its slot while the host
                               computes its bottom, both at once (θ shares a miss between the two)

Modes: `off` copies every load (the copy-only engine, bit for bit); `host-only` computes every load
on the host and prefetches nothing, so the link carries only fills: every admitted miss is filled
(llama.cpp's and KTransformers' way, plus a cache); `auto` picks per expert by the two queues'
finish times, ties to the copy, and fills only where the link would otherwise idle.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import attrs

from moepic.cache.planner import FREE, ExpertPlan, LayerCache, LayerPlan

Hybrid = Literal["off", "auto", "host-only"]
HYBRID_MODES: tuple[Hybrid, ...] = ("off", "auto", "host-only")
Place = Literal["copy", "host", "split"]
Way = Literal[
    "device", "device top + host bottom", "device top + copied bottom", "copied whole", "host whole",
    "copied top + host bottom",
]


@attrs.frozen(kw_only=True)
class LoadCosts:
    """Seconds each path costs one expert part of one layer step (its tokens priced in)."""

    copy_whole_s: float  # over the link
    copy_bottom_s: float
    host_whole_s: float  # on the host worker threads
    host_bottom_s: float
    handoff_s: float  # the tokens' input to the host before it starts; a result back to the device after
    fill_s: float  # a top segment copied into its slot
    # A missed expert may be split between the two: its top copied into the slot the planner
    # admitted it to while the host computes its bottom (only where θ cuts it in two).
    can_split: bool = False

    def copy_s(self, part: str) -> float:
        return self.copy_whole_s if part == "whole" else self.copy_bottom_s

    def host_s(self, part: str) -> float:
        return self.host_whole_s if part == "whole" else self.host_bottom_s


class Placement(NamedTuple):  # a tuple: the simulator makes one per load, ~10⁵ a second
    plan: ExpertPlan
    place: Place
    # A host-computed miss the planner admitted whose top is copied into its slot, behind the
    # step's copies. In `auto` only where the link would otherwise wait for the host, else the
    # admission is withdrawn (`settle_fills`): the link never slows a step to fill a cache.
    fill: bool = False

    @property
    def way(self) -> Way:
        return way_of(self.plan, self.place)


def way_of(plan: ExpertPlan, place: Place | None) -> Way:
    """How a routed expert runs; `place` None: nothing loaded (a hit, or a prefetch brought it: copied)."""
    if plan.load == "none":
        return "device"
    if plan.load == "bottom":
        return "device top + host bottom" if place == "host" else "device top + copied bottom"
    if place == "split":
        return "copied top + host bottom"
    return "host whole" if place == "host" else "copied whole"


def check_mode(mode: str, costs_given: bool) -> Hybrid:
    if mode not in HYBRID_MODES:
        raise ValueError(f"hybrid must be one of {', '.join(HYBRID_MODES)}, got {mode!r}")
    if mode == "auto" and not costs_given:
        raise ValueError("hybrid auto needs the costs of copying and of host compute (a hardware and host profile)")
    return mode  # type: ignore[return-value]


def place_loads(
    loads: Sequence[ExpertPlan], mode: Hybrid, costs: LoadCosts | None = None, *, link_busy_s: float = 0.0
) -> list[Placement]:
    """Each of `loads` — a step's demand loads, in plan order — on the link or the host.

    In a hybrid run a step's prefetches that have not started are withdrawn when it routes and
    placed here as demand loads (copying one again costs what it would have cost queued);
    `link_busy_s` is the copy time of those under way, which the link finishes first (each priced
    whole: neither engine nor simulator knows how far a copy has got). The host queue starts
    empty: each layer step waits for its host results before the next."""
    if mode == "off" or not loads:
        return [Placement(p, "copy") for p in loads]
    if mode == "host-only":  # the link carries nothing but fills, so every admission is filled
        return [Placement(p, "host", p.outcome == "miss" and p.slot is not None) for p in loads]
    return _greedy(loads, mode, costs, link_busy_s)[0]


def loads_finish_s(
    parts: Sequence[str], mode: Hybrid, costs: LoadCosts, *, link_busy_s: float = 0.0, admitted: bool = False
) -> float:
    """When the last of a step's loads (`parts`: "whole" or "bottom", in order) is ready on the
    device, placed by `place_loads`'s rule (the latency model's price of a hybrid step); `admitted`:
    its misses take a slot (so they may be split)."""
    if not parts:
        return 0.0
    slot = 0 if admitted else None
    loads = [ExpertPlan(i, "miss", slot, part, 0) if part == "whole" else ExpertPlan(i, "partial", 0, part, 0)
             for i, part in enumerate(parts)]
    if mode == "off":
        return link_busy_s + sum(costs.copy_s(part) for part in parts)
    _, link, host = _greedy(loads, mode, costs, link_busy_s)
    return max(link, host + costs.handoff_s if host > costs.handoff_s else 0.0)


def _greedy(
    loads: Sequence[ExpertPlan], mode: Hybrid, costs: LoadCosts | None, link_busy_s: float
) -> tuple[list[Placement], float, float]:
    """(placements, the link's finish, the host's last job's finish): each load on whichever
    queue finishes it first (host-only: the host), then fills where the link would idle."""
    if costs is None:
        raise ValueError(f"hybrid {mode} needs LoadCosts to time its loads")
    link, host = link_busy_s, costs.handoff_s
    placed: list[tuple[ExpertPlan, Place]] = []
    for p in loads:
        copied = link + costs.copy_s(p.load)
        hosted = host + costs.host_s(p.load)
        if mode == "host-only":
            host = hosted
            placed.append((p, "host"))
            continue
        # A split admitted miss: its top over the link, its bottom on the host, at once.
        splits = costs.can_split and p.outcome == "miss" and p.slot is not None
        split = max(link + costs.fill_s, host + costs.host_bottom_s + costs.handoff_s) if splits else math.inf
        if copied <= min(split, hosted + costs.handoff_s):
            link = copied
            placed.append((p, "copy"))
        elif split <= hosted + costs.handoff_s:
            link, host = link + costs.fill_s, host + costs.host_bottom_s
            placed.append((p, "split"))
        else:
            host = hosted
            placed.append((p, "host"))
    loads_done = link
    # Fills, in plan order, while the link would finish them before the host's last result.
    out = []
    for p, place in placed:
        fill = False
        if place == "host" and p.outcome == "miss" and p.slot is not None and link + costs.fill_s <= host + costs.handoff_s:
            link += costs.fill_s
            fill = True
        out.append(Placement(p, place, fill))
    return out, loads_done, host


def link_share(costs: LoadCosts, part: str = "whole") -> float:
    """The share of a layer's loads the link should carry so that it and the host finish together:
    its rate over both rates, host time / (copy time + host time). A hybrid run prefetches only that
    share of what is named. A free copy (a CPU run with no emulated link) takes everything."""
    copy, host = costs.copy_s(part), costs.host_s(part) + 2 * costs.handoff_s
    return host / (copy + host) if copy > 0 else 1.0


def prefetch_share(mode: Hybrid, costs: LoadCosts | None) -> float:
    """The share of a layer's named loads to prefetch: all of them copy-only, none host-only (the
    link carries only fills), the link's share (`link_share`, `costs` at one token) in `auto`."""
    if mode == "off":
        return 1.0
    if mode == "host-only":
        return 0.0
    if costs is None:
        raise ValueError("hybrid auto needs LoadCosts to share its prefetches")
    return link_share(costs)


def settle_fills(plan: LayerPlan, cache: LayerCache, placed: Sequence[Placement]) -> tuple[LayerPlan, LayerCache]:
    """The plan and cache after the step's placements: a host-computed miss the planner admitted
    but that is not filled is not admitted after all. Its slot goes back to the expert it evicted
    (nothing has overwritten that top), or stays free; the plan counts neither."""
    dropped = {pl.plan.slot: pl.plan.expert for pl in placed if pl.place == "host" and pl.plan.admitted and not pl.fill}
    if not dropped:
        return plan, cache
    slots_S = list(cache.slots_S)
    victims = {slot: e for e, slot in plan.evicted}
    for slot in dropped:
        slots_S[slot] = victims.get(slot, FREE)
    experts = tuple(p._replace(slot=None) if p.slot in dropped and p.outcome == "miss" else p for p in plan.experts)
    evicted = tuple((e, slot) for e, slot in plan.evicted if slot not in dropped)
    return plan._replace(experts=experts, evicted=evicted), LayerCache(tuple(slots_S))
