"""What the offloading engine counts, and the report it makes of it. Side effects: none (plain counters).

Cache counters come from the pure planner (`LayerCacheStats`), split into prefill (multi-token)
and decode steps; fully resident layers are counted directly as hits. Prediction counters compare
what was prefetched for a layer with what it then routed. Bytes are split by how they moved.
Hybrid runs also count the loads computed on the host (whole experts and bottoms, per layer),
the weight bytes the host read for them, its busy time, and the tops filled into the cache.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from moepic.cache.layout import CacheLayout, LayerCacheLayout
from moepic.cache.placement import Placement
from moepic.cache.planner import LayerPlan
from moepic.cache.stats import HostCounts, LayerCacheStats, PredictionCounts, summary


@attrs.define
class EngineCounters:
    layout: CacheLayout
    decode: dict[int, LayerCacheStats] = attrs.field(init=False)
    prefill: dict[int, LayerCacheStats] = attrs.field(init=False)
    # decode? → layer → [steps, tokens, activations] of fully resident layers (all hits).
    resident: dict[bool, dict[int, list[int]]] = attrs.field(init=False)
    predictions: dict[int, PredictionCounts] = attrs.field(init=False)
    demand_bytes: int = 0  # host → device, waited for at once
    prefetch_bytes: int = 0  # host → device, issued ahead
    wasted_prefetch_bytes: int = 0  # prefetched, then not routed
    cancelled_prefetches: int = 0  # wrong prefetches withdrawn before they started
    kept_prefetches: int = 0  # wrong prefetches the policy admitted to the cache anyway
    kept_prefetch_bytes: int = 0
    device_copy_bytes: int = 0  # device → device (reassembly, admission)
    miss_fill_bytes: int = 0  # host → device: admitted tops of misses served from their low-bit copy (background)
    demand_copies: int = 0  # loads copied on demand (not prefetched, not computed on the host)
    predictor_s: float = 0.0
    host: dict[int, HostCounts] = attrs.field(init=False)  # layer → what the host computed (the simulator's counts)
    host_s: dict[bool, dict[int, float]] = attrs.field(init=False)  # decode? → layer → host busy seconds

    def __attrs_post_init__(self) -> None:
        layers = [l.layer for l in self.layout.layers]
        self.decode = {l: LayerCacheStats(layer=l) for l in layers}
        self.prefill = dict(self.decode)
        self.resident = {decode: {l: [0, 0, 0] for l in layers} for decode in (False, True)}
        self.predictions = {l: PredictionCounts() for l in layers}
        self.host = {l: HostCounts() for l in layers}
        self.host_s = {decode: dict.fromkeys(layers, 0.0) for decode in (False, True)}

    # `decode`: a decode step (one token of each of one or more sequences), not a prompt's prefill.
    def add_plan(self, plan: LayerPlan, tokens: int, decode: bool) -> None:
        stats = self.decode if decode else self.prefill
        stats[plan.layer] = stats[plan.layer].add(plan, tokens)

    def add_host(self, layout: LayerCacheLayout, placed: Iterable[Placement]) -> None:
        """A step's loads placed on the host (whole, bottom, or a split miss's bottom)."""
        self.host[layout.layer].add(placed, layout)

    @property
    def fill_bytes(self) -> int:
        """host → device: tops of host-computed misses the cache admitted, copied in the background."""
        return sum(h.fill_bytes for h in self.host.values())

    @property
    def host_bytes(self) -> int:
        """Expert weight bytes computed on the host instead of copied."""
        return sum(h.bytes for h in self.host.values())

    def add_host_s(self, layer: int, decode: bool, seconds: float) -> None:
        self.host_s[decode][layer] += seconds

    def add_resident_step(self, layer: int, tokens: int, activations: int, decode: bool) -> None:
        counts = self.resident[decode][layer]
        counts[0], counts[1], counts[2] = counts[0] + 1, counts[1] + tokens, counts[2] + activations

    def add_prediction(self, layer: int, predicted: Iterable[int], routed: Iterable[int]) -> None:
        self.predictions[layer].add(set(predicted), set(routed))

    def cache_stats(self, decode: bool) -> dict[int, LayerCacheStats]:
        stats = self.decode if decode else self.prefill
        out = {}
        for layer, s in stats.items():
            steps, tokens, activations = self.resident[decode][layer]
            out[layer] = s.plus(LayerCacheStats(layer=layer, steps=steps, tokens=tokens, activations=activations, hits=activations))
        return out

    def report(
        self, *, exposed_copy_s: float, decode_exposed_copy_s: float, copy_s: float, preload_bytes: int
    ) -> dict[str, object]:
        layers = self.layout.layers
        decode = tuple(self.cache_stats(decode=True).values())
        everything = tuple(a.plus(b) for a, b in zip(self.cache_stats(decode=False).values(), decode))
        decode_summary = summary(decode, decode[0].tokens)  # every MoE layer sees every token
        predicted = [c for c in self.predictions.values() if c.steps]
        correct, routed, named = (sum(getattr(c, f) for c in predicted) for f in ("correct", "routed", "predicted"))
        return summary(everything, everything[0].tokens) | {
            "decode_expert_hit_rate": decode_summary["expert_hit_rate"],
            "decode_bytes_loaded_per_token": decode_summary["bytes_loaded_per_token"],
            "exposed_copy_s": exposed_copy_s,
            "copy_s": copy_s,  # link busy time; copy_s − exposed_copy_s of it overlapped compute
            "overlapped_copy_s": max(0.0, copy_s - exposed_copy_s),
            "decode_exposed_copy_s_per_token": decode_exposed_copy_s / decode[0].tokens if decode[0].tokens else 0.0,
            "prediction_recall": correct / routed if routed else None,
            "prediction_precision": correct / named if named else None,
            "layer_prediction_recall": [self.predictions[l.layer].recall for l in layers],
            "layer_prediction_precision": [self.predictions[l.layer].precision for l in layers],
            "predictor_s": self.predictor_s,
            "demand_bytes": self.demand_bytes,
            "prefetch_bytes": self.prefetch_bytes,
            "wasted_prefetch_bytes": self.wasted_prefetch_bytes,
            "cancelled_prefetches": self.cancelled_prefetches,
            "kept_prefetches": self.kept_prefetches,
            "kept_prefetch_bytes": self.kept_prefetch_bytes,
            "device_copy_bytes": self.device_copy_bytes,
            "demand_copies": self.demand_copies,
            "host_experts": sum(h.experts for h in self.host.values()),
            "host_bottoms": sum(h.bottoms for h in self.host.values()),
            "host_splits": sum(h.splits for h in self.host.values()),
            "host_bytes": self.host_bytes,
            "fill_bytes": self.fill_bytes,
            "miss_fill_bytes": self.miss_fill_bytes,
            "host_s": sum(host_s[l.layer] for host_s in self.host_s.values() for l in layers),
            "decode_host_s_per_token": sum(self.host_s[True].values()) / decode[0].tokens if decode[0].tokens else 0.0,
            "layer_host_experts": [self.host[l.layer].experts for l in layers],
            "layer_host_bottoms": [self.host[l.layer].bottoms for l in layers],
            "layer_host_splits": [self.host[l.layer].splits for l in layers],
            "layer_host_s": [self.host_s[False][l.layer] + self.host_s[True][l.layer] for l in layers],
            "preload_bytes": preload_bytes,
            "cache_bytes": self.layout.cache_bytes,
            "staging_bytes": self.layout.staging_bytes,
            "theta": [l.theta for l in layers],
            "slots": [l.slots for l in layers],
        }
