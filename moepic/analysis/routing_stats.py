"""Per-layer routing statistics from a RoutingTrace. Pure (numpy).

What a real MoE shows and a random router does not: skewed expert load (the busiest expert and the
top quarter take more than their share), but no dead experts; reuse of the previous token's
experts above the random rate; and a next layer that is predictable from the current one.
The rank hit curves say what LRU and LFU caches of C whole experts hit, without a replay (synthetic
traces are fitted to them).
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


def _rank_hit_curves(key_NLE: np.ndarray, ids_NLK: np.ndarray, cached_NLK: np.ndarray) -> np.ndarray:
    """[L, E-1]: the mean, over routed experts, of P(its key is among the C largest), C = 1..E-1.

    An expert with a = keys strictly above its own and m equal keys (itself included) is one of
    the C largest in a share clip((C - a) / m, 0, 1) of tie orders; `cached_NLK` False: never held.
    """
    E = key_NLE.shape[-1]
    own_NLK = np.take_along_axis(key_NLE, ids_NLK, axis=-1)
    above_NLK = (key_NLE[:, :, None, :] > own_NLK[..., None]).sum(-1)
    ties_NLK = (key_NLE[:, :, None, :] == own_NLK[..., None]).sum(-1)
    if not len(ids_NLK):
        return np.full((ids_NLK.shape[1], E - 1), np.nan)
    curves = [(np.clip((C - above_NLK) / ties_NLK, 0.0, 1.0) * cached_NLK).mean(axis=(0, 2)) for C in range(1, E)]
    return np.stack(curves, axis=1)


def _before(trace: RoutingTrace) -> tuple[np.ndarray, np.ndarray]:
    """[N, L, E] each: uses of every expert before token n, and the token of its latest use (-1: none)."""
    N, L, _ = trace.expert_ids_NLK.shape
    used_NLE = np.zeros((N, L, trace.num_experts), dtype=np.int64)
    np.put_along_axis(used_NLE, trace.expert_ids_NLK, 1, axis=-1)
    counts_NLE = np.cumsum(used_NLE, axis=0) - used_NLE
    last_NLE = np.maximum.accumulate(np.where(used_NLE > 0, np.arange(N)[:, None, None], -1), axis=0)
    last_NLE = np.concatenate([np.full((min(N, 1), L, trace.num_experts), -1), last_NLE[:-1]])
    return counts_NLE, last_NLE


def recency_hit_curve(trace: RoutingTrace) -> np.ndarray:
    """[L, E-1]: the share of routed experts that were among the C most recently used ones of their
    layer (C = 1..E-1), over the whole trace in order. This is what an LRU cache of C whole experts
    hits, up to how it breaks ties within one step; the reuse-distance distribution, seen by LRU."""
    _, last_NLE = _before(trace)
    ids = trace.expert_ids_NLK
    return _rank_hit_curves(last_NLE, ids, np.take_along_axis(last_NLE, ids, -1) >= 0)


def frequency_hit_curve(trace: RoutingTrace) -> np.ndarray:
    """[L, E-1]: the same for the C most often used experts so far, ties to the more recent: what an
    LFU cache of C whole experts hits (for a stationary router: the top C experts' share)."""
    counts_NLE, last_NLE = _before(trace)
    key_NLE = counts_NLE + (last_NLE + 1) / (np.arange(len(counts_NLE))[:, None, None] + 2)
    ids = trace.expert_ids_NLK
    return _rank_hit_curves(key_NLE, ids, np.take_along_axis(counts_NLE, ids, -1) > 0)


def next_layer_predictability(trace: RoutingTrace) -> np.ndarray:
    """[L]: recall of predicting each MoE layer's K experts from the previous layer's through the
    trace's own co-occurrence table (in sample); NaN for the first layer, which has none before it."""
    N, L, K = trace.expert_ids_NLK.shape
    onehot_NLE = np.zeros((N, L, trace.num_experts))
    np.put_along_axis(onehot_NLE, trace.expert_ids_NLK, 1.0, axis=-1)
    out = np.full(L, np.nan)
    for column in range(1, L if N else 1):
        before_NE, now_NE = onehot_NLE[:, column - 1], onehot_NLE[:, column]
        table_EE = before_NE.T @ now_NE
        table_EE /= np.maximum(table_EE.sum(1, keepdims=True), 1)  # P(next expert | previous expert)
        guess_NK = np.argsort(-(before_NE @ table_EE), axis=1, kind="stable")[:, :K]
        out[column] = np.take_along_axis(now_NE, guess_NK, 1).sum() / (N * K)
    return out
