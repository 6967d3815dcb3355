"""PhiMoE's SparseMixer router (core/routing.py `sparsemixer`) against HF's own function, and the
LongRoPE pieces PhiMoE needs (core/rope.py) against HF's."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moepic.core.rope import cache_rebuild_length, rope_inv_freq, rope_scaling_until
from moepic.core.routing import route, selection_scores
from moepic.core.spec import MoESpec, RopeSpec, RouterSpec


def sparsemixer_spec(E: int, jitter: float) -> MoESpec:
    return MoESpec(num_experts=E, top_k=2, expert_ffn=4, router=RouterSpec(kind="sparsemixer", renormalize=False, jitter_eps=jitter))


@given(E=st.integers(2, 16), T=st.integers(1, 6), jitter=st.sampled_from([0.0, 0.01, 0.1, 0.5]), seed=st.integers(0, 2**16),
       near_ties=st.booleans())
def test_sparsemixer_routes_and_weighs_as_hfs_phimoe(E, T, jitter, seed, near_ties):
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    g = torch.Generator().manual_seed(seed)
    x_TD, router_ED = torch.randn(T, 8, generator=g), torch.randn(E, 8, generator=g)
    if near_ties:  # logits within jitter of each other: the softmaxes then span several experts
        router_ED = router_ED * 0.01
    weights_TK, ids_TK = route(x_TD, router_ED, sparsemixer_spec(E, jitter))
    ref_weights, ref_ids = sparsemixer(x_TD @ router_ED.T, jitter_eps=jitter, training=False)
    assert torch.equal(ids_TK, ref_ids)
    torch.testing.assert_close(weights_TK, ref_weights, atol=1e-6, rtol=0)


def test_sparsemixer_weights_need_not_sum_to_one_and_its_ranking_is_the_logits():
    logits_TE = torch.tensor([[3.0, 2.99, -1.0, 2.0]])
    moe = sparsemixer_spec(4, 0.01)
    weights_TK, ids_TK = route(torch.eye(4)[None, 0] * 0 + logits_TE, torch.eye(4), moe)
    assert ids_TK.tolist() == [[0, 1]]
    # Choice 1 shares its softmax with expert 1 (within 2 % of it); choice 2 is alone once 0 is out.
    expected_first = torch.softmax(torch.tensor([3.0, 2.99]), dim=0)[0]
    torch.testing.assert_close(weights_TK[0], torch.stack((expected_first, torch.tensor(1.0))))
    assert torch.equal(selection_scores(logits_TE, moe.router), logits_TE)


def test_sparsemixer_needs_exactly_two_experts():
    with pytest.raises(ValueError, match="sparsemixer router chooses 2 experts"):
        MoESpec(num_experts=4, top_k=3, expert_ffn=4, router=RouterSpec(kind="sparsemixer"))


LONGROPE = RopeSpec(theta=10000.0, kind="longrope", original_max_position=16, factor=16.0,
                    short_factor=(1.0, 1.2, 1.5, 2.0), long_factor=(2.0, 3.0, 4.0, 6.0), short_mscale=1.1, long_mscale=1.3)


def test_longrope_frequencies_are_hfs_short_ones_and_the_scale_switches_past_the_pretraining_length():
    from transformers import PhimoeConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = PhimoeConfig(hidden_size=32, num_attention_heads=4, max_position_embeddings=256, rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": list(LONGROPE.short_factor),
        "long_factor": list(LONGROPE.long_factor), "original_max_position_embeddings": 16, "short_mscale": 1.1,
        "long_mscale": 1.3})
    ref_inv_freq, _ = ROPE_INIT_FUNCTIONS["longrope"](config)  # without a length: the short factors, as PhiMoE runs
    inv_freq, scaling = rope_inv_freq(LONGROPE, 8, max_position_embeddings=256)
    assert torch.equal(inv_freq, ref_inv_freq) and scaling == 1.1
    assert [rope_scaling_until(LONGROPE, end, scaling) for end in (1, 16, 17, 200)] == [1.1, 1.1, 1.3, 1.3]
    assert cache_rebuild_length(LONGROPE, scaling) == 16
    same = RopeSpec(theta=10000.0, kind="longrope", original_max_position=16, short_factor=(1.0,) * 4,
                    long_factor=(1.0,) * 4, short_mscale=1.2, long_mscale=1.2)
    assert cache_rebuild_length(same, 1.2) is None  # the scale never changes: nothing to recompute


def test_longrope_default_scale_is_longropes_formula():
    spec = RopeSpec(theta=10000.0, kind="longrope", original_max_position=16, factor=16.0,
                    short_factor=(1.0,) * 4, long_factor=(1.0,) * 4)
    _, scaling = rope_inv_freq(spec, 8)
    assert scaling == pytest.approx((1 + torch.log(torch.tensor(16.0)).item() / torch.log(torch.tensor(16.0)).item()) ** 0.5)
