"""The `gguf` expert format: Q8_0 written as llama.cpp writes it (the `gguf` package's reference,
bit for bit), any blocks decoded as that package dequantises them, segments cut at whole blocks of
down's neurons, and the bytes a neuron takes."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from moepic.core.weights import SwiGLUWeights
from moepic.quant import build_format
from moepic.quant.ggml import BLOCKS, quantize_q8_0
from gguf_writing import random_blocks

finite = st.floats(-1e4, 1e4, width=32, allow_subnormal=False)


@given(arrays(np.float32, st.tuples(st.integers(1, 6), st.just(32)), elements=finite))
def test_q8_0_blocks_are_the_gguf_packages_bit_for_bit(x):
    x[0, :5] = 0  # some all-zero stretches and exact zeros
    reference = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0).reshape(len(x), 34)
    assert np.array_equal(quantize_q8_0(torch.from_numpy(x)).numpy(), reference)


@given(seed=st.integers(0, 2**16), D=st.sampled_from([32, 64, 96]), blocks=st.integers(1, 3))
def test_q8_0_experts_round_trip_within_half_a_step(seed, D, blocks):
    F = 32 * blocks
    g = torch.Generator().manual_seed(seed)
    w = SwiGLUWeights.from_projections(*(torch.randn(F, D, generator=g) for _ in range(2)), torch.randn(D, F, generator=g), block=32)
    q = build_format({"name": "gguf"}).encode(w)
    back = q.dense()
    for original, decoded, rows in ((w.gate_up_N2BD.reshape(-1, 32), back.gate_up_N2BD.reshape(-1, 32), None),
                                    (w.down_FD.t().reshape(-1, 32), back.down_FD.t().reshape(-1, 32), None)):
        d32 = original.abs().amax(dim=1, keepdim=True) / 127
        d16 = d32.half().float()
        bound = d32 / 2 + 127 * (d32 - d16).abs() + 1e-6 * original.abs()
        assert ((original - decoded).abs() <= bound).all()


@pytest.mark.parametrize("gate_up,down", [("Q4_K", "Q6_K"), ("Q8_0", "Q4_K"), ("Q6_K", "Q8_0")])
@given(seed=st.integers(0, 2**16), start_block=st.integers(0, 1))
def test_any_blocks_decode_as_the_gguf_package_dequantises_them_and_segments_are_slices(gate_up, down, seed, start_block):
    rng = np.random.default_rng(seed)
    D, F = 256, 512
    fmt = build_format({"name": "gguf", "gate_up": gate_up, "down": down})
    multiple = fmt.neuron_multiple
    assert multiple == BLOCKS[down][0]
    gate, up = random_blocks(gate_up, F, D, rng), random_blocks(gate_up, F, D, rng)
    down_DX = random_blocks(down, D, F, rng)
    B = 256
    gate_up_N2BX = torch.from_numpy(np.stack([gate, up])).view(2, F // B, B, -1).transpose(0, 1)
    q = fmt.from_rows(gate_up_N2BX, torch.from_numpy(down_DX), block=B, dtype=torch.float32, activation=None)
    weights = q.dense()

    def reference(kind, rows):
        return torch.from_numpy(gguf.quants.dequantize(rows, gguf.GGMLQuantizationType[kind]))

    assert torch.equal(weights.gate_up_N2BD[:, 0].reshape(F, D), reference(gate_up, gate))
    assert torch.equal(weights.gate_up_N2BD[:, 1].reshape(F, D), reference(gate_up, up))
    assert torch.equal(weights.down_FD, reference(down, down_DX).t())
    start = start_block * B
    assert torch.equal(q.neurons(start, start + B).dense().down_FD, weights.down_FD[start : start + B])


@pytest.mark.parametrize("gate_up,down,per_neuron", [("Q8_0", "Q8_0", 2 * 34 * 8 + 34 * 8), ("Q4_K", "Q6_K", 2 * 144 + 210),
                                                     ("Q4_K", "Q4_K", 3 * 144)])
def test_a_neuron_takes_its_rows_blocks(gate_up, down, per_neuron):
    """D = 256: a gate or up row is one k-quant block (or 8 Q8_0 blocks); down's blocks span neurons."""
    fmt = build_format({"name": "gguf", "gate_up": gate_up, "down": down})
    assert fmt.neuron_bytes(256, False, 2) == per_neuron == fmt.neuron_bytes(256, False, 4)


def test_bad_kinds_shapes_and_encodes_are_named():
    with pytest.raises(Exception, match="GGUF block type 'Q5_K' is not read; read: Q8_0, Q4_K, Q6_K"):
        build_format({"name": "gguf", "gate_up": "Q5_K"})
    k = build_format({"name": "gguf", "gate_up": "Q4_K", "down": "Q6_K"})
    with pytest.raises(ValueError, match="cut at multiples of 256 neurons; neuron block 128"):
        k.check_shape(256, 512, 128)
    with pytest.raises(ValueError, match="Q4_K blocks hold 256 weights: the experts' hidden size 128 is not a multiple"):
        k.check_shape(128, 256, 256)
    w = SwiGLUWeights.from_projections(torch.randn(256, 256), torch.randn(256, 256), torch.randn(256, 256), block=256)
    with pytest.raises(ValueError, match="gguf experts in Q4_K are read from GGUF files, not encoded"):
        k.encode(w)
    with pytest.raises(ValueError, match="no gate/up biases"):
        k.parts(256, 256, torch.float32, True)
