"""Routers as registered strategies: softmax → top-k with and without renormalisation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moepic.core.routing import route, router_fn
from moepic.core.spec import MoESpec, RouterSpec


def _spec(E: int, K: int, renormalize: bool) -> MoESpec:
    return MoESpec(num_experts=E, top_k=K, expert_ffn=4, router=RouterSpec(renormalize=renormalize))


@given(E=st.integers(2, 16), data=st.data(), T=st.integers(1, 6), seed=st.integers(0, 2**16), renorm=st.booleans())
def test_router_picks_the_k_largest_logits_with_softmax_weights(E, data, T, seed, renorm):
    K = data.draw(st.integers(1, E))
    g = torch.Generator().manual_seed(seed)
    x_TD, router_ED = torch.randn(T, 8, generator=g), torch.randn(E, 8, generator=g)
    weights_TK, ids_TK = route(x_TD, router_ED, _spec(E, K, renorm))
    logits_TE = x_TD @ router_ED.T
    probs_TE = torch.softmax(logits_TE, -1)
    assert ids_TK.shape == weights_TK.shape == (T, K)
    for t in range(T):
        assert len(set(ids_TK[t].tolist())) == K  # distinct experts
        chosen = logits_TE[t, ids_TK[t]]
        others = logits_TE[t][~torch.isin(torch.arange(E), ids_TK[t])]
        assert others.numel() == 0 or chosen.min() >= others.max()
    expected = probs_TE.gather(1, ids_TK)
    if renorm:
        expected = expected / expected.sum(-1, keepdim=True)
        torch.testing.assert_close(weights_TK.sum(-1), torch.ones(T))
    torch.testing.assert_close(weights_TK, expected)


def test_weights_come_back_in_the_activation_dtype():
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    weights_TK, _ = route(x, torch.randn(4, 8, dtype=torch.bfloat16), _spec(4, 2, True))
    assert weights_TK.dtype == torch.bfloat16


def test_unknown_router_kind_lists_the_known_ones():
    with pytest.raises(ValueError, match="softmax_topk"):
        router_fn("sigmoid_grouped_nonexistent")
