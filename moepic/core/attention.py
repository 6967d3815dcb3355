"""Grouped-query self-attention over a KV cache that is passed in, with attention sinks where the
model has them. Pure apart from the cache write.

The cache buffers are preallocated and *donated*: the new keys/values are written into them in
place (like gpt-fast's index_copy; where, and what the queries then see, is
core/kv_cache_layer.py's: every position, or a windowed layer's ring). Callers treat the old cache
value as consumed; `KVCache` in core/model.py enforces this by only ever handing out the advanced
cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moepic.core.kv_cache_layer import allowed_positions, remember
from moepic.core.norms import rms_norm, rms_normalize
from moepic.core.rope import rotate
from moepic.core.spec import ModelSpec
from moepic.core.weights import AttentionWeights


def _project_qkv(x_TD: torch.Tensor, w: AttentionWeights, spec: ModelSpec):
    T = x_TD.shape[0]
    q = F.linear(x_TD, w.q_QD, w.q_bias)
    k = F.linear(x_TD, w.k_KD, w.k_bias)
    v = F.linear(x_TD, w.v_KD, w.v_bias)
    if spec.qk_norm == "full":  # OLMoE: one norm over all heads' width, before the head split
        q = rms_norm(q, w.q_norm, spec.norm_eps)
        k = rms_norm(k, w.k_norm, spec.norm_eps)
    if spec.clip_qkv is not None:
        q, k, v = (t.clamp(-spec.clip_qkv, spec.clip_qkv) for t in (q, k, v))
    q_THd = q.view(T, spec.num_heads, spec.head_dim)
    k_THd = k.view(T, spec.num_kv_heads, spec.head_dim)
    v_THd = v.view(T, spec.num_kv_heads, spec.head_dim)
    if spec.qk_norm == "per_head":  # Qwen3-MoE: a norm over each head's dims
        q_THd = rms_norm(q_THd, w.q_norm, spec.norm_eps)
        k_THd = rms_norm(k_THd, w.k_norm, spec.norm_eps)
    return q_THd.transpose(0, 1), k_THd.transpose(0, 1), v_THd.transpose(0, 1)


def _project_rotated(x_TD, w, spec, cos_Td, sin_Td, start: int, layer: int):
    """The new tokens' queries, keys and values [H, T, d], rotated where `layer` rotates."""
    T = x_TD.shape[0]
    q_HTd, k_HTd, v_HTd = _project_qkv(x_TD, w, spec)
    if spec.rotates(layer):
        q_HTd = rotate(q_HTd, cos_Td, sin_Td, spec.rope_layout)
        k_HTd = rotate(k_HTd, cos_Td, sin_Td, spec.rope_layout)
        if spec.qk_norm == "weightless_after_rope":
            q_HTd, k_HTd = rms_normalize(q_HTd, spec.norm_eps), rms_normalize(k_HTd, spec.norm_eps)
        elif spec.qk_norm == "per_head_after_rope":
            q_HTd, k_HTd = rms_norm(q_HTd, w.q_norm, spec.norm_eps), rms_norm(k_HTd, w.k_norm, spec.norm_eps)
    elif spec.nope_temperature is not None:  # Llama-4: longer contexts sharpen NoPE layers' attention
        attn_scale, floor_scale = spec.nope_temperature
        positions_T = torch.arange(start, start + T, device=x_TD.device, dtype=torch.float32)
        scale_T1 = torch.log1p(torch.floor((positions_T + 1.0) / floor_scale)) * attn_scale + 1.0
        q_HTd = (q_HTd * scale_T1[:, None]).to(q_HTd.dtype)
    return q_HTd, k_HTd, v_HTd


def _attend(q_HTd, keys_HSd, values_HSd, mask, spec: ModelSpec) -> torch.Tensor:
    """Attention output [T, H·d] of queries over keys/values; `mask`: None (causal if T > 1),
    boolean [T, S], or additive [H, T, S] (per head)."""
    H, T, d = q_HTd.shape
    group = H // spec.num_kv_heads
    if T == 1 and group > 1:
        # Decode: fold each KV head's group of query heads into the query-length axis, so one
        # [group, S] attention runs per KV head with no K/V expansion (the FlashDecoding layout).
        # Query head h reads KV head h // group, as in HF's repeat_kv. A per-key mask broadcasts
        # over the folded rows; a per-head one folds with them.
        if mask is not None and mask.dim() == 3:
            mask = mask.reshape(1, spec.num_kv_heads, group, mask.shape[-1])
        out_HTd = F.scaled_dot_product_attention(
            q_HTd.reshape(1, spec.num_kv_heads, group, d), keys_HSd.unsqueeze(0), values_HSd.unsqueeze(0),
            attn_mask=mask, scale=spec.attention_scale,
        ).reshape(H, 1, d)
    else:
        out_HTd = F.scaled_dot_product_attention(
            q_HTd.unsqueeze(0),
            keys_HSd.unsqueeze(0),
            values_HSd.unsqueeze(0),
            attn_mask=mask,
            is_causal=mask is None and T > 1,
            enable_gqa=group > 1,
            scale=spec.attention_scale,
        ).squeeze(0)
    return out_HTd.transpose(0, 1).reshape(T, -1)


