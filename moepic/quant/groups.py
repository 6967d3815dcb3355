"""Integer group quantization: each row of a matrix cut into groups of `group` columns, each group
stored as int8 or int4 values sharing one scale (symmetric) or a scale and a zero point
(asymmetric). Pure.

    W [R, C] ─quantize─▶ QuantizedGroups: values [R, C] int8 (int8), or [R, C/2] uint8 (int4: two per
                                          byte, low nibble first); scales [R, C/g]; zeros [R, C/g] uint8 (asymmetric)
             ◀dequantize─ W' [R, C];  |W − W'| ≤ scale / 2 everywhere

Symmetric: scale = max|w| / q_max (127 or 7), values round(w / scale) in [−q_max, q_max].
Asymmetric: the group's range widened to hold 0 (as GPTQ and HQQ do, so the zero point is a code),
scale = (max − min) / (2^bits − 1), zero = round(−min / scale) in [0, 2^bits − 1], values
round(w / scale) + zero in the same range. Arithmetic is in float32. Scales are stored in
`scale_dtype` (float16 halves their bytes), rounded *up* to it, so no value leaves the code range
and the bound holds for the stored scale. A group of zeros gets scale 1 (its values are 0 either
way), so no division by zero.
"""

from __future__ import annotations

import attrs
import torch

BITS = (8, 4)


@attrs.frozen(eq=False)
class QuantizedGroups:
    values: torch.Tensor  # [R, C] int8 (bits 8; asymmetric: uint8), or [R, C/2] uint8 (bits 4)
    scales: torch.Tensor  # [R, C/group] in the scale dtype
    zeros: torch.Tensor | None  # [R, C/group] uint8 (asymmetric), None (symmetric)
    bits: int
    group: int

    @property
    def shape(self) -> tuple[int, int]:
        rows, stored = self.values.shape
        return rows, stored * (2 if self.bits == 4 else 1)


def quantize(
    w_RC: torch.Tensor, *, bits: int, group: int, symmetric: bool = True, scale_dtype: torch.dtype = torch.float32
) -> QuantizedGroups:
    R, C = w_RC.shape
    if bits not in BITS:
        raise ValueError(f"group quantization has {' or '.join(map(str, BITS))} bits, not {bits}")
    if group < 1 or C % group or (bits == 4 and group % 2):
        raise ValueError(f"group size {group} does not divide the rows' {C} columns" + (" into even groups" if bits == 4 else ""))
    w_RGg = w_RC.float().reshape(R, C // group, group)
    if symmetric:
        q_max = 2 ** (bits - 1) - 1
        scales_RG = _stored_scales(w_RGg.abs().amax(dim=-1) / q_max, scale_dtype)
        q_RGg = torch.round(w_RGg / scales_RG.float()[..., None]).clamp(-q_max, q_max)
        zeros_RG = None
    else:
        top = 2**bits - 1
        low_RG, high_RG = w_RGg.amin(dim=-1).clamp(max=0), w_RGg.amax(dim=-1).clamp(min=0)
        scales_RG = _stored_scales((high_RG - low_RG) / top, scale_dtype)
        zeros_RG = torch.round(-low_RG / scales_RG.float()).clamp(0, top)
        q_RGg = (torch.round(w_RGg / scales_RG.float()[..., None]) + zeros_RG[..., None]).clamp(0, top)
        zeros_RG = zeros_RG.to(torch.uint8)
    q_RC = q_RGg.reshape(R, C)
    if bits == 4:
        values = pack_nibbles(q_RC.to(torch.int16) + (8 if symmetric else 0))
    else:
        values = q_RC.to(torch.int8 if symmetric else torch.uint8)
    return QuantizedGroups(values, scales_RG, zeros_RG, bits, group)


def _stored_scales(scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float32 scales in `dtype`, each rounded up (so |w| / scale never exceeds the code range);
    0 (a group of zeros) becomes 1."""
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    stored = scales.to(dtype)
    if not bool(torch.isfinite(stored).all()):
        raise ValueError(f"a group's scale {scales.max().item():.3g} overflows {dtype}")
    low = stored.float() < scales
    return torch.where(low, torch.nextafter(stored, torch.full_like(stored, float("inf"))), stored)


def dequantize(q: QuantizedGroups, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[R, C] in `dtype` (computed in float32, then cast)."""
    R, C = q.shape
    if q.bits == 4:
        codes_RC = unpack_nibbles(q.values).float() - (8 if q.zeros is None else 0)
    else:
        codes_RC = q.values.float()
    codes_RGg = codes_RC.reshape(R, C // q.group, q.group)
    if q.zeros is not None:
        codes_RGg = codes_RGg - q.zeros.float()[..., None]
    return (codes_RGg * q.scales.float()[..., None]).reshape(R, C).to(dtype)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """[..., C] integers in [0, 15] → [..., C/2] uint8, two per byte, the even column in the low nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"nibbles pack in pairs; the last dimension is {codes.shape[-1]}")
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_nibbles`: [..., C/2] uint8 → [..., C] uint8 in [0, 15]."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)
