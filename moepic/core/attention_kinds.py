"""Attention kinds: each kind's forward, its KV cache layout and its size, in one registry that
the forward pass (core/model.py), the footprint (core/footprint.py) and through it the latency
model and `inspect` consult. Pure. A new kind is a module with these three things and a line here.

    kind  forward                        cache per layer (two buffers)            weights
    gqa   core/attention.py attention    keys, values [Hkv, S, d]                 q, k, v, o (biases, q/k norms)
    mla   core/mla.py mla_attention      latent [1, S, L], rotary key [1, S, r]   q (or q_a, q_b), kv_a, kv_b, o
"""

from __future__ import annotations

from collections.abc import Callable

import attrs

from moepic.core.attention import attention, gqa_cache_shapes, gqa_params
from moepic.core.mla import mla_attention, mla_cache_shapes, mla_params
from moepic.core.spec import ModelSpec


@attrs.frozen
class AttentionKind:
    name: str
    attend: Callable  # (x_TD, weights, spec, cos, sin, cache buffer 1, cache buffer 2, start, window) → [T, D]
    cache_shapes: Callable[[ModelSpec, int], tuple[tuple[int, ...], tuple[int, ...]]]  # for S positions
    params: Callable[[ModelSpec], int]  # one layer's weights

    def cache_numbers(self, spec: ModelSpec) -> int:
        """Numbers one token adds to one layer's cache."""
        return sum(_product(shape) for shape in self.cache_shapes(spec, 1))


def _product(shape: tuple[int, ...]) -> int:
    out = 1
    for n in shape:
        out *= n
    return out


KINDS = {
    "gqa": AttentionKind("gqa", attention, gqa_cache_shapes, gqa_params),
    "mla": AttentionKind("mla", mla_attention, mla_cache_shapes, mla_params),
}


def attention_kind(spec: ModelSpec) -> AttentionKind:
    return KINDS["mla" if spec.mla is not None else "gqa"]
