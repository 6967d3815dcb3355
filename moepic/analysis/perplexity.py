"""Perplexity of a model on a token sequence, and its next-token predictions. Side effects: none
but a progress bar.

The text is cut into windows of `window` tokens (the last may be shorter), each scored from an
empty cache: a window of L tokens predicts its L − 1 successors. No window overlaps another, so
every predicted token counts once; the first token of each window is context only. Through an
offloading engine (`experts`), a window is fed a token at a time, as generation feeds it.
"""

from __future__ import annotations

import math

import attrs
import torch

from moepic.core.model import KVCache, Model, forward
from moepic.core.moe import ExpertSource
from moepic.progress import bar


@attrs.frozen
class Scored:
    nll: float  # summed negative log-likelihood (nats) of the predicted tokens
    tokens: int  # how many tokens were predicted
    predictions: torch.Tensor  # [tokens] int64: each position's most likely next token

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)

    def agreement(self, other: Scored) -> float:
        """Share of positions where both predict the same next token (top-1 agreement)."""
        if other.tokens != self.tokens:
            raise ValueError(f"scored {self.tokens} tokens against {other.tokens}: not the same text")
        return float((self.predictions == other.predictions).float().mean())


@torch.inference_mode()
def score(
    model: Model, ids: list[int], window: int, *, desc: str = "scoring", progress: bool = True,
    experts: ExpertSource | None = None,
) -> Scored:
    """`ids` scored window by window. With `experts` (an offloading engine), each window is fed one
    token at a time, as decoding feeds it, each a request of its own: what a cache sees while
    generating (a window at once would route every expert of a layer in one step)."""
    if len(ids) < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {len(ids)}")
    if window < 2:
        raise ValueError(f"a scoring window holds at least 2 tokens, got {window}")
    starts = [s for s in range(0, len(ids), window) if len(ids) - s >= 2]
    nll, count, predictions = 0.0, 0, []
    cache = KVCache.allocate(model, window)
    for start in bar(starts, desc=desc, unit="window", wanted=progress):
        chunk_T = torch.tensor(ids[start : start + window], device=model.device)
        if experts is None:
            logits_TV, _ = forward(model, chunk_T, attrs.evolve(cache, length=0))
        else:
            logits_TV = _token_by_token(model, chunk_T, attrs.evolve(cache, length=0), experts)
        log_probs_TV = torch.log_softmax(logits_TV[:-1].float(), dim=-1)
        targets_T = chunk_T[1:]
        nll -= float(log_probs_TV.gather(1, targets_T[:, None]).sum())
        count += targets_T.numel()
        predictions.append(logits_TV[:-1].argmax(dim=-1).cpu())
    return Scored(nll, count, torch.cat(predictions))


def _token_by_token(model: Model, chunk_T: torch.Tensor, cache: KVCache, experts: ExpertSource) -> torch.Tensor:
    experts.begin_request()
    rows = []
    for t in range(chunk_T.shape[0]):
        logits_TV, cache = forward(model, chunk_T[t : t + 1], cache, experts)
        rows.append(logits_TV[0])
    return torch.stack(rows)
