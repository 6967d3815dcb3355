"""Block-scaled FP8 (moepic/quant/e4m3.py): e4m3 values as the format's specification defines them,
and HF transformers' dequantisation bit for bit."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moepic.quant.e4m3 import dequantize_fp8_blocks


def e4m3_from_bits(byte: int) -> float:
    """OCP FP8 E4M3 ("fn": finite, no infinities): sign, 4 exponent bits (bias 7), 3 mantissa bits;
    exponent 0 is subnormal (m/8 · 2^-6); S.1111.111 is NaN, the only non-finite code."""
    sign = -1.0 if byte & 0x80 else 1.0
    exponent, mantissa = (byte >> 3) & 0x0F, byte & 0x07
    if exponent == 0x0F and mantissa == 0x07:
        return math.nan
    if exponent == 0:
        return sign * mantissa / 8 * 2.0**-6
    return sign * (1 + mantissa / 8) * 2.0 ** (exponent - 7)


def test_every_e4m3_code_dequantises_as_the_specification_says():
    codes = torch.arange(256, dtype=torch.uint8).view(16, 16)
    out = dequantize_fp8_blocks(codes.view(torch.float8_e4m3fn), torch.ones(1, 1), torch.float32, block=(16, 16))
    expected = torch.tensor([e4m3_from_bits(b) for b in range(256)]).view(16, 16)
    assert torch.equal(out.isnan(), expected.isnan())
    assert torch.equal(out.nan_to_num(), expected.nan_to_num())
    assert out.abs().nan_to_num().max().item() == 448.0  # the largest finite e4m3


@given(rows=st.integers(1, 300), cols=st.integers(1, 300), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_block_scales_apply_per_128x128_block_as_hfs(rows, cols, seed, dtype):
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(rows, cols, generator=g) * 50).to(torch.float8_e4m3fn)
    scales = torch.rand(-(-rows // 128), -(-cols // 128), generator=g) + 0.5
    ours = dequantize_fp8_blocks(weight, scales, dtype)
    assert ours.dtype == dtype and torch.equal(ours, _dequantize_fp8_weight(weight.clone(), scales, [128, 128], dtype))


def test_mismatched_scales_and_wrong_dtypes_are_named():
    with pytest.raises(ValueError, match=r"FP8 scales \[1, 1\] do not match weights \[200, 10\] in 128×128 blocks: expected \[2, 1\]"):
        dequantize_fp8_blocks(torch.zeros(200, 10).to(torch.float8_e4m3fn), torch.ones(1, 1))
    with pytest.raises(ValueError, match="must be float8_e4m3fn, got torch.float32"):
        dequantize_fp8_blocks(torch.zeros(2, 2), torch.ones(1, 1))
