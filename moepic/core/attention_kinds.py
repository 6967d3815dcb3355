"""Attention kinds: each kind's forward, its KV cache layout and its size, in one registry that
the forward pass (core/model.py), the footprint (core/footprint.py) and through it the latency
model and `inspect` consult. Pure. A new kind is a module with these three things and a line here.

    kind       forward                             cache per layer (two buffers)            weights
    gqa        core/attention.py attention         keys, values [Hkv, S, d]                 q, k, v, o (biases, q/k norms)
    gqa_sinks  core/attention.py sink_attention    keys, values [Hkv, 1 + S, d]: position   the same, and a sink per head
                                                   0 the sinks' zero key and value
    mla        core/mla.py mla_attention           latent [1, S, L], rotary key [1, S, r]   q (or q_a, q_b), kv_a, kv_b, o
"""

from __future__ import annotations

from collections.abc import Callable

import attrs

from moepic.core.attention import attention, gqa_cache_shapes, gqa_params, sink_attention, sink_cache_shapes
from moepic.core.mla import mla_attention, mla_cache_shapes, mla_params
from moepic.core.spec import ModelSpec


@attrs.frozen
class AttentionKind:
    name: str
    attend: Callable  # (x_TD, weights, spec, cos, sin, cache buffer 1, cache buffer 2, start, layer) → [T, D]
    cache_shapes: Callable[[ModelSpec, int], tuple[tuple[int, ...], tuple[int, ...]]]  # for S positions
    params: Callable[[ModelSpec], int]  # one layer's weights
    reserved: int = 0  # leading cache positions no token takes (zeroed when allocated)
    # Whether a layer that sees a bounded span keeps only that span, as a ring (core/kv_cache_layer.py).
    rings: bool = False

    def cache_numbers(self, spec: ModelSpec) -> int:
        """Numbers one token adds to one layer's cache."""
        return sum(_product(one) - _product(none) for one, none in zip(self.cache_shapes(spec, 1), self.cache_shapes(spec, 0)))


def _product(shape: tuple[int, ...]) -> int:
    out = 1
    for n in shape:
        out *= n
    return out


KINDS = {
    "gqa": AttentionKind("gqa", attention, gqa_cache_shapes, gqa_params, rings=True),
    "gqa_sinks": AttentionKind("gqa_sinks", sink_attention, sink_cache_shapes, gqa_params, reserved=1, rings=True),
    "mla": AttentionKind("mla", mla_attention, mla_cache_shapes, mla_params),
}


def attention_kind(spec: ModelSpec) -> AttentionKind:
    if spec.mla is not None:
        return KINDS["mla"]
    return KINDS["gqa_sinks" if spec.attention_sinks else "gqa"]
