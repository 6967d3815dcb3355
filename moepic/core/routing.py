"""Routers: router logits → (weights_TK, ids_TK). Pure, registered by kind.

Each architecture's routing rule is a named strategy, so a new rule (DeepSeek's group-limited or
sigmoid routers) is one function plus one registry line. Probabilities are computed in float32
as the reference implementations do, then the weights are cast to the activations' dtype.
A router's logits are computed here only (`router_logits`): the routing itself and every
lookahead that guesses a later layer's experts from an earlier hidden state go through it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from moepic.core.norms import rms_norm
from moepic.core.spec import MoESpec, RouterSpec

RouterFn = Callable[[torch.Tensor, RouterSpec, int], tuple[torch.Tensor, torch.Tensor]]


def softmax_topk(logits_TE: torch.Tensor, router: RouterSpec, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax over all experts → top-k → optional renormalisation (Mixtral, Qwen-MoE, OLMoE)."""
    probs_TE = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
    weights_TK, ids_TK = torch.topk(probs_TE, top_k, dim=-1)
    if router.renormalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return weights_TK, ids_TK


ROUTERS: dict[str, RouterFn] = {"softmax_topk": softmax_topk}


def router_fn(kind: str) -> RouterFn:
    try:
        return ROUTERS[kind]
    except KeyError:
        raise ValueError(f"unknown router kind {kind!r}; known: {', '.join(sorted(ROUTERS))}") from None


def router_logits(x_TD: torch.Tensor, router_ED: torch.Tensor) -> torch.Tensor:
    """[T, E] in x's dtype: the router's score of every expert for router inputs `x_TD`, before the
    routing rule turns them into weights."""
    return F.linear(x_TD, router_ED)


def residual_router_logits(residual_TD: torch.Tensor, norm_D: torch.Tensor, router_ED: torch.Tensor, eps: float) -> torch.Tensor:
    """[T, E]: a layer's router logits for a residual stream, normalised with that layer's pre-FFN
    norm weight `norm_D` as the layer would (its attention skipped): what a lookahead from an
    earlier layer's output guesses that layer's experts by."""
    return router_logits(rms_norm(residual_TD, norm_D, eps), router_ED)


def route(x_TD: torch.Tensor, router_ED: torch.Tensor, moe: MoESpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights_TK in x's dtype, ids_TK int64) for every token."""
    logits_TE = router_logits(x_TD, router_ED)
    weights_TK, ids_TK = router_fn(moe.router.kind)(logits_TE, moe.router, moe.top_k)
    return weights_TK.to(x_TD.dtype), ids_TK
