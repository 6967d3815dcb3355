"""Experts with biases and GPT-OSS's clamped SwiGLU (core/ffn.py, core/moe.py, core/packing.py):
gate/up biases split with their neurons, the down bias is added once per expert however the expert
is cut, and a packed expert keeps its biases."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from moepic.core.ffn import gated, swiglu, swiglu_segments
from moepic.core.moe import combine_experts
from moepic.core.packing import flat_buffer, flat_views, pack_expert
from moepic.core.spec import SILU, GatedActivation
from moepic.core.weights import SwiGLUWeights

CLAMPED = GatedActivation(alpha=1.702, limit=0.8, up_offset=1.0)  # a low limit: many values clamp


def biased_expert(D: int, F: int, seed: int, block: int, activation: GatedActivation = CLAMPED) -> SwiGLUWeights:
    g = torch.Generator().manual_seed(seed)
    return SwiGLUWeights.from_projections(
        torch.randn(F, D, generator=g), torch.randn(F, D, generator=g), torch.randn(D, F, generator=g) / F**0.5,
        block=block, gate_bias_F=torch.randn(F, generator=g), up_bias_F=torch.randn(F, generator=g), activation=activation,
    )


def reference(x_TD: torch.Tensor, gate_FD, up_FD, down_DF, gate_b, up_b, act: GatedActivation) -> torch.Tensor:
    """GPT-OSS's expert written out from the checkpoint-layout matrices (HF's formula)."""
    gate = (x_TD @ gate_FD.T + gate_b).clamp(max=act.limit)
    up = (x_TD @ up_FD.T + up_b).clamp(-act.limit, act.limit)
    return ((up + act.up_offset) * (gate * torch.sigmoid(gate * act.alpha))) @ down_DF.T


@given(seed=st.integers(0, 2**16), T=st.integers(1, 6))
def test_a_biased_clamped_expert_computes_gpt_osss_formula(seed, T):
    g = torch.Generator().manual_seed(seed)
    D, F = 8, 16
    gate, up, down = torch.randn(F, D, generator=g), torch.randn(F, D, generator=g), torch.randn(D, F, generator=g)
    gate_b, up_b = torch.randn(F, generator=g), torch.randn(F, generator=g)
    expert = SwiGLUWeights.from_projections(gate, up, down, block=4, gate_bias_F=gate_b, up_bias_F=up_b, activation=CLAMPED)
    x_TD = torch.randn(T, D, generator=g)
    torch.testing.assert_close(swiglu(x_TD, expert), reference(x_TD, gate, up, down, gate_b, up_b, CLAMPED), atol=1e-5, rtol=1e-5)


def test_the_default_activation_is_silu_and_the_clamps_bite():
    gate, up = torch.tensor([-3.0, 0.5, 2.0]), torch.tensor([-2.0, 0.25, 3.0])
    assert torch.equal(gated(gate, up, SILU), torch.nn.functional.silu(gate) * up)
    clamped = gated(gate, up, CLAMPED)
    g, u = torch.tensor([-3.0, 0.5, 0.8]), torch.tensor([-0.8, 0.25, 0.8])
    torch.testing.assert_close(clamped, (u + 1) * g * torch.sigmoid(1.702 * g))


@given(block=st.sampled_from([1, 2, 4]), cuts=st.lists(st.integers(0, 32), max_size=4), seed=st.integers(0, 2**16))
def test_a_biased_expert_cut_anywhere_sums_to_the_whole(block, cuts, seed):
    F = 32
    expert = biased_expert(8, F, seed, block)
    bounds = sorted({0, F, *(c // block * block for c in cuts)})
    segments = [expert.neurons(a, b) for a, b in zip(bounds, bounds[1:])]
    assert all(s.gate_up_bias_N2B.shape == (s.ffn_size // block, 2, block) for s in segments)
    x_TD = torch.randn(3, 8, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(swiglu_segments(x_TD, segments), swiglu(x_TD, expert), atol=1e-5, rtol=1e-5)


@given(pieces=st.integers(1, 4), tokens=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_the_down_bias_is_added_once_per_expert_however_many_segments(pieces, tokens, seed):
    D, F, E = 8, 16, 3
    experts = [biased_expert(D, F, seed + e, 4) for e in range(E)]
    g = torch.Generator().manual_seed(seed)
    bias_ED, x_TD = torch.randn(E, D, generator=g), torch.randn(tokens, D, generator=g)
    ids = [[t % E, (t + 1) % E] for t in range(tokens)]
    weights_TK = torch.rand(tokens, 2, generator=g)
    bounds = [F * i // pieces // 4 * 4 for i in range(pieces)] + [F]

    def cut(e):
        return [experts[e].neurons(a, b) for a, b in zip(bounds, bounds[1:])]

    routed = sorted({e for row in ids for e in row})
    got = combine_experts(x_TD, weights_TK, ids, ((e, cut(e)) for e in routed), bias_ED)
    want = torch.stack([sum(weights_TK[t, k] * (swiglu(x_TD[t : t + 1], experts[e])[0] + bias_ED[e]) for k, e in enumerate(row))
                        for t, row in enumerate(ids)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_packed_biased_expert_keeps_its_biases_in_one_buffer():
    expert = biased_expert(8, 16, 0, 4)
    packed = pack_expert(expert)
    flat = flat_buffer(packed)
    assert flat is not None and flat.numel() == 16 * (3 * 8 + 2) * 4  # fp32 bytes
    for a, b in zip(packed.tensors, expert.tensors, strict=True):
        assert torch.equal(a, b)
    assert packed.activation == CLAMPED
    # The top neurons, as a cache slot holds them: their own flat layout, biases included.
    top = expert.neurons(0, 8)
    slot = flat_views(torch.empty(8 * (3 * 8 + 2) * 4, dtype=torch.uint8), 8, expert)
    for dst, src in zip(slot.tensors, top.tensors, strict=True):
        dst.copy_(src)
    x_TD = torch.randn(2, 8)
    assert torch.equal(swiglu(x_TD, slot), swiglu(x_TD, top))


def test_an_unbiased_expert_packs_as_before():
    expert = SwiGLUWeights.from_projections(torch.randn(8, 4), torch.randn(8, 4), torch.randn(4, 8), block=4)
    assert flat_buffer(pack_expert(expert)).numel() == 3 * 8 * 4 * 4 and len(expert.tensors) == 2
