"""The routers with groups or a selection-only bias (core/routing.py): DeepSeek-V2's group-limited
softmax, DeepSeek-V3's / GLM-4.5's biased sigmoid and ERNIE-4.5's biased softmax, against HF
transformers' own router modules, and as properties."""

from __future__ import annotations

import attrs
import pytest
import torch
from hypothesis import given, strategies as st

from moepic.core.routing import route, router_fn, router_logits, selection_scores
from moepic.core.spec import MoESpec, RouterSpec

KINDS = ("softmax_group_topk", "sigmoid_group_topk")


def moe(E: int, K: int, **router) -> MoESpec:
    return MoESpec(num_experts=E, top_k=K, expert_ffn=4, router=RouterSpec(**router))


def assert_same_routing(ours, hf) -> torch.Tensor:
    """(weights, ids) pairs equal up to the order of each token's k (HF's top-k is unsorted); the ids, sorted."""
    (w_ours, i_ours), (w_hf, i_hf) = (sorted_by_id(*pair) for pair in (ours, hf))
    assert torch.equal(i_ours, i_hf)
    torch.testing.assert_close(w_ours, w_hf, atol=1e-6, rtol=1e-6)
    return i_ours


def sorted_by_id(weights_TK, ids_TK):
    ids, order = ids_TK.sort(dim=-1)
    return weights_TK.gather(1, order), ids


@pytest.mark.parametrize("norm,scaling,groups,top_groups,k", [(True, 2.5, 4, 2, 4), (False, 1.0, 8, 3, 6), (True, 1.0, 1, 1, 2)])
def test_sigmoid_router_matches_hf_deepseek_v3(norm, scaling, groups, top_groups, k):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    config = DeepseekV3Config(hidden_size=32, n_routed_experts=16, n_group=groups, topk_group=top_groups,
                              num_experts_per_tok=k, norm_topk_prob=norm, routed_scaling_factor=scaling)
    hf = DeepseekV3TopkRouter(config)
    g = torch.Generator().manual_seed(k)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(16, 32, generator=g))
        hf.e_score_correction_bias.copy_(torch.randn(16, generator=g) * 0.3)
    x_TD = torch.randn(7, 32, generator=g)
    _, hf_weights, hf_ids = hf(x_TD)
    spec = moe(16, k, kind="sigmoid_group_topk", renormalize=norm, scaling=scaling, groups=groups, top_groups=top_groups,
               fp32_logits=True)
    weights, ids = route(x_TD, hf.weight.detach(), spec, hf.e_score_correction_bias)
    assert_same_routing((weights, ids), (hf_weights, hf_ids))


@pytest.mark.parametrize("method,groups,top_groups,k,scaling", [("group_limited_greedy", 4, 2, 3, 1.5), ("greedy", 1, 1, 2, 1.0),
                                                                 ("group_limited_greedy", 8, 1, 2, 16.0)])
def test_softmax_routers_match_hf_deepseek_v2(method, groups, top_groups, k, scaling):
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    config = DeepseekV2Config(hidden_size=32, n_routed_experts=16, n_group=groups, topk_group=top_groups,
                              num_experts_per_tok=k, topk_method=method, routed_scaling_factor=scaling)
    hf = DeepseekV2TopkRouter(config)
    g = torch.Generator().manual_seed(groups)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(16, 32, generator=g))
    x_TD = torch.randn(9, 32, generator=g)
    _, hf_weights, hf_ids = hf(x_TD)
    kind = "softmax_group_topk" if method == "group_limited_greedy" else "softmax_topk"
    # HF's DeepSeek-V2 router never renormalises (its configs say norm_topk_prob: false).
    spec = moe(16, k, kind=kind, renormalize=False, scaling=scaling, groups=groups, top_groups=top_groups, fp32_logits=True)
    weights, ids = route(x_TD, hf.weight.detach(), spec)
    assert_same_routing((weights, ids), (hf_weights, hf_ids))


@st.composite
def grouped_cases(draw):
    groups = draw(st.sampled_from([1, 2, 4, 8]))
    per_group = draw(st.integers(2, 6))
    top_groups = draw(st.integers(1, groups))
    k = draw(st.integers(1, top_groups * per_group))
    router = RouterSpec(kind=draw(st.sampled_from(KINDS)), renormalize=draw(st.booleans()),
                        scaling=draw(st.sampled_from([1.0, 2.5])), groups=groups, top_groups=top_groups)
    seed = draw(st.integers(0, 2**16))
    return router, groups * per_group, k, seed


