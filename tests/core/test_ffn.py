"""Split experts compute the same function as whole experts (docs/design.md §2)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moepic.core.ffn import SegmentOutput, split_expert, swiglu, swiglu_segments, top_neurons_for
from moepic.core.weights import SwiGLUWeights, neuron_block
from tests_support import random_expert


@given(
    D=st.integers(1, 48),
    F=st.integers(1, 96),
    T=st.integers(1, 9),
    theta=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_top_plus_bottom_segment_equals_whole_expert(D, F, T, theta, seed):
    expert = random_expert(D, F, seed)
    x_TD = torch.randn(T, D, generator=torch.Generator().manual_seed(seed + 1))
    top, bottom = split_expert(expert, top_neurons_for(theta, F, expert.block))
    assert top.ffn_size + bottom.ffn_size == F
    torch.testing.assert_close(swiglu_segments(x_TD, (top, bottom)), swiglu(x_TD, expert), atol=1e-5, rtol=1e-5)


@given(block=st.sampled_from([1, 2, 4, 8, 16]), cuts=st.lists(st.integers(0, 64), max_size=5), seed=st.integers(0, 2**16))
def test_any_partition_into_neuron_block_segments_equals_whole_expert(block, cuts, seed):
    F = 64
    expert = random_expert(16, F, seed, block=block)
    bounds = sorted({0, F, *(c // block * block for c in cuts)})
    segments = [expert.neurons(a, b) for a, b in zip(bounds, bounds[1:])]
    x_TD = torch.randn(3, 16, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(swiglu_segments(x_TD, segments), swiglu(x_TD, expert), atol=1e-5, rtol=1e-5)


@given(F=st.integers(1, 50_000))
def test_neuron_block_is_the_widest_power_of_two_up_to_64_dividing_f(F):
    B = neuron_block(F)
    assert F % B == 0 and B & (B - 1) == 0 and B <= 64
    assert B == 64 or F % (2 * B) != 0


def test_real_expert_widths_get_64_neuron_blocks():
    # Mixtral, Qwen1.5-MoE / DeepSeek-V2-Lite, OLMoE, Qwen3-30B-A3B, Qwen1.5 shared expert
    assert {neuron_block(F) for F in (14336, 1408, 1024, 768, 5632)} == {64}


def test_split_segments_are_views_not_copies():
    expert = random_expert(8, 16, 0, block=2)
    top, bottom = split_expert(expert, 6)
    assert top.gate_up_N2BD.data_ptr() == expert.gate_up_N2BD.data_ptr()
    assert bottom.down_FD.data_ptr() == expert.down_FD[6:].data_ptr()
    for segment in (top, bottom):
        assert segment.gate_up_N2BD.is_contiguous() and segment.down_FD.is_contiguous()


def test_a_split_off_a_neuron_block_boundary_is_rejected():
    expert = random_expert(8, 16, 0, block=4)
    with pytest.raises(ValueError, match="block 4"):
        split_expert(expert, 6)
    with pytest.raises(ValueError, match="block 4"):
        split_expert(expert, 20)


@pytest.mark.parametrize("F,block", [(5, 1), (128, 64), (48, 16), (12, 3)])
def test_block_interleaved_gate_up_keeps_the_checkpoint_rows(F, block):
    g = torch.Generator().manual_seed(0)
    gate, up, down = torch.randn(F, 3, generator=g), torch.randn(F, 3, generator=g), torch.randn(3, F, generator=g)
    w = SwiGLUWeights.from_projections(gate, up, down, block=block)
    assert w.block == block and w.ffn_size == F
    assert torch.equal(w.gate_FD, gate) and torch.equal(w.up_FD, up) and torch.equal(w.down_FD, down.t())
    x = torch.randn(2, 3, generator=g)
    expected = (torch.nn.functional.silu(x @ gate.t()) * (x @ up.t())) @ down.t()
    torch.testing.assert_close(swiglu(x, w), expected)


def test_a_block_that_does_not_divide_f_is_rejected():
    with pytest.raises(ValueError, match="does not divide"):
        random_expert(4, 12, 0, block=8)


def test_theta_rounds_down_to_whole_neuron_blocks():
    assert top_neurons_for(0.4, 1408, block=128) == 512
    assert top_neurons_for(1.0, 1408, block=128) == 1408
    assert top_neurons_for(0.0, 1408, block=128) == 0
    assert top_neurons_for(0.5, 10) == 5


@pytest.mark.parametrize("theta", [-0.1, 1.5])
def test_theta_outside_unit_interval_is_rejected(theta):
    with pytest.raises(ValueError, match="theta"):
        top_neurons_for(theta, 10)


def test_expert_with_only_empty_segments_is_rejected():
    expert = random_expert(4, 4, 0)
    with pytest.raises(ValueError, match="non-empty"):
        swiglu_segments(torch.zeros(1, 4), [expert.neurons(0, 0)])


def test_a_segment_handed_back_as_its_output_is_added_as_if_computed_here():
    expert = random_expert(8, 16, seed=3, block=4)
    top, bottom = split_expert(expert, 8)
    x_TD = torch.randn(3, 8, generator=torch.Generator().manual_seed(4))
    assert torch.equal(swiglu_segments(x_TD, (top, SegmentOutput(swiglu(x_TD, bottom)))), swiglu_segments(x_TD, (top, bottom)))
    assert torch.equal(swiglu_segments(x_TD, (SegmentOutput(swiglu(x_TD, expert)),)), swiglu(x_TD, expert))


def test_an_output_for_other_tokens_than_the_expert_s_is_refused():
    with pytest.raises(ValueError, match=r"a segment's output is \(2, 8\), its tokens' input \(3, 8\)"):
        swiglu_segments(torch.zeros(3, 8), (SegmentOutput(torch.zeros(2, 8)),))
