"""Rotary position embeddings: inverse frequencies per RopeSpec kind, cos/sin tables, and rotation.

Pure (torch only). The frequency formulas are transcribed operation by operation from
transformers' `modeling_rope_utils` (5.x) so inv_freq and attention scaling match it bit for bit:
the reference tests compare against `ROPE_INIT_FUNCTIONS` and the models' `compute_default_rope_parameters`.
Rotation uses the rotate-half layout (first half of the rotary dims paired with the second half),
as every Hugging Face Llama-family checkpoint is stored in it.

Shapes: d head dim, r rotary dims (int(d * partial_rotary_factor), r ≤ d), T tokens, H heads.
"""

from __future__ import annotations

import math

import torch

from moepic.core.spec import RopeSpec

ROPE_KINDS = ("default", "linear", "llama3", "yarn", "longrope")


def rope_inv_freq(
    spec: RopeSpec, head_dim: int, *, max_position_embeddings: int | None = None
) -> tuple[torch.Tensor, float]:
    """(inv_freq_r2 float32 [r // 2], attention_scaling) for `spec`, on the CPU.

    `max_position_embeddings` stands in for `spec.original_max_position` when that is None, as HF
    does; only llama3 and yarn read either.
    """
    if spec.kind not in ROPE_KINDS:
        raise ValueError(f"unknown RoPE kind {spec.kind!r}; expected one of {', '.join(ROPE_KINDS)}")
    dim = int(head_dim * spec.partial_rotary_factor)
    base = spec.theta
    # base ** (2i / r), in float32 like HF; every kind starts from these wavelengths.
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv_freq = 1.0 / pos_freqs
    if spec.kind == "default":
        return inv_freq, 1.0
    if spec.kind == "linear":
        # Dividing the frequencies is the same as dividing the positions (position interpolation).
        return inv_freq / spec.factor, 1.0
    if spec.kind == "longrope":
        return _longrope(pos_freqs, spec, dim, max_position_embeddings)

    old_context = spec.original_max_position or max_position_embeddings
    if old_context is None:
        raise ValueError(f"RoPE kind {spec.kind!r} needs original_max_position or max_position_embeddings")
    if spec.kind == "llama3":
        return _llama3(inv_freq, spec, old_context), 1.0
    return _yarn(pos_freqs, inv_freq, spec, dim, old_context)


def _longrope(pos_freqs: torch.Tensor, spec: RopeSpec, dim: int, max_position_embeddings: int | None):
    """LongRoPE as HF's PhiMoE runs it: every frequency divided by its short factor, at every
    length (HF computes its PhiMoE frequencies without the sequence length, so the long factors never
    apply); the cos/sin scale is the short mscale, and the long one once a forward reaches past the
    pretraining length (`rope_scaling_until`). Without mscales: LongRoPE's sqrt(1 + ln s / ln L)."""
    if len(spec.short_factor) != dim // 2:
        raise ValueError(f"LongRoPE short_factor has {len(spec.short_factor)} values for {dim // 2} frequencies")
    inv_freq = 1.0 / (torch.tensor(spec.short_factor, dtype=torch.float32) * pos_freqs)
    if spec.short_mscale is not None:
        return inv_freq, spec.short_mscale
    old = spec.original_max_position or max_position_embeddings
    return inv_freq, 1.0 if spec.factor <= 1.0 else math.sqrt(1 + math.log(spec.factor) / math.log(old))


def rope_scaling_until(spec: RopeSpec, end_position: int, scaling: float) -> float:
    """The cos/sin scale of a forward whose last position is `end_position` - 1: `scaling`
    (rope_inv_freq's), except LongRoPE's long mscale once the forward reaches past the pretraining
    length (as HF's PhiMoE picks it per forward; earlier keys keep the scale they were cached with)."""
    long = spec.kind == "longrope" and spec.long_mscale is not None and spec.original_max_position is not None
    if long and end_position > spec.original_max_position:
        return spec.long_mscale
    return scaling


def cache_rebuild_length(spec: RopeSpec, scaling: float) -> int | None:
    """The KV cache length at which generation re-runs the whole sequence instead of one token
    (None: never). LongRoPE's cos/sin scale changes once the sequence outgrows its pretraining
    length, and keys cached before carry the old scale: HF's PhiMoE generation drops its cache at
    that step and recomputes it, so moepic's does too (runtime/generation.py)."""
    if spec.kind != "longrope" or spec.original_max_position is None:
        return None
    boundary = spec.original_max_position
    if rope_scaling_until(spec, boundary, scaling) == rope_scaling_until(spec, boundary + 1, scaling):
        return None  # the same scale on both sides: nothing to recompute
    return boundary


