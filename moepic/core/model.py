"""The decoder forward pass: tokens + KV cache → logits + advanced KV cache. Pure core.

    tokens ─embed─▶ [ norm ─attention(KV)─▶ + ─norm─▶ dense MLP | MoE block ─▶ + ] × L ─norm─▶ lm_head

`forward` is a function of (model, tokens, cache, expert source); the only state it touches is the
donated cache buffers (see core/attention.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import attrs
import torch
import torch.nn.functional as F

from moepic.core import rows
from moepic.core.attention_kinds import attention_kind
from moepic.core.ffn import swiglu
from moepic.core.kv_cache_layer import cache_positions
from moepic.core.moe import ExpertSource, ResidentExperts, RoutingTap, moe_block
from moepic.core.norms import block_norm
from moepic.core.rope import rope_cos_sin, rope_inv_freq, rope_scaling_until
from moepic.core.spec import ModelSpec
from moepic.core.weights import ModelWeights, MoEWeights


@attrs.frozen
class Model:
    """A spec, its weights and the rotary frequencies derived from them."""

    spec: ModelSpec
    weights: ModelWeights
    inv_freq_d: torch.Tensor
    rope_scaling: float

    @classmethod
    def build(cls, spec: ModelSpec, weights: ModelWeights) -> Model:
        inv_freq, scaling = rope_inv_freq(
            spec.rope, spec.head_dim, max_position_embeddings=spec.max_position_embeddings
        )
        return cls(spec, weights, inv_freq.to(weights.embed_VD.device), scaling)

    @property
    def dtype(self) -> torch.dtype:
        return self.weights.embed_VD.dtype

    @property
    def device(self) -> torch.device:
        return self.weights.embed_VD.device


@attrs.frozen
class KVCache:
    """Per-layer cache buffers, two per layer, and how many positions are filled. Their layout is
    the attention kind's (core/attention_kinds.py): grouped-query attention keeps keys and values
    [Hkv, S, d] (S: every position, or a layer's span as a ring: core/kv_cache_layer.py); latent
    attention keeps its latent [1, S, L] in `keys` and its shared rotary key [1, S, r] in `values`."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    capacity: int  # the longest sequence it holds
    length: int = 0

    @classmethod
    def allocate(cls, model: Model, max_length: int) -> KVCache:
        """Buffers for sequences of up to `max_length` tokens: a layer that sees a bounded span
        (window, chunk) gets only that many slots where its attention kind keeps rings."""
        spec = model.spec
        kind = attention_kind(spec)
        keys, values = [], []
        for layer in range(spec.num_layers):
            positions = cache_positions(spec, layer, max_length) if kind.rings else max_length
            for buffers, shape in zip((keys, values), kind.cache_shapes(spec, positions)):
                buffer = torch.empty(shape, dtype=model.dtype, device=model.device)
                buffer[:, : kind.reserved].zero_()
                buffers.append(buffer)
        return cls(keys=tuple(keys), values=tuple(values), capacity=max_length)


def forward(
    model: Model,
    tokens_T: torch.Tensor,
    cache: KVCache,
    experts: ExpertSource | None = None,
    *,
    logits_for: Literal["all", "last"] = "all",
    tap: RoutingTap | None = None,
) -> tuple[torch.Tensor, KVCache]:
    """Logits for the new tokens (all of them, or only the last) and the cache advanced past them.

    `tap`, when given, observes each MoE layer's routing and each layer's output (core/moe.py).
    """
    spec, w = model.spec, model.weights
    experts = ResidentExperts(w) if experts is None else experts
    T, start = tokens_T.shape[0], cache.length
    if start + T > cache.capacity:
        raise ValueError(f"KV cache holds {cache.capacity} positions; {start} used + {T} new does not fit")
    positions_T = torch.arange(start, start + T, device=tokens_T.device)
    scaling = rope_scaling_until(spec.rope, start + T, model.rope_scaling)
    cos_Td, sin_Td = rope_cos_sin(model.inv_freq_d, scaling, positions_T, model.dtype)

    attend = attention_kind(spec).attend

    def attention(layer: int, h_TD: torch.Tensor) -> torch.Tensor:
        lw = w.layers[layer]
        return attend(h_TD, lw.attention, spec, cos_Td, sin_Td, cache.keys[layer], cache.values[layer], start, layer)

    x_TD = _layers(model, _embed(model, tokens_T), attention, experts, tap)
    if logits_for == "last":
        x_TD = x_TD[-1:]
    return _logits(model, x_TD), attrs.evolve(cache, length=start + T)


def decode_step(
    model: Model, tokens_B: torch.Tensor, caches: Sequence[KVCache], experts: ExpertSource | None = None
) -> tuple[torch.Tensor, list[KVCache]]:
    """One new token for each of B sequences (token b continues the sequence in `caches[b]`, which
    may be of any length): logits [B, V] and the caches advanced by one. Every token is computed
    exactly as `forward` computes it for its sequence alone, bit for bit: attention per sequence,
    and every matmul over the batch's tokens row by row (core/rows.py), so that a batch never
    changes anyone's output. The MoE layers route all B tokens at once: the expert source sees the
    union of their experts, once per layer."""
    spec, w = model.spec, model.weights
    experts = ResidentExperts(w) if experts is None else experts
    B = tokens_B.shape[0]
    if len(caches) != B:
        raise ValueError(f"{B} tokens for {len(caches)} sequences' caches")
    for b, cache in enumerate(caches):
        if cache.length + 1 > cache.capacity:
            raise ValueError(f"sequence {b}'s KV cache holds {cache.capacity} positions, all used")
    attend = attention_kind(spec).attend
    rotary = []  # each sequence's (cos, sin) at its own position, as `forward` computes them
    for cache in caches:
        scaling = rope_scaling_until(spec.rope, cache.length + 1, model.rope_scaling)
        position_T = torch.tensor([cache.length], device=tokens_B.device)
        rotary.append(rope_cos_sin(model.inv_freq_d, scaling, position_T, model.dtype))

    def attention(layer: int, h_BD: torch.Tensor) -> torch.Tensor:
        lw = w.layers[layer]
        return torch.cat([
            attend(h_1D, lw.attention, spec, *rotary[b], c.keys[layer], c.values[layer], c.length, layer)
            for b, (h_1D, c) in enumerate(zip(rows.each(h_BD), caches, strict=True))
        ])

    x_BD = _layers(model, _embed(model, tokens_B), attention, experts, None, rowwise=True)
    return _logits(model, x_BD, rowwise=True), [attrs.evolve(c, length=c.length + 1) for c in caches]


def _embed(model: Model, tokens_T: torch.Tensor) -> torch.Tensor:
    x_TD = F.embedding(tokens_T, model.weights.embed_VD)
    return x_TD * model.spec.embedding_multiplier if model.spec.embedding_multiplier != 1.0 else x_TD


def _layers(
    model: Model, x_TD: torch.Tensor, attention, experts: ExpertSource, tap: RoutingTap | None, *, rowwise: bool = False
) -> torch.Tensor:
    """The decoder layers over the residual stream; `attention(layer, h_TD)` attends with the
    caches; `rowwise`: the tokens are of different sequences (core/rows.py)."""
    spec = model.spec
    for layer, lw in enumerate(model.weights.layers):
        norms = ((lw.input_norm_D, lw.input_norm_bias_D), (lw.post_attention_norm_D, lw.post_attention_norm_bias_D))
        h_TD = _sublayer_input(x_TD, norms[0], spec, rowwise)
        x_TD = _sublayer_output(x_TD, attention(layer, h_TD), norms[0], spec, rowwise)
        h_TD = _sublayer_input(x_TD, norms[1], spec, rowwise)
        if isinstance(lw.ffn, MoEWeights):
            out_TD = moe_block(h_TD, lw.ffn, spec.moe, layer, experts, tap, rowwise=rowwise)
        else:
            out_TD = swiglu(h_TD, lw.ffn, rowwise=rowwise)
        x_TD = _sublayer_output(x_TD, out_TD, norms[1], spec, rowwise)
        experts.after_layer(layer, x_TD)
        if tap is not None:
            tap.layer_output(layer, x_TD)
    return x_TD


def _logits(model: Model, x_TD: torch.Tensor, *, rowwise: bool = False) -> torch.Tensor:
    spec, w = model.spec, model.weights
    h_TD = rows.per_row(lambda x: block_norm(x, w.final_norm_D, w.final_norm_bias_D, spec.norm, spec.norm_eps), x_TD,
                        rowwise=rowwise)
    logits_TV = rows.linear(h_TD, w.lm_head_VD, w.lm_head_bias_V, rowwise=rowwise)
    return logits_TV / spec.logits_scaling if spec.logits_scaling != 1.0 else logits_TV


# A sublayer (attention or FFN) with its norm (weight, bias): x + f(norm(x)) with pre-norm,
# x + norm(f(x)) with post-norm (spec.norm_placement).
# `rowwise`: the tokens are of different sequences, each normalised alone (core/rows.py).
def _sublayer_input(x_TD: torch.Tensor, norm: tuple, spec: ModelSpec, rowwise: bool = False) -> torch.Tensor:
    return x_TD if spec.norm_placement == "post" else _norm(x_TD, norm, spec, rowwise)


def _sublayer_output(x_TD: torch.Tensor, out_TD: torch.Tensor, norm: tuple, spec: ModelSpec, rowwise: bool = False) -> torch.Tensor:
    return _join(x_TD, _norm(out_TD, norm, spec, rowwise) if spec.norm_placement == "post" else out_TD, spec)


def _norm(x_TD: torch.Tensor, norm: tuple, spec: ModelSpec, rowwise: bool) -> torch.Tensor:
    return rows.per_row(lambda x: block_norm(x, *norm, spec.norm, spec.norm_eps), x_TD, rowwise=rowwise)


def _join(residual_TD: torch.Tensor, out_TD: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """A sublayer's output added to the residual stream (scaled first where the model says)."""
    return residual_TD + (out_TD * spec.residual_multiplier if spec.residual_multiplier != 1.0 else out_TD)
