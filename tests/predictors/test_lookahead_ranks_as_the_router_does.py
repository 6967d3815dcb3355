"""A lookahead ranks a layer's experts with that layer's own routing rule (core/routing.py
`selection_scores`): for a grouped sigmoid router with a selection bias, what it names is what the
router would choose, where the raw logits' top-k would name others."""

from __future__ import annotations

import attrs
import pytest
import torch

from moepic.analysis.lookahead import GateLookaheadTap
from moepic.checkpoint.load import load_model
from moepic.core.model import Model
from moepic.core.norms import block_norm, rms_norm
from moepic.core.routing import route
from moepic.core.spec import RouterSpec
from moepic.predictors.gate_lookahead import GateLookahead, GateLookaheadConfig
from moepic.runtime.random_model import MixtralShape, random_models

ROUTER = RouterSpec(kind="sigmoid_group_topk", renormalize=True, scaling=2.0, groups=4, top_groups=2)


def deepseek_routed_model() -> Model:
    shape = MixtralShape(layers=2, hidden=32, ffn=16, heads=4, kv_heads=2, vocab=50)
    _, model = random_models(shape, torch.device("cpu"), dense=False, dtype=torch.float32)
    g = torch.Generator().manual_seed(7)
    layers = tuple(attrs.evolve(lw, ffn=attrs.evolve(lw.ffn, router_ED=torch.randn(8, 32, generator=g),
                                                     router_bias_E=torch.randn(8, generator=g)))
                   for lw in model.weights.layers)
    spec = attrs.evolve(model.spec, moe=attrs.evolve(model.spec.moe, router=ROUTER))
    return Model.build(spec, attrs.evolve(model.weights, layers=layers))


def test_gate_lookahead_names_what_a_biased_grouped_router_routes_to():
    model = deepseek_routed_model()
    target = model.weights.layers[1].ffn
    x_TD = torch.randn(32, 32, generator=torch.Generator().manual_seed(0))
    named = GateLookahead(GateLookaheadConfig(), model).scores(0, 1, x_TD).topk(2, dim=-1).indices
    _, routed = route(x_TD, target.router_ED, model.spec.moe, target.router_bias_E)
    assert torch.equal(named.sort(-1).values, routed.sort(-1).values)
    by_logits = (x_TD @ target.router_ED.T).topk(2, dim=-1).indices  # what ranking the raw logits would name
    assert not torch.equal(by_logits.sort(-1).values, routed.sort(-1).values)


def test_the_routing_reports_lookahead_ranks_by_the_router_too():
    """The report's lookahead (a residual normalised as the next layer will) scores recall 1 when
    that layer routes on exactly that input."""
    model = deepseek_routed_model()
    lw = model.weights.layers[1]
    tap = GateLookaheadTap(model)
    x_TD = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    tap.layer_output(0, x_TD)
    router_input_TD = rms_norm(x_TD, lw.post_attention_norm_D, model.spec.norm_eps)
    weights_TK, ids_TK = route(router_input_TD, lw.ffn.router_ED, model.spec.moe, lw.ffn.router_bias_E)
    tap.routed(1, router_input_TD, weights_TK, ids_TK)
    assert tap.recall() == {1: 1.0}


@pytest.mark.parametrize("name", ["gpt_oss", "phimoe", "flex_olmo"])
def test_lookaheads_normalise_and_bias_as_the_layer_does(checkpoint_dir, name):
    """GPT-OSS's router has a bias on its logits, PhiMoE normalises with LayerNorm and its bias,
    FlexOlmo's router reads the raw residual (its norms follow each sublayer): a lookahead from a
    residual that the next layer routes on names exactly its experts."""
    model = load_model(checkpoint_dir(name), dtype=torch.float32)
    spec, lw = model.spec, model.weights.layers[1]
    x_TD = torch.randn(16, spec.hidden_size, generator=torch.Generator().manual_seed(2))
    router_input_TD = x_TD if spec.norm_placement == "post" else block_norm(
        x_TD, lw.post_attention_norm_D, lw.post_attention_norm_bias_D, spec.norm, spec.norm_eps)
    weights_TK, ids_TK = route(router_input_TD, lw.ffn.router_ED, spec.moe, lw.ffn.router_bias_E, lw.ffn.router_logit_bias_E)
    tap = GateLookaheadTap(model)
    tap.layer_output(0, x_TD)
    tap.routed(1, router_input_TD, weights_TK, ids_TK)
    assert tap.recall() == {1: 1.0}
    predictor = GateLookahead(GateLookaheadConfig(reads="layer_output"), model)
    named = predictor.scores(0, 1, x_TD).topk(spec.moe.top_k, dim=-1).indices
    assert torch.equal(named.sort(-1).values, ids_TK.sort(-1).values)


@pytest.mark.parametrize("name,norms", [("phimoe", "'layer', pre-norm"), ("flex_olmo", "'rms', post-norm")])
def test_rescaled_reads_are_refused_where_there_is_no_rmsnorm_before_the_ffn(checkpoint_dir, name, norms):
    model = load_model(checkpoint_dir(name), dtype=torch.float32)
    with pytest.raises(ValueError, match=f"rescales the weights of RMSNorms before the FFN; this model's norms are {norms}"):
        GateLookahead(GateLookaheadConfig(reads="rescaled"), model)
