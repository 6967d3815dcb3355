"""The decoder forward pass: tokens + KV cache → logits + advanced KV cache. Pure core.

    tokens ─embed─▶ [ norm ─attention(KV)─▶ + ─norm─▶ dense MLP | MoE block ─▶ + ] × L ─norm─▶ lm_head

`forward` is a function of (model, tokens, cache, expert source); the only state it touches is the
donated cache buffers (see core/attention.py).
"""

from __future__ import annotations

from typing import Literal

import attrs
import torch
import torch.nn.functional as F

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
    x_TD = F.embedding(tokens_T, w.embed_VD)
    if spec.embedding_multiplier != 1.0:
        x_TD = x_TD * spec.embedding_multiplier
    for layer, lw in enumerate(w.layers):
        norms = ((lw.input_norm_D, lw.input_norm_bias_D), (lw.post_attention_norm_D, lw.post_attention_norm_bias_D))
        h_TD = _sublayer_input(x_TD, norms[0], spec)
        out_TD = attend(h_TD, lw.attention, spec, cos_Td, sin_Td, cache.keys[layer], cache.values[layer], start, layer)
        x_TD = _sublayer_output(x_TD, out_TD, norms[0], spec)
        h_TD = _sublayer_input(x_TD, norms[1], spec)
        if isinstance(lw.ffn, MoEWeights):
            out_TD = moe_block(h_TD, lw.ffn, spec.moe, layer, experts, tap)
        else:
            out_TD = swiglu(h_TD, lw.ffn)
        x_TD = _sublayer_output(x_TD, out_TD, norms[1], spec)
        experts.after_layer(layer, x_TD)
        if tap is not None:
            tap.layer_output(layer, x_TD)

    if logits_for == "last":
        x_TD = x_TD[-1:]
    logits_TV = F.linear(block_norm(x_TD, w.final_norm_D, w.final_norm_bias_D, spec.norm, spec.norm_eps), w.lm_head_VD,
                         w.lm_head_bias_V)
    if spec.logits_scaling != 1.0:
        logits_TV = logits_TV / spec.logits_scaling
    return logits_TV, attrs.evolve(cache, length=start + T)


# A sublayer (attention or FFN) with its norm (weight, bias): x + f(norm(x)) with pre-norm,
# x + norm(f(x)) with post-norm (spec.norm_placement).
def _sublayer_input(x_TD: torch.Tensor, norm: tuple, spec: ModelSpec) -> torch.Tensor:
    return x_TD if spec.norm_placement == "post" else block_norm(x_TD, *norm, spec.norm, spec.norm_eps)


def _sublayer_output(x_TD: torch.Tensor, out_TD: torch.Tensor, norm: tuple, spec: ModelSpec) -> torch.Tensor:
    return _join(x_TD, block_norm(out_TD, *norm, spec.norm, spec.norm_eps) if spec.norm_placement == "post" else out_TD, spec)


def _join(residual_TD: torch.Tensor, out_TD: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """A sublayer's output added to the residual stream (scaled first where the model says)."""
    return residual_TD + (out_TD * spec.residual_multiplier if spec.residual_multiplier != 1.0 else out_TD)