def attention(
    x_TD: torch.Tensor,
    w: AttentionWeights,
    spec: ModelSpec,
    cos_Td: torch.Tensor,
    sin_Td: torch.Tensor,
    cache_k_HSd: torch.Tensor,
    cache_v_HSd: torch.Tensor,
    start: int,
    layer: int,
) -> torch.Tensor:
    """`layer`'s attention: its window, chunk and rotation as the spec says for it; its cache as
    core/kv_cache_layer.py keeps it (a ring where the layer sees a bounded span)."""
    q_HTd, k_HTd, v_HTd = _project_rotated(x_TD, w, spec, cos_Td, sin_Td, start, layer)
    keys_HSd, values_HSd, mask = remember(cache_k_HSd, cache_v_HSd, k_HTd, v_HTd, start, spec, layer)
    return F.linear(_attend(q_HTd, keys_HSd, values_HSd, mask, spec), w.o_DQ, w.o_bias)


def sink_attention(
    x_TD: torch.Tensor,
    w: AttentionWeights,
    spec: ModelSpec,
    cos_Td: torch.Tensor,
    sin_Td: torch.Tensor,
    cache_k_HSd: torch.Tensor,
    cache_v_HSd: torch.Tensor,
    start: int,
    layer: int,
) -> torch.Tensor:
    """Attention with sinks (GPT-OSS): each head's softmax has one more logit, its learned sink,
    whose value is nothing. The cache's slot 0 is that key: zeros for key and value (so its score is
    0 and it adds nothing), and the mask adds the head's sink to its score. Tokens come after it
    (`sink_cache_shapes`), so no step copies the cache to append the sink."""
    T = x_TD.shape[0]
    q_HTd, k_HTd, v_HTd = _project_rotated(x_TD, w, spec, cos_Td, sin_Td, start, layer)
    keys_HSd, values_HSd, allowed_TS = remember(cache_k_HSd, cache_v_HSd, k_HTd, v_HTd, start, spec, layer, reserved=1)
    if allowed_TS is None:  # the new queries see the S slots in order, causally (one query: all of them)
        S = keys_HSd.shape[1] - 1
        allowed_TS = allowed_positions(torch.arange(S - T, S, device=x_TD.device), torch.arange(S, device=x_TD.device),
                                       None, None)
    mask_HTS = torch.empty(spec.num_heads, T, keys_HSd.shape[1], dtype=q_HTd.dtype, device=x_TD.device)
    mask_HTS[:, :, 0] = w.sinks_H.to(q_HTd.dtype)[:, None]
    mask_HTS[:, :, 1:] = torch.zeros((), dtype=q_HTd.dtype, device=x_TD.device).masked_fill(~allowed_TS, float("-inf"))
    return F.linear(_attend(q_HTd, keys_HSd, values_HSd, mask_HTS, spec), w.o_DQ, w.o_bias)


def gqa_cache_shapes(spec: ModelSpec, positions: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Keys and values, [Hkv, S, d] each."""
    shape = (spec.num_kv_heads, positions, spec.head_dim)
    return shape, shape


def sink_cache_shapes(spec: ModelSpec, positions: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """As `gqa_cache_shapes`, with position 0 the sink's zero key and value (`sink_attention`)."""
    return gqa_cache_shapes(spec, 1 + positions)


def gqa_params(spec: ModelSpec) -> int:
    """q, k, v, o, their biases, q/k norms and sinks where the spec has them."""
    D, Q, K = spec.hidden_size, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    params = 2 * Q * D + 2 * K * D + D * spec.output_bias + spec.num_heads * spec.attention_sinks
    if spec.attention_bias:
        params += Q + 2 * K
    per_head = 2 * spec.head_dim
    return params + {"none": 0, "weightless_after_rope": 0, "per_head": per_head, "per_head_after_rope": per_head,
                     "full": Q + K}[spec.qk_norm]
