"""MXFP4 dequantisation (quant/mx.py) against HF transformers' reference, bit for bit."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st

from moepic.quant.mx import dequantize_mxfp4


def hf_reference(blocks, scales, dtype):
    """HF's dequantisation, undoing only its last step (a transpose for GPT-OSS's expert layout)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    # HF expects [E, rows, G, 16] and returns [E, G·32, rows]: a 4-D view in, the transpose undone out.
    return convert_moe_packed_tensors(blocks[None], scales[None], dtype=dtype)[0].transpose(0, 1)


@given(rows=st.integers(1, 4), groups=st.integers(1, 3), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.bfloat16, torch.float32]))
def test_dequantisation_is_hfs_bit_for_bit_on_random_blocks_and_every_scale(rows, groups, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (rows, groups, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(0, 256, (rows, groups), dtype=torch.uint8, generator=g)  # 2^-127 … 2^128: zeros and infs too
    ours = dequantize_mxfp4(blocks, scales, dtype)
    assert ours.shape == (rows, groups * 32) and ours.dtype == dtype
    assert torch.equal(ours, hf_reference(blocks, scales, dtype))


def test_the_nibbles_are_low_first_and_the_scale_is_a_power_of_two():
    blocks = torch.zeros(1, 1, 16, dtype=torch.uint8)
    blocks[0, 0, 0] = 0x72  # low nibble 2 (1.0), high nibble 7 (6.0)
    blocks[0, 0, 1] = 0x9F  # low nibble 15 (-6.0), high nibble 9 (-0.5)
    out = dequantize_mxfp4(blocks, torch.tensor([[129]], dtype=torch.uint8), torch.float32)  # × 2^2
    assert out[0, :4].tolist() == [4.0, 24.0, -24.0, -2.0] and not out[0, 4:].any()


def test_mismatched_or_wrongly_typed_inputs_are_refused_naming_the_shapes():
    with pytest.raises(ValueError, match=r"blocks \[2, 3, 16\] and scales \[2, 4\] do not match"):
        dequantize_mxfp4(torch.zeros(2, 3, 16, dtype=torch.uint8), torch.zeros(2, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="must be uint8"):
        dequantize_mxfp4(torch.zeros(2, 3, 16), torch.zeros(2, 3, dtype=torch.uint8))
