"""The MoE block: route, ask an expert source for the routed experts, combine. Pure core.

    x_TD ─route─▶ (weights_TK, ids_TK) ─host─▶ experts needed ─ExpertSource─▶ segments ─▶ Σ_k w·ffn
                                                                                         + shared expert

The expert ids must reach the host once per layer (that is what decides which weights to touch,
and, in the offloading runtime, which to copy). `routing_to_host_sync` is the one place that
happens; its name warns that it waits for the device.

`ExpertSource` is the seam between the pure core and residency: the dense model hands out its
resident experts; the offloading runtime hands out cached tops plus freshly copied bottoms.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import attrs
import torch
import torch.nn.functional as F

from moepic.core.ffn import swiglu, swiglu_segments
from moepic.core.routing import route
from moepic.core.spec import MoESpec
from moepic.core.weights import ModelWeights, MoEWeights, SwiGLUWeights


class RoutingTap(Protocol):
    """Sees every routing decision and layer output of a forward pass (tracing, reports).

    A tap observes; it never changes numbers. It is an explicit argument, so the core stays a
    function of its inputs, and the default (None) costs nothing.
    """

    def routed(self, layer: int, router_input_TD: torch.Tensor, weights_TK: torch.Tensor, ids_TK: torch.Tensor) -> None:
        ...

    def layer_output(self, layer: int, x_TD: torch.Tensor) -> None:
        ...


class ExpertSource(Protocol):
    def experts_for(self, layer: int, expert_ids: Sequence[int]) -> Mapping[int, Sequence[SwiGLUWeights]]:
        """Each requested expert of `layer` as neuron segments that together cover all of F."""
        ...


@attrs.frozen
class ResidentExperts:
    """The dense, all-resident model: every expert is one segment already in place."""

    weights: ModelWeights

    def experts_for(self, layer: int, expert_ids: Sequence[int]) -> Mapping[int, Sequence[SwiGLUWeights]]:
        experts = self.weights.layers[layer].ffn.experts
        return {e: (experts[e],) for e in expert_ids}


def routing_to_host_sync(ids_TK: torch.Tensor) -> list[list[int]]:
    """The routed expert ids as Python ints. Waits for the device: once per MoE layer."""
    return ids_TK.tolist()


def combine_experts(
    x_TD: torch.Tensor,
    weights_TK: torch.Tensor,
    ids_per_token: list[list[int]],
    segments: Mapping[int, Sequence[SwiGLUWeights]],
) -> torch.Tensor:
    """Σ_k weights_TK[t, k] · expert_{ids[t][k]}(x_t), running each expert once on its tokens."""
    if len(ids_per_token) == 1:  # decode: one token, no gathering needed
        y_TD = None
        for k, e in enumerate(ids_per_token[0]):
            term = swiglu_segments(x_TD, segments[e]) * weights_TK[:, k : k + 1]
            y_TD = term if y_TD is None else y_TD + term
        return y_TD
    tokens_of: dict[int, tuple[list[int], list[int]]] = {}
    for t, ids in enumerate(ids_per_token):
        for k, e in enumerate(ids):
            token_list, slot_list = tokens_of.setdefault(e, ([], []))
            token_list.append(t)
            slot_list.append(k)
    y_TD = torch.zeros_like(x_TD)
    for e in sorted(tokens_of):
        token_list, slot_list = tokens_of[e]
        t_idx = torch.tensor(token_list, device=x_TD.device)
        k_idx = torch.tensor(slot_list, device=x_TD.device)
        out = swiglu_segments(x_TD[t_idx], segments[e]) * weights_TK[t_idx, k_idx].unsqueeze(-1)
        y_TD.index_add_(0, t_idx, out)
    return y_TD


def moe_block(
    x_TD: torch.Tensor,
    w: MoEWeights,
    moe: MoESpec,
    layer: int,
    experts: ExpertSource,
    tap: RoutingTap | None = None,
) -> torch.Tensor:
    weights_TK, ids_TK = route(x_TD, w.router_ED, moe)
    if tap is not None:
        tap.routed(layer, x_TD, weights_TK, ids_TK)
    ids_per_token = routing_to_host_sync(ids_TK)
    needed = sorted({e for ids in ids_per_token for e in ids})
    y_TD = combine_experts(x_TD, weights_TK, ids_per_token, experts.experts_for(layer, needed))
    if w.shared_expert is not None:
        shared_TD = swiglu(x_TD, w.shared_expert)
        if w.shared_expert_gate_1D is not None:
            shared_TD = torch.sigmoid(F.linear(x_TD, w.shared_expert_gate_1D)) * shared_TD
        y_TD = y_TD + shared_TD
    return y_TD
