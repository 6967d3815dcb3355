"""Grouped-query self-attention over a KV cache that is passed in. Pure apart from the cache write.

The cache buffers are preallocated and *donated*: this function writes the new keys/values into
positions [start, start+T) in place (like gpt-fast's index_copy) and attends over [0, start+T).
Callers treat the old cache value as consumed; `KVCache` in core/model.py enforces this by only
ever handing out the advanced cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moepic.core.norms import rms_norm
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


def causal_mask(T: int, start: int, window: int | None, device) -> torch.Tensor | None:
    """Boolean [T, start+T] mask (True = may attend), or None when SDPA's own modes suffice."""
    if window is None and (T == 1 or start == 0):
        return None
    q_pos = torch.arange(start, start + T, device=device)[:, None]
    k_pos = torch.arange(start + T, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= (q_pos - k_pos) < window
    return allowed


def attention(
    x_TD: torch.Tensor,
    w: AttentionWeights,
    spec: ModelSpec,
    cos_Td: torch.Tensor,
    sin_Td: torch.Tensor,
    cache_k_HSd: torch.Tensor,
    cache_v_HSd: torch.Tensor,
    start: int,
    window: int | None = None,
) -> torch.Tensor:
    """`window`: this layer's sliding window (ModelSpec.window), None for full attention."""
    T = x_TD.shape[0]
    q_HTd, k_HTd, v_HTd = _project_qkv(x_TD, w, spec)
    q_HTd = rotate(q_HTd, cos_Td, sin_Td, spec.rope_layout)
    k_HTd = rotate(k_HTd, cos_Td, sin_Td, spec.rope_layout)
    cache_k_HSd[:, start : start + T] = k_HTd
    cache_v_HSd[:, start : start + T] = v_HTd
    keys_HSd = cache_k_HSd[:, : start + T]
    values_HSd = cache_v_HSd[:, : start + T]
    mask = causal_mask(T, start, window, x_TD.device)
    group = spec.num_heads // spec.num_kv_heads
    if T == 1 and group > 1:
        # Decode: fold each KV head's group of query heads into the query-length axis, so one
        # [group, S] attention runs per KV head with no K/V expansion (the FlashDecoding layout).
        # Query head h reads KV head h // group, as in HF's repeat_kv. Any mask is per key, so it
        # broadcasts over the folded rows.
        q_1HGd = q_HTd.reshape(1, spec.num_kv_heads, group, spec.head_dim)
        out_HTd = F.scaled_dot_product_attention(
            q_1HGd, keys_HSd.unsqueeze(0), values_HSd.unsqueeze(0), attn_mask=mask, scale=spec.attention_scale
        ).reshape(spec.num_heads, 1, spec.head_dim)
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
    return F.linear(out_HTd.transpose(0, 1).reshape(T, -1), w.o_DQ)


def gqa_cache_shapes(spec: ModelSpec, positions: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Keys and values, [Hkv, S, d] each."""
    shape = (spec.num_kv_heads, positions, spec.head_dim)
    return shape, shape


def gqa_params(spec: ModelSpec) -> int:
    """q, k, v, o, their biases and q/k norms where the spec has them."""
    D, Q, K = spec.hidden_size, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    params = 2 * Q * D + 2 * K * D
    if spec.attention_bias:
        params += Q + 2 * K
    return params + {"none": 0, "per_head": 2 * spec.head_dim, "full": Q + K}[spec.qk_norm]