@given(case=grouped_cases(), T=st.integers(1, 5), biased=st.booleans())
def test_grouped_routers_choose_the_best_experts_of_at_most_top_groups_groups(case, T, biased):
    router, E, k, seed = case
    g = torch.Generator().manual_seed(seed)
    logits_TE = torch.randn(T, E, generator=g)
    bias_E = torch.randn(E, generator=g) if biased and router.kind == "sigmoid_group_topk" else None
    weights_TK, ids_TK = router_fn(router.kind)(logits_TE, router, k, bias_E)
    scores_TE = selection_scores(logits_TE, router, bias_E)
    per_group = E // router.groups
    for t in range(T):
        ids = ids_TK[t].tolist()
        assert len(set(ids)) == k
        assert len({e // per_group for e in ids}) <= router.top_groups
        # The chosen rank first by the router's own selection score (what lookaheads rank by too).
        others = [e for e in range(E) if e not in ids]
        assert not others or scores_TE[t, ids].min() >= scores_TE[t, others].max()
    # Weights: the unbiased score of each chosen expert (softmax or sigmoid), renormalised, scaled.
    raw_TE = torch.softmax(logits_TE, -1) if router.kind == "softmax_group_topk" else torch.sigmoid(logits_TE)
    expected = raw_TE.gather(1, ids_TK)
    if router.renormalize:
        expected = expected / expected.sum(-1, keepdim=True)
    torch.testing.assert_close(weights_TK, expected * router.scaling)


@given(T=st.integers(1, 5), E=st.integers(2, 12), seed=st.integers(0, 2**16), data=st.data())
def test_one_group_softmax_routing_is_plain_softmax_top_k(T, E, seed, data):
    k = data.draw(st.integers(1, E))
    logits_TE = torch.randn(T, E, generator=torch.Generator().manual_seed(seed))
    plain = router_fn("softmax_topk")(logits_TE, RouterSpec(renormalize=False), k)
    grouped = router_fn("softmax_group_topk")(logits_TE, RouterSpec(kind="softmax_group_topk", renormalize=False), k)
    assert all(torch.equal(a, b) for a, b in zip(plain, grouped))


def test_the_bias_chooses_experts_but_never_weighs_them():
    router = RouterSpec(kind="sigmoid_group_topk", renormalize=False)
    logits_TE = torch.tensor([[2.0, 0.0, -1.0, -2.0]])
    assert router_fn(router.kind)(logits_TE, router, 1, None)[1].item() == 0
    weights_TK, ids_TK = router_fn(router.kind)(logits_TE, router, 1, torch.tensor([0.0, 0.0, 0.0, 5.0]))
    assert ids_TK.item() == 3 and weights_TK.item() == pytest.approx(torch.sigmoid(torch.tensor(-2.0)).item())


def test_logits_in_float32_where_the_router_asks():
    x_TD, router_ED = torch.randn(3, 8, dtype=torch.bfloat16), torch.randn(4, 8, dtype=torch.bfloat16)
    assert router_logits(x_TD, router_ED).dtype == torch.bfloat16
    assert router_logits(x_TD, router_ED, RouterSpec(fp32_logits=True)).dtype == torch.float32
    weights_TK, _ = route(x_TD, router_ED, moe(4, 2, kind="sigmoid_group_topk", fp32_logits=True))
    assert weights_TK.dtype == torch.bfloat16  # cast back to the activations' dtype


def test_group_settings_that_cannot_route_are_refused_naming_the_numbers():
    with pytest.raises(ValueError, match="top_groups \\(3\\) > groups \\(2\\)"):
        RouterSpec(groups=2, top_groups=3)
    with pytest.raises(ValueError, match="num_experts \\(10\\) is not a whole number of router groups \\(4\\)"):
        moe(10, 2, groups=4)
    with pytest.raises(ValueError, match="top_k \\(5\\) > the experts in the router's top_groups"):
        moe(16, 5, kind="softmax_group_topk", groups=4, top_groups=1)
    with pytest.raises(ValueError, match="scaling must be > 0"):
        RouterSpec(scaling=0.0)
    with pytest.raises(ValueError, match="unknown router kind 'noaux'"):
        selection_scores(torch.zeros(1, 4), attrs.evolve(RouterSpec(), kind="noaux"))


def test_biased_softmax_router_matches_hf_ernie():
    from transformers import Ernie4_5_MoeConfig
    from transformers.models.ernie4_5_moe.modeling_ernie4_5_moe import Ernie4_5_MoeTopKRouter

    hf = Ernie4_5_MoeTopKRouter(Ernie4_5_MoeConfig(hidden_size=32, moe_num_experts=12, moe_k=4))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(12, 32, generator=g))
        hf.moe_statics.e_score_correction_bias.copy_(torch.randn(1, 12, generator=g) * 0.2)
    x_TD = torch.randn(9, 32, generator=g)
    _, hf_weights, hf_ids = hf(x_TD)
    spec = moe(12, 4, kind="softmax_biased_topk", renormalize=True, fp32_logits=True)
    weights, ids = route(x_TD, hf.weight.detach(), spec, hf.moe_statics.e_score_correction_bias[0].detach())
    i_ours = assert_same_routing((weights, ids), (hf_weights, hf_ids))
    unbiased = route(x_TD, hf.weight.detach(), spec)[1]
    assert not torch.equal(unbiased.sort(-1).values, i_ours)  # the bias chose other experts somewhere
