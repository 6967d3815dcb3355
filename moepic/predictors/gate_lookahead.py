"""Gate lookahead: the next layers' routers applied to the current layer's router input. Pure.

The cheapest predictor that works (MoEpic, AdapMoE, Pre-gated MoE): layer l's router input is close
to what layer l+1's router will see, so layer l+1's router on it names most of layer l+1's experts
(the bundled model: 68–86 % recall at k′ = k). What it reads (`reads`):
- `router_input`: layer l's router input as it is (normalised with layer l's norm weight);
- `rescaled`: the same hidden state with the *target* layer's norm weight instead, i.e. the target
  router applied to rmsnorm(layer l's residual) the way the target layer will normalise it;
- `layer_output`: layer l's output (after its experts), normalised with the target's norm weight.
  The most accurate (it includes layer l's experts: 86 % vs 31 % recall into the bundled model's
  second MoE layer), but known later, so its copies overlap only the next layer's attention.
"""

from __future__ import annotations

from typing import Literal

import attrs
import torch

from moepic.core.model import Model
from moepic.core.routing import residual_router_logits, router_logits, selection_scores
from moepic.core.weights import MoEWeights
from moepic.predictors.base import PredictorConfig, ScoringPredictor, at_least_one, check_horizon, layers_ahead, register_predictor


@attrs.frozen(kw_only=True)
class GateLookaheadConfig(PredictorConfig):
    # k′: experts prefetched per token and layer (default: the model's top-k).
    candidates: int | None = attrs.field(default=None, validator=at_least_one)
    horizon: int = attrs.field(default=1, validator=check_horizon)  # MoE layers ahead: 1–3
    reads: Literal["router_input", "rescaled", "layer_output"] = "router_input"

    needs_router_inputs = True


@register_predictor("gate_lookahead", GateLookaheadConfig)
class GateLookahead(ScoringPredictor):
    def __init__(self, config: GateLookaheadConfig, model: Model) -> None:
        self.config = config
        self.horizon = config.horizon
        self.candidates = config.prefetch_shape(model.spec.moe.top_k).candidates
        self.num_experts = model.spec.moe.num_experts
        self.hidden_size = model.spec.hidden_size
        self.device, self.dtype = model.device, model.dtype
        self.reads = "layer_output" if config.reads == "layer_output" else "router_input"
        self.spec = model.spec
        self.router = model.spec.moe.router
        moe_layers = model.spec.moe_layers
        self.targets = layers_ahead(moe_layers, model.spec.num_layers, config.horizon)
        self.moe = {l: model.weights.layers[l] for l in moe_layers}
        # rescaled: x·(w_target / w_source), precomputed per (source, target) pair
        self.rescale = {}
        if config.reads == "rescaled":
            if model.spec.norm != "rms" or model.spec.norm_placement != "pre":
                raise ValueError("gate_lookahead reads 'rescaled' rescales the weights of RMSNorms before the FFN; this "
                                 f"model's norms are {model.spec.norm!r}, {model.spec.norm_placement}-norm: use reads "
                                 "'router_input' or 'layer_output'")
            for source in moe_layers:
                targets = self.targets[source]
                w_source = self.moe[source].post_attention_norm_D
                if bool((w_source == 0).any()):
                    raise ValueError(f"layer {source}'s norm weight has zeros: the rescaled read point cannot undo it")
                for target in targets:
                    self.rescale[source, target] = self.moe[target].post_attention_norm_D / w_source

    def scores(self, layer: int, target: int, hidden_TD: torch.Tensor) -> torch.Tensor:
        """The target router's own ranking (core/routing.py `selection_scores`: groups, biases
        and all) of every expert, for this hidden state."""
        ffn = self.moe[target].ffn
        assert isinstance(ffn, MoEWeights)
        if self.config.reads == "layer_output":
            logits_TE = residual_router_logits(hidden_TD, self.moe[target], self.spec)
        else:
            x_TD = hidden_TD * self.rescale[layer, target] if self.rescale else hidden_TD
            logits_TE = router_logits(x_TD, ffn.router_ED, self.router, ffn.router_logit_bias_E)
        return selection_scores(logits_TE, self.router, ffn.router_bias_E)
