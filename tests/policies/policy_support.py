"""Builders shared by the cache-policy tests: layouts, hand-made and skewed traces."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from moepic.cache.layout import CacheLayout, LayerCacheLayout
from moepic.tracing import RoutingTrace


def whole_expert_layout(layer: int, num_experts: int, slots: int, *, ffn_size: int = 4, neuron_bytes: int = 3) -> LayerCacheLayout:
    """θ = 1: each slot holds a whole expert."""
    return LayerCacheLayout(
        layer=layer, num_experts=num_experts, ffn_size=ffn_size, block=1, top_neurons=ffn_size, slots=slots, neuron_bytes=neuron_bytes
    )


def whole_expert_cache(trace: RoutingTrace, slots: int) -> CacheLayout:
    return CacheLayout(
        layers=tuple(whole_expert_layout(layer, trace.num_experts, slots) for layer in trace.moe_layers),
        staging_experts=trace.top_k,
        dtype_bytes=1,
    )


def one_layer_trace(ids_NK, num_experts: int, *, layer: int = 0, sequence_N=None) -> RoutingTrace:
    """A one-MoE-layer trace from per-token expert ids."""
    ids = np.asarray(ids_NK, dtype=np.int64)
    N, K = ids.shape
    return RoutingTrace(
        model="hand-made",
        moe_layers=(layer,),
        num_experts=num_experts,
        top_k=K,
        expert_ids_NLK=ids[:, None, :],
        weights_NLK=np.full((N, 1, K), 1 / K, dtype=np.float32),
        sequence_N=np.zeros(N, np.int32) if sequence_N is None else np.asarray(sequence_N, np.int32),
        position_N=np.arange(N, dtype=np.int32),
        prefill_N=np.zeros(N, bool),
    )


@st.composite
def skewed_traces(draw, max_tokens: int = 48):
    """Longer traces than tests_support.traces(), with popular and rare experts, as real routing has."""
    N, L, K = draw(st.integers(0, max_tokens)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    E = draw(st.integers(K, 8))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    popularity_LE = rng.dirichlet(np.full(E, draw(st.sampled_from([0.3, 1.0, 5.0]))), size=L) + 1e-9
    popularity_LE /= popularity_LE.sum(-1, keepdims=True)
    ids = np.zeros((N, L, K), np.int64)
    for n in range(N):
        for l in range(L):
            ids[n, l] = rng.choice(E, K, replace=False, p=popularity_LE[l])
    return RoutingTrace(
        model="skewed",
        moe_layers=tuple(range(L)),
        num_experts=E,
        top_k=K,
        expert_ids_NLK=ids,
        weights_NLK=np.full((N, L, K), 1 / K, dtype=np.float32),
        sequence_N=np.sort(rng.integers(0, 3, N)).astype(np.int32),
        position_N=np.arange(N, dtype=np.int32),
        prefill_N=np.zeros(N, bool),
    )
