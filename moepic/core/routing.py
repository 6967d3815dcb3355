"""Routers: router logits → (weights_TK, ids_TK). Pure, registered by kind.

Each architecture's routing rule is a named strategy, so a new rule (DeepSeek's group-limited or
sigmoid routers) is one function plus one registry line. Probabilities are computed in float32
as the reference implementations do, then the weights are cast to the activations' dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

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


def route(x_TD: torch.Tensor, router_ED: torch.Tensor, moe: MoESpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights_TK in x's dtype, ids_TK int64) for every token."""
    logits_TE = F.linear(x_TD, router_ED)
    weights_TK, ids_TK = router_fn(moe.router.kind)(logits_TE, moe.router, moe.top_k)
    return weights_TK.to(x_TD.dtype), ids_TK
