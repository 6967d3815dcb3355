"""MXFP4, as GPT-OSS checkpoints store their experts: blocks of 32 four-bit floats (E2M1, two per
byte, low nibble first) sharing one power-of-two scale (an E8M0 byte, bias 127). Pure.

    blocks [..., G, 16] uint8 ─┬─ low nibble  ─▶ value 2j   ┐
                               └─ high nibble ─▶ value 2j+1 ┴─ × 2^(scale − 127) ─▶ [..., G·32]
    scales [..., G]     uint8

Dequantised in the target dtype exactly as HF transformers does it (a 16-entry table, then ldexp
in that dtype), so the weights are HF's bit for bit (tests/quant/test_mx.py). Every E2M1 value
times a power of two is exact in bfloat16 and float32 alike, so the dtype never changes a weight.
The GPT-OSS adapter reads its experts through it, dequantised on load or kept as blocks (the
`mxfp4` expert format, quant/mxfp4.py); `quantize_mxfp4` makes blocks from other weights, by the
OCP Microscaling rules: the block's scale is 2^(⌊log2 max|x|⌋ − 2) (E2M1's largest exponent is 2),
each value rounds to the nearest E2M1 value, ties to the even code, and saturates at ±6.
"""

from __future__ import annotations

import functools

import torch

# E2M1: sign, two exponent bits, one mantissa bit; index = the nibble.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK_BYTES = 16
VALUES_PER_BLOCK = 2 * BLOCK_BYTES


@functools.lru_cache(maxsize=16)
def _byte_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[256, 2]: a byte's low-nibble value, then its high-nibble value, in `dtype`."""
    table = torch.tensor(FP4_VALUES, dtype=dtype, device=device)
    codes = torch.arange(256, device=device)
    return torch.stack((table[codes & 0x0F], table[codes >> 4]), dim=-1)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """[..., G·32] in `dtype` from `blocks` [..., G, 16] and `scales` [..., G] (both uint8)."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[-1] != BLOCK_BYTES or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {list(blocks.shape)} and scales {list(scales.shape)} do not match: "
                         f"expected blocks [..., G, {BLOCK_BYTES}] and scales [..., G]")
    # Each byte's two values at once, from a 256 × 2 table: one gather instead of two (7× faster on
    # a CPU than indexing the 16 values per nibble), the same numbers as HF's nibble table.
    values = _byte_table(dtype, blocks.device).index_select(0, blocks.reshape(-1).int())
    values = values.view(*blocks.shape[:-1], VALUES_PER_BLOCK)
    # × 2^(scale − 127) as a float power of two, exact for every E8M0 byte (2^-127 too, a subnormal):
    # the same numbers as HF's ldexp, which on a CPU costs 14× the multiply (it broadcasts first).
    powers = torch.exp2(scales.to(torch.float32).unsqueeze(-1) - 127)
    return (values * powers).to(dtype).flatten(-2)


# Midpoints between consecutive E2M1 magnitudes (0, 0.5, 1, 1.5, 2, 3, 4, 6).
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
EMAX_E2M1 = 2


def quantize_mxfp4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` [..., G·32] → (blocks [..., G, 16], scales [..., G]) uint8, as `dequantize_mxfp4` reads them."""
    if x.shape[-1] % VALUES_PER_BLOCK:
        raise ValueError(f"MXFP4 blocks hold {VALUES_PER_BLOCK} values; the last dimension is {x.shape[-1]}")
    v = x.float().contiguous().reshape(*x.shape[:-1], -1, VALUES_PER_BLOCK)
    amax = v.abs().amax(dim=-1)
    # E8M0 holds exponents −127…127; a block of zeros gets the smallest (its codes are 0 either way).
    exp = torch.where(amax > 0, torch.floor(torch.log2(amax.clamp(min=torch.finfo(torch.float32).tiny))) - EMAX_E2M1,
                      torch.full_like(amax, -127.0)).clamp(-127, 127)
    scaled = (v / torch.exp2(exp).unsqueeze(-1)).abs()
    midpoints = torch.tensor(_MIDPOINTS, device=x.device)
    index = torch.bucketize(scaled, midpoints)  # a value on a midpoint goes to the lower magnitude …
    tie = (index < len(_MIDPOINTS)) & (scaled == midpoints[index.clamp(max=len(_MIDPOINTS) - 1)])
    index = torch.where(tie & (index % 2 == 1), index + 1, index)  # … unless that one's code is odd
    codes = (index + torch.where(v < 0, 8, 0)).to(torch.uint8)  # the sign bit; −0 for a negative that rounds to 0
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks, (exp + 127).to(torch.uint8)
