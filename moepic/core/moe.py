"""The MoE block: route, ask an expert source for the routed experts, combine. Pure core.

    x_TD ─route─▶ (weights_TK, ids_TK) ─host─▶ ids per token ─ExpertSource─▶ (expert, segments)… ─▶ Σ_k w·ffn
                                                                                               + shared expert

The expert ids must reach the host once per layer (that is what decides which weights to touch,
and, in the offloading runtime, which to copy). `routing_to_host_sync` is the one place that
happens; its name warns that it waits for the device. Ids a source computes on the device for
itself (a prefetcher's predictions, `ExpertSource.lookahead`) travel in the same transfer.

`ExpertSource` is the seam between the pure core and residency: the dense model hands out its
resident experts; the offloading runtime (moepic/runtime/offload.py) sees the step's routing,
plans its cache and hands out each expert once it is on the device. It yields the experts one at
a time, so a source may reuse a staging buffer once the next expert is asked for. A segment may
also come back as its output (`SegmentOutput`), computed elsewhere (the host, where the weights
already are): the block adds it where it would have added the segment it computed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol

import attrs
import torch

from moepic.core import rows
from moepic.core.ffn import SegmentOutput, swiglu, swiglu_segments
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
    def begin_request(self) -> None:
        """A new request (prompt) starts: a source may reset per-request statistics."""
        ...

    def experts_for(
        self,
        layer: int,
        ids_per_token: Sequence[Sequence[int]],
        router_input_TD: torch.Tensor,
        lookahead_rows: list[list[int]] | None = None,
        *,
        decode: bool | None = None,
    ) -> Iterator[tuple[int, Iterable[SwiGLUWeights | SegmentOutput]]]:
        """Each expert that `ids_per_token` routes to, once, by ascending id, except that a source may
        hand out experts computed elsewhere last (so that work overlaps the block's own), as neuron
        segments that together cover all of F. Segments may be overwritten after the next expert is requested.
        A segment is weights (computed by the block) or a `SegmentOutput`: its output for the
        expert's tokens (those routed to it, in token order), [T_e, D], unweighted.
        `router_input_TD` is what the layer routed on; `lookahead_rows` is `lookahead(...)` on the host.
        `decode`: a decode step, one token of each of one or more sequences (None: one token is one)."""
        ...

    def after_layer(self, layer: int, x_TD: torch.Tensor) -> None:
        """Layer `layer`'s output (the residual stream), for sources that predict from it."""
        ...

    def lookahead(self, layer: int, router_input_TD: torch.Tensor) -> torch.Tensor | None:
        """Device-side ids [T, n] to read back together with this layer's routing (a prefetching
        source's predictions), so that they cost no host sync of their own; None if none."""
        ...


@attrs.frozen
class ResidentExperts:
    """The dense, all-resident model: every expert is one segment already in place."""

    weights: ModelWeights

    def begin_request(self) -> None:
        pass

    def after_layer(self, layer: int, x_TD: torch.Tensor) -> None:
        pass

    def lookahead(self, layer: int, router_input_TD: torch.Tensor) -> None:
        return None

    def experts_for(
        self, layer: int, ids_per_token: Sequence[Sequence[int]], router_input_TD: torch.Tensor, lookahead_rows=None,
        *, decode: bool | None = None,
    ) -> Iterator[tuple[int, Sequence[SwiGLUWeights]]]:
        experts = self.weights.layers[layer].ffn.experts
        return ((e, (experts[e],)) for e in sorted({e for ids in ids_per_token for e in ids}))


def routing_to_host_sync(
    ids_TK: torch.Tensor, extra_TN: torch.Tensor | None = None
) -> tuple[list[list[int]], list[list[int]] | None]:
    """The routed expert ids as Python ints, and `extra_TN` (more ids the source wants, e.g. its
    predictions) read in the same transfer. Waits for the device: once per MoE layer."""
    if extra_TN is None:
        return ids_TK.tolist(), None
    rows = torch.cat((ids_TK, extra_TN.to(ids_TK.dtype)), dim=1).tolist()
    K = ids_TK.shape[1]
    return [row[:K] for row in rows], [row[K:] for row in rows]


def combine_experts(
    x_TD: torch.Tensor,
    weights_TK: torch.Tensor,
    ids_per_token: list[list[int]],
    experts: Iterable[tuple[int, Iterable[SwiGLUWeights | SegmentOutput]]],
    down_bias_ED: torch.Tensor | None = None,
    *,
    rowwise: bool = False,
) -> torch.Tensor:
    """Σ_k weights_TK[t, k] · expert_{ids[t][k]}(x_t), running each expert once on its tokens,
    in the order `experts` yields them (the sum's order, so dense and offloaded runs agree).
    An expert's down bias (`down_bias_ED[e]`) joins its segments' sum once, before the weighting.
    `rowwise`: each token computed as it would be alone (tokens of different sequences: core/rows.py);
    a token's sum runs over its experts in the same order either way."""

    def expert_output(e: int, x_TD: torch.Tensor, segments) -> torch.Tensor:
        y_TD = swiglu_segments(x_TD, segments, rowwise=rowwise)
        return y_TD if down_bias_ED is None else y_TD + down_bias_ED[e]

    if len(ids_per_token) == 1:  # decode: one token, no gathering needed
        slot_of = {e: k for k, e in enumerate(ids_per_token[0])}
        y_TD = None
        for e, segments in experts:
            k = slot_of[e]
            term = expert_output(e, x_TD, segments) * weights_TK[:, k : k + 1]
            y_TD = term if y_TD is None else y_TD + term
        return y_TD
    tokens_of: dict[int, tuple[list[int], list[int]]] = {}
    for t, ids in enumerate(ids_per_token):
        for k, e in enumerate(ids):
            token_list, slot_list = tokens_of.setdefault(e, ([], []))
            token_list.append(t)
            slot_list.append(k)
    y_TD = torch.zeros_like(x_TD)
    for e, segments in experts:
        token_list, slot_list = tokens_of[e]
        t_idx = torch.tensor(token_list, device=x_TD.device)
        k_idx = torch.tensor(slot_list, device=x_TD.device)
        out = expert_output(e, x_TD[t_idx], segments) * weights_TK[t_idx, k_idx].unsqueeze(-1)
        y_TD.index_add_(0, t_idx, out)
    return y_TD


def moe_block(
    x_TD: torch.Tensor,
    w: MoEWeights,
    moe: MoESpec,
    layer: int,
    experts: ExpertSource,
    tap: RoutingTap | None = None,
    *,
    rowwise: bool = False,
) -> torch.Tensor:
    """The block's output for `x_TD`; `rowwise`: its tokens come from different sequences, and each
    is computed exactly as it would be alone (core/rows.py)."""
    weights_TK, ids_TK = route(x_TD, w.router_ED, moe, w.router_bias_E, w.router_logit_bias_E, rowwise=rowwise)
    if tap is not None:
        tap.routed(layer, x_TD, weights_TK, ids_TK)
    ids_per_token, lookahead_rows = routing_to_host_sync(ids_TK, experts.lookahead(layer, x_TD))
    expert_in_TD = x_TD
    if moe.router.weighs_input:
        # Llama-4: the (single) expert sees its input times its weight, and its output joins as is.
        # The source gets that input too (what it computes on the host, or predicts from: a positive
        # scale of the input does not change an unbiased router's ranking).
        expert_in_TD, weights_TK = x_TD * weights_TK, torch.ones_like(weights_TK)
    # A batch's decode step (rowwise: one token of each of several sequences) is a decode step too.
    routed = experts.experts_for(layer, ids_per_token, expert_in_TD, lookahead_rows, decode=rowwise or len(ids_per_token) == 1)
    y_TD = combine_experts(expert_in_TD, weights_TK, ids_per_token, routed, w.expert_down_bias_ED, rowwise=rowwise)
    if w.shared_expert is not None:
        shared_TD = swiglu(x_TD, w.shared_expert, rowwise=rowwise)
        if w.shared_expert_gate_1D is not None:
            shared_TD = torch.sigmoid(rows.linear(x_TD, w.shared_expert_gate_1D, rowwise=rowwise)) * shared_TD
        y_TD = y_TD + shared_TD
    return y_TD
