"""Routers: router logits → (weights_TK, ids_TK). Pure, registered by kind.

Each architecture's routing rule is a named strategy, so a new rule is one function plus one
registry line:

    softmax_topk        softmax over all experts → top-k                      Mixtral, Qwen-MoE, OLMoE,
                                                                              DeepSeek-V2 `greedy`
    softmax_group_topk  softmax → the `top_groups` groups with the highest     DeepSeek-V2
                        expert probability → top-k within them                 `group_limited_greedy`
    sigmoid_group_topk  sigmoid scores; a selection-only bias added to choose  DeepSeek-V3, GLM-4.5
                        (never to weigh); groups ranked by their top-2 sum     (`noaux_tc`)
    softmax_biased_topk softmax probabilities + a selection-only bias          ERNIE-4.5
    sparsemixer         the best logit, then the best of the rest; each        PhiMoE
                        weighted by a softmax over the logits near it
    sigmoid_topk        top-k of the logits, weighted by their sigmoid         Llama-4 (which weighs the
                                                                              expert's input: MoESpec)

then optional renormalisation and the routed scaling factor. Probabilities are computed in float32
as the reference implementations do, then the weights are cast to the activations' dtype.

A router's logits are computed here only (`router_logits`), and which experts it would choose is
decided here only (`selection_scores`): the routing itself and every lookahead that guesses a later
layer's experts from an earlier hidden state go through them, so a biased sigmoid router is
predicted as it routes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moepic.core import rows
from moepic.core.norms import block_norm
from moepic.core.spec import ModelSpec, MoESpec, RouterSpec
from moepic.core.weights import LayerWeights

# (logits_TE float32, router, top_k, selection bias_E or None) → (weights_TK float32, ids_TK)
RouterFn = Callable[[torch.Tensor, RouterSpec, int, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]


def _grouped(scores_TE: torch.Tensor, router: RouterSpec, group_score: Callable[[torch.Tensor], torch.Tensor],
             masked: float) -> torch.Tensor:
    """`scores_TE` with every expert outside each token's `top_groups` best groups set to `masked`."""
    T, E = scores_TE.shape
    by_group_TGe = scores_TE.view(T, router.groups, E // router.groups)
    best_TG = torch.topk(group_score(by_group_TGe), router.top_groups, dim=-1, sorted=False).indices
    keep_TG = torch.zeros(T, router.groups, dtype=torch.bool, device=scores_TE.device).scatter_(1, best_TG, True)
    return scores_TE.masked_fill(~keep_TG.repeat_interleave(E // router.groups, dim=1), masked)


def selection_scores(logits_TE: torch.Tensor, router: RouterSpec, bias_E: torch.Tensor | None = None) -> torch.Tensor:
    """[T, E] float32: what the router ranks experts by; its top-k are the experts it routes to
    (experts outside a token's chosen groups rank last). Lookaheads rank by it too."""
    kind = router.kind
    if kind == "softmax_topk":
        return torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
    if kind == "softmax_group_topk":
        probs_TE = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
        # Masked to 0, as DeepSeek-V2 does (every kept probability is above it).
        return _grouped(probs_TE, router, lambda g: g.max(dim=-1).values, 0.0)
    if kind == "softmax_biased_topk":
        probs_TE = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
        return probs_TE + bias_E.float() if bias_E is not None else probs_TE
    if kind in ("sparsemixer", "sigmoid_topk"):  # rank by logit (SparseMixer: the best, then the next)
        return logits_TE.float()
    if kind == "sigmoid_group_topk":
        choice_TE = torch.sigmoid(logits_TE.float())
        if bias_E is not None:
            choice_TE = choice_TE + bias_E.float()
        return _grouped(choice_TE, router, lambda g: g.topk(2, dim=-1).values.sum(dim=-1), float("-inf"))
    raise ValueError(f"unknown router kind {kind!r}; known: {', '.join(sorted(ROUTERS))}")


def _finish(weights_TK: torch.Tensor, router: RouterSpec, eps: float = 0.0) -> torch.Tensor:
    if router.renormalize:
        weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + eps)
    return weights_TK * router.scaling if router.scaling != 1.0 else weights_TK


def probability_topk(logits_TE, router, top_k, bias_E=None):
    """The top-k of the softmax probabilities (within the chosen groups, for the grouped kind),
    weighted by them (→ renormalised → scaled)."""
    weights_TK, ids_TK = torch.topk(selection_scores(logits_TE, router), top_k, dim=-1)
    return _finish(weights_TK, router), ids_TK


def softmax_biased_topk(logits_TE, router, top_k, bias_E=None):
    """ERNIE-4.5's: chosen by softmax probability + bias, weighted by the probability alone
    (renormalised; ERNIE's floor on the sum, 1e-12, is below any k probabilities' sum)."""
    ids_TK = torch.topk(selection_scores(logits_TE, router, bias_E), top_k, dim=-1).indices
    weights_TK = torch.softmax(logits_TE, dim=-1, dtype=torch.float32).gather(1, ids_TK)
    return _finish(weights_TK, router), ids_TK


def sigmoid_group_topk(logits_TE, router, top_k, bias_E=None):
    """DeepSeek-V3's `noaux_tc`: chosen by sigmoid score + bias within the best groups, weighted by
    the sigmoid score alone (renormalised with DeepSeek's 1e-20 guard)."""
    ids_TK = torch.topk(selection_scores(logits_TE, router, bias_E), top_k, dim=-1).indices
    weights_TK = torch.sigmoid(logits_TE.float()).gather(1, ids_TK)
    return _finish(weights_TK, router, eps=1e-20), ids_TK


def sparsemixer(logits_TE, router, top_k, bias_E=None):
    """PhiMoE's SparseMixer at inference, as HF computes it: choice 1 is the best expert, weighted by
    a softmax over the experts whose logit is within 2·jitter_eps (relative) of the best; choice 2
    the best of the others, weighted by a softmax over those near it, choice 1 left out. No
    renormalisation: the two weights need not sum to 1."""
    scores_TE = logits_TE.float()
    weights, ids = [], []
    masked_TE = scores_TE
    for _ in range(2):
        best_T1, choice_T1 = masked_TE.max(dim=-1, keepdim=True)
        # Distance from the best, relative to the larger magnitude (HF compares against the raw scores).
        far_TE = (best_T1 - scores_TE) / scores_TE.abs().clamp(min=best_T1) > 2 * router.jitter_eps
        weights.append(torch.softmax(masked_TE.masked_fill(far_TE, float("-inf")), dim=-1).gather(1, choice_T1))
        ids.append(choice_T1)
        masked_TE = masked_TE.scatter(1, choice_T1, float("-inf"))
    return torch.cat(weights, dim=1), torch.cat(ids, dim=1)


def sigmoid_topk(logits_TE, router, top_k, bias_E=None):
    """Llama-4's: the top-k logits, each weighted by its sigmoid (not renormalised)."""
    top_TK, ids_TK = torch.topk(logits_TE, top_k, dim=-1)
    return _finish(torch.sigmoid(top_TK.float()), router), ids_TK


ROUTERS: dict[str, RouterFn] = {
    "softmax_topk": probability_topk,
    "softmax_group_topk": probability_topk,
    "sigmoid_group_topk": sigmoid_group_topk,
    "softmax_biased_topk": softmax_biased_topk,
    "sparsemixer": sparsemixer,
    "sigmoid_topk": sigmoid_topk,
}


def router_fn(kind: str) -> RouterFn:
    try:
        return ROUTERS[kind]
    except KeyError:
        raise ValueError(f"unknown router kind {kind!r}; known: {', '.join(sorted(ROUTERS))}") from None


def router_logits(
    x_TD: torch.Tensor, router_ED: torch.Tensor, router: RouterSpec | None = None, logit_bias_E: torch.Tensor | None = None,
    *, rowwise: bool = False,
) -> torch.Tensor:
    """[T, E]: the router's score of every expert for router inputs `x_TD`, before the routing rule
    turns them into weights: in x's dtype, or float32 where the router asks (`fp32_logits`);
    `logit_bias_E`: a bias on the logits themselves (GPT-OSS's), where the router has one.
    `rowwise`: each token scored as it would be alone (core/rows.py)."""
    if router is not None and router.fp32_logits:
        return rows.linear(x_TD.float(), router_ED.float(), None if logit_bias_E is None else logit_bias_E.float(),
                           rowwise=rowwise)
    return rows.linear(x_TD, router_ED, logit_bias_E, rowwise=rowwise)


def residual_router_logits(residual_TD: torch.Tensor, layer: LayerWeights, spec: ModelSpec) -> torch.Tensor:
    """[T, E]: MoE layer `layer`'s router logits for a residual stream, normalised with that layer's
    pre-FFN norm as the layer would (its attention skipped; a post-norm layer routes on the residual
    itself): what a lookahead from an earlier layer's output guesses that layer's experts by."""
    x_TD = residual_TD if spec.norm_placement == "post" else block_norm(
        residual_TD, layer.post_attention_norm_D, layer.post_attention_norm_bias_D, spec.norm, spec.norm_eps)
    return router_logits(x_TD, layer.ffn.router_ED, spec.moe.router, layer.ffn.router_logit_bias_E)


def route(
    x_TD: torch.Tensor, router_ED: torch.Tensor, moe: MoESpec, bias_E: torch.Tensor | None = None,
    logit_bias_E: torch.Tensor | None = None, *, rowwise: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights_TK in x's dtype, ids_TK int64) for every token; `bias_E`: the layer's selection-only
    bias; `logit_bias_E`: its bias on the logits; `rowwise`: as `router_logits`."""
    logits_TE = router_logits(x_TD, router_ED, moe.router, logit_bias_E, rowwise=rowwise)
    rule = router_fn(moe.router.kind)
    if rowwise and x_TD.shape[0] > 1:  # its sums and softmaxes over a few experts, one token at a time
        weights, ids = zip(*(rule(row_1E, moe.router, moe.top_k, bias_E) for row_1E in rows.each(logits_TE)))
        weights_TK, ids_TK = torch.cat(weights), torch.cat(ids)
    else:
        weights_TK, ids_TK = rule(logits_TE, moe.router, moe.top_k, bias_E)
    return weights_TK.to(x_TD.dtype), ids_TK
