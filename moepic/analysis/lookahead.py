"""Gate lookahead: predict layer l+1's experts from layer l's output with layer l+1's router.

A RoutingTap that, at each layer's output x, applies the next MoE layer's router to
rmsnorm(x) (the norm that layer applies before routing, skipping its attention) and keeps the top-k;
when that layer routes, it counts how many of the real experts were predicted. This is the
"next-layer gate" predictor of MoEpic, AdapMoE and Pre-gated MoE, measured rather than assumed.
Side effects: accumulates counts in host memory.
"""

from __future__ import annotations

import torch

from moepic.core.model import Model
from moepic.core.routing import residual_router_logits, selection_scores
from moepic.core.weights import MoEWeights


class GateLookaheadTap:
    def __init__(self, model: Model, *, candidates: int | None = None):
        self.model = model
        self.candidates = candidates or model.spec.moe.top_k
        self._predicted: dict[int, torch.Tensor] = {}
        self.hits: dict[int, int] = {}
        self.slots: dict[int, int] = {}

    def layer_output(self, layer: int, x_TD: torch.Tensor) -> None:
        following = layer + 1
        if following >= self.model.spec.num_layers or self.model.spec.layer_kinds[following] != "moe":
            return
        lw = self.model.weights.layers[following]
        assert isinstance(lw.ffn, MoEWeights)
        router = self.model.spec.moe.router
        logits_TE = residual_router_logits(x_TD, lw, self.model.spec)
        scores_TE = selection_scores(logits_TE, router, lw.ffn.router_bias_E)  # ranked as the router ranks them
        self._predicted[following] = scores_TE.topk(self.candidates, dim=-1).indices

    def routed(self, layer: int, router_input_TD: torch.Tensor, weights_TK: torch.Tensor, ids_TK: torch.Tensor) -> None:
        predicted = self._predicted.pop(layer, None)
        if predicted is None:
            return
        found = (ids_TK[:, :, None] == predicted[:, None, :]).any(-1)  # [T, K]
        self.hits[layer] = self.hits.get(layer, 0) + int(found.sum())
        self.slots[layer] = self.slots.get(layer, 0) + found.numel()

    def recall(self) -> dict[int, float]:
        """Per predicted MoE layer: the fraction of its routed experts that the lookahead named."""
        return {layer: self.hits[layer] / self.slots[layer] for layer in sorted(self.slots)}


class Taps:
    """Several taps as one."""

    def __init__(self, *taps):
        self.taps = taps

    def routed(self, *args) -> None:
        for tap in self.taps:
            tap.routed(*args)

    def layer_output(self, *args) -> None:
        for tap in self.taps:
            tap.layer_output(*args)
