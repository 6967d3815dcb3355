"""Integer group quantization (moepic/quant/groups.py): round trips within the format's bound."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moepic.quant.groups import dequantize, pack_nibbles, quantize, unpack_nibbles


@given(rows=st.integers(1, 6), groups=st.integers(1, 4), group=st.sampled_from([2, 16, 32, 64]), bits=st.sampled_from([8, 4]),
       symmetric=st.booleans(), spread=st.sampled_from([1e-3, 1.0, 1e3]), seed=st.integers(0, 2**16),
       scale_dtype=st.sampled_from([torch.float32, torch.float16]))
def test_every_value_comes_back_within_half_its_groups_scale(rows, groups, group, bits, symmetric, spread, seed, scale_dtype):
    g = torch.Generator().manual_seed(seed)
    w_RC = torch.randn(rows, groups * group, generator=g) * spread + (0 if symmetric else spread)
    q = quantize(w_RC, bits=bits, group=group, symmetric=symmetric, scale_dtype=scale_dtype)
    assert q.shape == tuple(w_RC.shape) and q.scales.shape == (rows, groups) and q.scales.dtype == scale_dtype
    if not symmetric:  # the zero point is a code
        assert q.zeros.dtype == torch.uint8 and int(q.zeros.max()) < 2**bits
    back = dequantize(q)
    bound_RC = (q.scales.float() / 2).repeat_interleave(group, dim=1) * (1 + 1e-5) + 1e-30
    assert bool(((back - w_RC).abs() <= bound_RC).all())
    # int4 packs two values a byte; int8 one
    assert q.values.numel() * (2 if bits == 4 else 1) == w_RC.numel()


def test_a_group_of_zeros_stays_exact_and_the_extremes_hit_the_grid():
    w = torch.tensor([[0.0, 0.0, 0.0, 0.0, -2.0, 1.0, 0.5, 2.0]])
    q = quantize(w, bits=4, group=4)
    back = dequantize(q)
    assert torch.equal(back[0, :4], torch.zeros(4))
    assert back[0, 4].item() == -2.0 and back[0, 7].item() == 2.0  # ±max|w| is ±7 · scale exactly


def test_float16_scales_round_up_so_the_extremes_stay_in_range():
    # 1/3 is not a float16: its nearest is below it, so rounding to nearest would push 1/3 · 7 past code 7.
    w = torch.tensor([[7 / 3, -1.0, 0.5, 0.25]])
    q = quantize(w, bits=4, group=4, scale_dtype=torch.float16)
    assert q.scales.float().item() >= 1 / 3
    assert float((dequantize(q) - w).abs().max()) <= q.scales.float().item() / 2


@given(codes=st.lists(st.integers(0, 15), min_size=1, max_size=20).map(lambda c: c + c[:1] if len(c) % 2 else c))
def test_nibbles_pack_a_rows_halves_low_then_high_and_unpack(codes):
    t = torch.tensor(codes, dtype=torch.uint8)
    packed = pack_nibbles(t)
    half = len(codes) // 2
    assert packed.tolist() == [codes[j] | (codes[j + half] << 4) for j in range(half)]
    assert torch.equal(unpack_nibbles(packed), t)


@pytest.mark.parametrize("kwargs,message", [
    (dict(bits=3, group=4), "has 8 or 4 bits, not 3"),
    (dict(bits=8, group=5), "group size 5 does not divide the rows' 8 columns"),
    (dict(bits=4, group=1), "group size 1 does not divide the rows' 8 columns into even groups"),
])
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        quantize(torch.zeros(2, 8), **kwargs)
