"""Multi-head latent attention (DeepSeek-V2/V3) over a latent KV cache. Pure apart from the cache write.

    x ─q_proj (or q_a → norm → q_b)─▶ q [H, T, nope | r] ──────────── rope on its r dims ─┐
    x ─kv_a─▶ [latent L | shared key r] ─norm(latent)───▶ cache ◀── rope on the key ──────┤
              cache[0:S] ─kv_b─▶ per head [key nope | value v]; key = [nope | shared rope] ┴─▶ softmax(q·k·scale)·v ─o─▶

The cache keeps what DeepSeek's design keeps: the normalised latent [S, L] and the rotated shared
key [S, r] per layer, (L + r) numbers per token instead of 2·H·d. Keys and values are expanded from
the latent at each step (HF transformers does the same); absorbing kv_b into the query and the output
is a later speed-up that changes nothing here.
As in core/attention.py, the cache buffers are donated and written in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moepic.core.kv_cache_layer import causal_mask
from moepic.core.norms import rms_norm
from moepic.core.rope import rotate
from moepic.core.spec import ModelSpec
from moepic.core.weights import MLAWeights


def mla_attention(
    x_TD: torch.Tensor,
    w: MLAWeights,
    spec: ModelSpec,
    cos_Tr: torch.Tensor,
    sin_Tr: torch.Tensor,
    cache_latent_1SL: torch.Tensor,
    cache_rope_1Sr: torch.Tensor,
    start: int,
    layer: int,
) -> torch.Tensor:
    mla, H, T = spec.mla, spec.num_heads, x_TD.shape[0]
    nope, r, v = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim
    if w.q_QD is not None:
        q = F.linear(x_TD, w.q_QD)
    else:
        q = F.linear(rms_norm(F.linear(x_TD, w.q_a_RD), w.q_a_norm_R, spec.norm_eps), w.q_b_QR)
    q_HTq = q.view(T, H, nope + r).transpose(0, 1)
    latent_TL, k_rope_Tr = F.linear(x_TD, w.kv_a_CD).split([mla.kv_lora_rank, r], dim=-1)
    q_rope_HTr = rotate(q_HTq[..., nope:], cos_Tr, sin_Tr, spec.rope_layout)
    cache_latent_1SL[0, start : start + T] = rms_norm(latent_TL, w.kv_a_norm_L, spec.norm_eps)
    cache_rope_1Sr[0, start : start + T] = rotate(k_rope_Tr, cos_Tr, sin_Tr, spec.rope_layout)
    S = start + T
    kv_SHn = F.linear(cache_latent_1SL[0, :S], w.kv_b_ND).view(S, H, nope + v)
    keys_HSq = torch.cat((kv_SHn[..., :nope], cache_rope_1Sr[0, :S, None, :].expand(S, H, r)), dim=-1).transpose(0, 1)
    values_HSv = kv_SHn[..., nope:].transpose(0, 1)
    queries_HTq = torch.cat((q_HTq[..., :nope], q_rope_HTr), dim=-1)
    mask = causal_mask(T, start, spec.window(layer), x_TD.device, spec.chunk(layer))
    out_HTv = F.scaled_dot_product_attention(
        queries_HTq.unsqueeze(0), keys_HSq.unsqueeze(0), values_HSv.unsqueeze(0),
        attn_mask=mask, is_causal=mask is None and T > 1, scale=mla.softmax_scale,
    ).squeeze(0)
    return F.linear(out_HTv.transpose(0, 1).reshape(T, H * v), w.o_DV)


def mla_cache_shapes(spec: ModelSpec, positions: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The normalised latent [1, S, L] and the rotated shared key [1, S, r]."""
    return (1, positions, spec.mla.kv_lora_rank), (1, positions, spec.mla.qk_rope_head_dim)


def mla_params(spec: ModelSpec) -> int:
    """Queries (direct, or low-rank with their norm), kv_a, its norm, kv_b, o."""
    mla, D, H = spec.mla, spec.hidden_size, spec.num_heads
    Q, L = H * mla.qk_head_dim, mla.kv_lora_rank
    queries = Q * D if not mla.q_lora_rank else mla.q_lora_rank * (D + 1 + Q)
    return queries + (L + mla.qk_rope_head_dim) * D + L + H * (mla.qk_nope_head_dim + mla.v_head_dim) * L + D * H * mla.v_head_dim
