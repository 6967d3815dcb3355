"""Replay a routing trace through the residency planner: hit rates and bytes without running a model. Pure.

Each token is one step of every MoE layer (decode-style), or the trace is cut into the engine's
steps (a prompt one); the cache and policy state carry over from one sequence to the next as in a
server; a new sequence is a new request (LCP resets μ).
The engine plans with the same `residency_step`, so its hit rate on the same routing is the same.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from moepic.cache.layout import CacheLayout, LayerCacheLayout
from moepic.cache.planner import LayerPlan, initial_residency, plan_layer_step
from moepic.cache.stats import LayerCacheStats
from moepic.policies.base import CachePolicy, priority_series
from moepic.sim.steps import TraceSteps, trace_steps
from moepic.tracing import RoutingTrace


def replay_layer(trace: RoutingTrace, column: int, layout: LayerCacheLayout, policy: CachePolicy,
                 steps: TraceSteps | None = None) -> Iterator[LayerPlan]:
    """The plan of every step of MoE layer `column` (the trace's order), with `layout`'s cache: each
    token a step, or, with `steps`, the trace cut as they say (sim/steps.py `trace_steps`: a prompt
    one step, as the engine routes it)."""
    steps = trace_steps(trace, token_by_token=True) if steps is None else steps
    counts_SE = steps.counts_SE(trace, column)
    # The policy's priorities depend on the routing alone, so they are computed for all steps at
    # once; the planner then steps the cache with them, as `residency_step` would.
    priority_SE = priority_series(policy, layout.layer, trace.num_experts, counts_SE, steps.tokens_S, steps.new_request_S)
    cache = initial_residency(policy, layout).cache  # init: a policy checks it fits the layer
    for counts_E, priority_E in zip(counts_SE, priority_SE):
        plan, cache = plan_layer_step(layout, cache, np.flatnonzero(counts_E).tolist(), priority_E)
        yield plan


def replay_trace(trace: RoutingTrace, layout: CacheLayout, policy: CachePolicy,
                 steps: TraceSteps | None = None) -> tuple[LayerCacheStats, ...]:
    """Per-MoE-layer counters of `policy` on `trace`, with the caches that `layout` describes (each
    token a step, or the trace cut into `steps`)."""
    if len(trace.moe_layers) != len(layout.layers):
        raise ValueError(f"the trace has {len(trace.moe_layers)} MoE layers, the layout {len(layout.layers)}")
    steps = trace_steps(trace, token_by_token=True) if steps is None else steps
    out = []
    for column, layer_layout in enumerate(layout.layers):
        stats = LayerCacheStats(layer=layer_layout.layer)
        for plan, tokens in zip(replay_layer(trace, column, layer_layout, policy, steps), steps.tokens_S.tolist()):
            stats = stats.add(plan, tokens)
        out.append(stats)
    return tuple(out)
