"""Per-layer routing statistics from a RoutingTrace. Pure (numpy).

What a real MoE shows and a random router does not: skewed expert load (the busiest expert and the
top quarter take more than their share), but no dead experts; reuse of the previous token's
experts above the random rate; and a next layer that is predictable from the current one.
"""

from __future__ import annotations

import attrs
import numpy as np

from moepic.tracing.trace import RoutingTrace


@attrs.frozen(kw_only=True)
class LayerLoad:
    layer: int
    busiest_share: float  # fraction of the layer's routing slots taken by its busiest expert
    top_quarter_share: float  # … by its top 25 % of experts (at least one)
    min_share: float  # … by its least used expert (0: a dead expert)
    reuse: float  # mean fraction of a token's experts that the previous token of its sequence also used
    reuse_random: float  # the same for a uniformly random router: K / E


def expert_shares(trace: RoutingTrace) -> np.ndarray:
    """[L, E]: each expert's fraction of its layer's routing slots."""
    N, L, K = trace.expert_ids_NLK.shape
    counts = np.zeros((L, trace.num_experts))
    for column in range(L):
        counts[column] = np.bincount(trace.expert_ids_NLK[:, column].ravel(), minlength=trace.num_experts)
    return counts / max(N * K, 1)


def consecutive_reuse(trace: RoutingTrace) -> np.ndarray:
    """[L]: mean |experts(t) ∩ experts(t-1)| / K over consecutive tokens of the same sequence."""
    ids = trace.expert_ids_NLK
    same_sequence = trace.sequence_N[1:] == trace.sequence_N[:-1]
    consecutive = trace.position_N[1:] == trace.position_N[:-1] + 1
    pairs = same_sequence & consecutive
    if not pairs.any():
        return np.full(ids.shape[1], np.nan)
    now, before = ids[1:][pairs], ids[:-1][pairs]  # [P, L, K]
    shared = (now[..., :, None] == before[..., None, :]).any(-1).sum(-1)  # [P, L]
    return shared.mean(0) / trace.top_k


def layer_loads(trace: RoutingTrace) -> list[LayerLoad]:
    shares = expert_shares(trace)
    reuse = consecutive_reuse(trace)
    quarter = max(1, trace.num_experts // 4)
    loads = []
    for column, layer in enumerate(trace.moe_layers):
        ranked = np.sort(shares[column])[::-1]
        loads.append(
            LayerLoad(
                layer=layer,
                busiest_share=float(ranked[0]),
                top_quarter_share=float(ranked[:quarter].sum()),
                min_share=float(ranked[-1]),
                reuse=float(reuse[column]),
                reuse_random=trace.top_k / trace.num_experts,
            )
        )
    return loads


def most_popular_recall(trace: RoutingTrace) -> np.ndarray:
    """[L]: recall of always predicting each layer's K most used experts (a static-cache baseline)."""
    if trace.num_tokens == 0:
        return np.full(len(trace.moe_layers), np.nan)
    shares = expert_shares(trace)
    top = np.argsort(-shares, axis=1, kind="stable")[:, : trace.top_k]  # [L, K]
    hits = (trace.expert_ids_NLK[..., :, None] == top[None, :, None, :]).any(-1)  # [N, L, K]
    return hits.mean(axis=(0, 2))
