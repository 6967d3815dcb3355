"""Cache counters per layer, folded from layer plans, and prediction counters. Pure.

Activations count routed experts per layer step (an expert chosen by several tokens of one
prefill step is one activation: it is loaded once). So hits + partial hits + misses = activations,
and the hit rate of a decode-only run is the per-token hit rate.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

import attrs

from moepic.cache.layout import LayerCacheLayout
from moepic.cache.placement import Placement
from moepic.cache.planner import LayerPlan


@attrs.frozen(kw_only=True)
class LayerCacheStats:
    layer: int
    steps: int = 0
    tokens: int = 0
    activations: int = 0
    hits: int = 0  # whole expert cached (θ = 1): nothing loaded
    partial_hits: int = 0  # top cached: only the bottom loaded
    misses: int = 0
    admissions: int = 0
    evictions: int = 0
    bytes_loaded: int = 0  # host → device expert bytes

    def add(self, plan: LayerPlan, tokens: int) -> LayerCacheStats:
        # One pass and one constructor call: the engine runs this on every layer step.
        outcomes = {"hit": 0, "partial": 0, "miss": 0}
        admissions = 0
        for p in plan.experts:
            outcomes[p.outcome] += 1
            admissions += p.admitted
        return LayerCacheStats(
            layer=self.layer,
            steps=self.steps + 1,
            tokens=self.tokens + tokens,
            activations=self.activations + len(plan.experts),
            hits=self.hits + outcomes["hit"],
            partial_hits=self.partial_hits + outcomes["partial"],
            misses=self.misses + outcomes["miss"],
            admissions=self.admissions + admissions,
            evictions=self.evictions + len(plan.evicted),
            bytes_loaded=self.bytes_loaded + plan.bytes_loaded,
        )

    def plus(self, other: LayerCacheStats) -> LayerCacheStats:
        """Counters of both (this one's layer)."""
        counters = (f.name for f in attrs.fields(LayerCacheStats) if f.name != "layer")
        return attrs.evolve(self, **{name: getattr(self, name) + getattr(other, name) for name in counters})

    @property
    def hit_rate(self) -> float:
        """Activations whose cached part was resident (hits and partial hits)."""
        return (self.hits + self.partial_hits) / self.activations if self.activations else 0.0


def total(stats: Iterable[LayerCacheStats]) -> LayerCacheStats:
    """All layers' counters summed (layer = -1)."""
    out = LayerCacheStats(layer=-1)
    for s in stats:
        out = out.plus(s)
    return out


def summary(stats: Iterable[LayerCacheStats], tokens: int) -> dict[str, object]:
    """The numbers a run report shows: overall and per-layer hit rates, bytes, bytes per token."""
    stats = tuple(stats)
    all_layers = total(stats)
    return {
        "expert_hit_rate": all_layers.hit_rate,
        "activations": all_layers.activations,
        "hits": all_layers.hits,
        "partial_hits": all_layers.partial_hits,
        "misses": all_layers.misses,
        "evictions": all_layers.evictions,
        "bytes_loaded": all_layers.bytes_loaded,
        "bytes_loaded_per_token": all_layers.bytes_loaded / tokens if tokens else 0.0,
        "layer_hit_rates": [s.hit_rate for s in stats],
    }


@attrs.define
class PredictionCounts:
    """A layer's prediction counters, the engine's and the simulator's alike (plain, mutable)."""

    steps: int = 0
    predicted: int = 0  # experts prefetched for the layer
    routed: int = 0  # experts the layer then routed to
    correct: int = 0  # both

    def add(self, named: Collection[int], routed: Collection[int]) -> None:
        """One step: `named` were predicted for the layer, it routed to `routed` (each distinct)."""
        self.steps += 1
        self.predicted += len(named)
        self.routed += len(routed)
        self.correct += sum(1 for e in routed if e in named)

    @property
    def recall(self) -> float | None:
        return self.correct / self.routed if self.routed else None

    @property
    def precision(self) -> float | None:
        return self.correct / self.predicted if self.predicted else None


@attrs.define
class HostCounts:
    """A layer's hybrid counters (moepic/cache/placement.py), the engine's and the simulator's alike."""

    experts: int = 0  # routed experts computed whole on the host
    bottoms: int = 0  # partial hits whose bottom the host computed
    splits: int = 0  # misses whose top was copied into their slot while the host computed their bottom
    bytes: int = 0  # expert weight bytes the host computed with (not copied)
    fills: int = 0  # host-computed misses whose top was then copied into their slot
    fill_bytes: int = 0
    seconds: float = 0.0  # the host's busy time

    def add(self, placements: Iterable[Placement], layout: LayerCacheLayout, seconds: float = 0.0) -> None:
        for p in placements:
            if p.place == "copy":
                continue
            if p.place == "split":
                self.splits += 1
                self.bytes += layout.bottom_bytes
                continue
            whole = p.plan.load == "whole"
            self.experts += whole
            self.bottoms += not whole
            self.bytes += layout.expert_bytes if whole else layout.bottom_bytes
            if p.fill:
                self.fills += 1
                self.fill_bytes += layout.top_bytes
        self.seconds += seconds
