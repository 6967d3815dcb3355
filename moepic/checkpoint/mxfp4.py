"""MXFP4, as GPT-OSS checkpoints store their experts: blocks of 32 four-bit floats (E2M1, two per
byte, low nibble first) sharing one power-of-two scale (an E8M0 byte, bias 127). Pure.

    blocks [..., G, 16] uint8 ─┬─ low nibble  ─▶ value 2j   ┐
                               └─ high nibble ─▶ value 2j+1 ┴─ × 2^(scale − 127) ─▶ [..., G·32]
    scales [..., G]     uint8

Dequantised in the target dtype exactly as HF transformers does it (a 16-entry table, then ldexp
in that dtype), so the weights are HF's bit for bit (tests/checkpoint/test_mxfp4.py). The GPT-OSS
adapter reads its experts through it (adapters/reader.py `TensorReader.mxfp4`); keeping them
compressed in the host store is a later issue's.
"""

from __future__ import annotations

import torch

# E2M1: sign, two exponent bits, one mantissa bit; index = the nibble.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK_BYTES = 16
VALUES_PER_BLOCK = 2 * BLOCK_BYTES


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """[..., G·32] in `dtype` from `blocks` [..., G, 16] and `scales` [..., G] (both uint8)."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[-1] != BLOCK_BYTES or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {list(blocks.shape)} and scales {list(scales.shape)} do not match: "
                         f"expected blocks [..., G, {BLOCK_BYTES}] and scales [..., G]")
    table = torch.tensor(FP4_VALUES, dtype=dtype, device=blocks.device)
    values = torch.empty(*blocks.shape[:-1], VALUES_PER_BLOCK, dtype=dtype, device=blocks.device)
    values[..., 0::2] = table[(blocks & 0x0F).long()]
    values[..., 1::2] = table[(blocks >> 4).long()]
    exponents = scales.to(torch.int32).unsqueeze(-1) - 127
    return torch.ldexp(values, exponents).to(dtype).flatten(-2)