def _llama3(inv_freq: torch.Tensor, spec: RopeSpec, old_context: int) -> torch.Tensor:
    """Llama 3.1: long wavelengths interpolated by `factor`, short kept, a smooth blend between."""
    factor, low, high = spec.factor, spec.low_freq_factor, spec.high_freq_factor
    low_freq_wavelen = old_context / low
    high_freq_wavelen = old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(
    pos_freqs: torch.Tensor, inv_freq: torch.Tensor, spec: RopeSpec, dim: int, old_context: int
) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low-frequency dims, keep high-frequency ones, linear ramp between them."""
    factor = spec.factor
    base = spec.theta
    attention_factor = spec.attention_factor
    if attention_factor is None:
        # DeepSeek-style checkpoints give mscale/mscale_all_dim; HF treats 0 like absent (truthiness).
        if spec.mscale and spec.mscale_all_dim:
            attention_factor = float(
                yarn_mscale(factor, spec.mscale) / yarn_mscale(factor, spec.mscale_all_dim)
            )
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast = spec.beta_fast or 32
    beta_slow = spec.beta_slow or 1

    def correction_dim(num_rotations: float) -> float:
        # The dim whose wavelength completes `num_rotations` turns over the original context.
        return (dim * math.log(old_context / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if spec.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # HF's guard against a zero-width ramp

    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    interpolated = 1.0 / (factor * pos_freqs)
    return interpolated * (1 - extrapolation) + inv_freq * extrapolation, attention_factor


def rope_cos_sin(
    inv_freq_d: torch.Tensor, attention_scaling: float, positions_T: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos_Tr, sin_Tr (times attention_scaling, cast to `dtype`) for integer positions.

    `positions_T` may carry leading batch dims; the output gains a last dim of r = 2 * len(inv_freq_d).
    Angles are formed in float32 whatever `dtype` is: bf16 positions lose exactness past 256.
    """
    freqs = positions_T[..., None].float() * inv_freq_d.float()
    # cos(cat(f, f)) == cat(cos f, cos f) elementwise, so take the trig of half the table only.
    cos, sin = freqs.cos(), freqs.sin()
    if attention_scaling != 1.0:
        cos.mul_(attention_scaling)
        sin.mul_(attention_scaling)
    cos, sin = cos.to(dtype), sin.to(dtype)
    return torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)


def apply_rope(x_HTd: torch.Tensor, cos_Td: torch.Tensor, sin_Td: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin on the first r = cos.shape[-1] dims; the remaining d - r pass through.

    Any leading dims; cos/sin must broadcast against x[..., :r] (e.g. [T, r] for x [H, T, d]).
    """
    rot = cos_Td.shape[-1]
    half = rot // 2
    x_rot = x_HTd[..., :rot] if rot < x_HTd.shape[-1] else x_HTd
    rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    out = x_rot * cos_Td
    out += rotated * sin_Td  # in place: one fewer temporary than HF's `a + b`, same arithmetic
    if rot < x_HTd.shape[-1]:
        out = torch.cat((out, x_HTd[..., rot:]), dim=-1)
    return out


def apply_rope_interleaved(x_HTr: torch.Tensor, cos_Tr: torch.Tensor, sin_Tr: torch.Tensor) -> torch.Tensor:
    """RoPE on dims paired (x0, x1), (x2, x3)…, each pair rotated by one frequency, the result laid
    out as [rotated evens | rotated odds] (DeepSeek's layout: the same numbers as de-interleaving and
    rotating halves, without the copy). cos/sin as `rope_cos_sin` gives them (their first half holds
    each pair's angle); x's last dim is exactly the rotary width."""
    half = cos_Tr.shape[-1] // 2
    cos, sin = cos_Tr[..., :half], sin_Tr[..., :half]
    even, odd = x_HTr[..., 0::2], x_HTr[..., 1::2]
    return torch.cat((even * cos - odd * sin, odd * cos + even * sin), dim=-1)


def rotate(x_HTd: torch.Tensor, cos_Tr: torch.Tensor, sin_Tr: torch.Tensor, layout: str) -> torch.Tensor:
    """RoPE on the first r dims of x in the spec's pairing (ModelSpec.rope_layout); the rest pass."""
    if layout == "halves":
        return apply_rope(x_HTd, cos_Tr, sin_Tr)
    r = cos_Tr.shape[-1]
    if r == x_HTd.shape[-1]:
        return apply_rope_interleaved(x_HTd, cos_Tr, sin_Tr)
    return torch.cat((apply_rope_interleaved(x_HTd[..., :r], cos_Tr, sin_Tr), x_HTd[..., r:]), dim=-1)
