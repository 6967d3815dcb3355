"""Replay a routing trace through the residency planner: hit rates and bytes without running a model. Pure.

Each token is one step of every MoE layer (decode-style), and the cache and policy state carry
over from one sequence to the next as in a server; a new sequence is a new request (LCP resets μ).
The engine plans with the same `residency_step`, so its hit rate on the same routing is the same.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from moepic.cache.layout import CacheLayout, LayerCacheLayout
from moepic.cache.planner import LayerPlan, initial_residency, plan_layer_step
from moepic.cache.stats import LayerCacheStats
from moepic.policies.base import CachePolicy, priority_series
from moepic.tracing import RoutingTrace


def replay_layer(trace: RoutingTrace, column: int, layout: LayerCacheLayout, policy: CachePolicy) -> Iterator[LayerPlan]:
    """The plan of every token's step of MoE layer `column` (the trace's order), with `layout`'s cache."""
    counts_NE = np.zeros((trace.num_tokens, trace.num_experts), dtype=np.int64)
    np.add.at(counts_NE, (np.arange(trace.num_tokens)[:, None], trace.expert_ids_NLK[:, column]), 1)
    new_request_N = np.r_[True, trace.sequence_N[1:] != trace.sequence_N[:-1]]
    # The policy's priorities depend on the routing alone, so they are computed for all steps at
    # once; the planner then steps the cache with them, as `residency_step` would.
    priority_NE = priority_series(policy, layout.layer, trace.num_experts, counts_NE, np.ones(trace.num_tokens, np.int64), new_request_N)
    cache = initial_residency(policy, layout).cache
    for counts_E, priority_E in zip(counts_NE, priority_NE):
        plan, cache = plan_layer_step(layout, cache, np.flatnonzero(counts_E).tolist(), priority_E)
        yield plan


def replay_trace(trace: RoutingTrace, layout: CacheLayout, policy: CachePolicy) -> tuple[LayerCacheStats, ...]:
    """Per-MoE-layer counters of `policy` on `trace`, with the caches that `layout` describes."""
    if len(trace.moe_layers) != len(layout.layers):
        raise ValueError(f"the trace has {len(trace.moe_layers)} MoE layers, the layout {len(layout.layers)}")
    out = []
    for column, layer_layout in enumerate(layout.layers):
        stats = LayerCacheStats(layer=layer_layout.layer)
        for plan in replay_layer(trace, column, layer_layout, policy):
            stats = stats.add(plan, 1)
        out.append(stats)
    return tuple(out)
