"""Route a text through a model and record it: the routing trace (optionally with each router's
input) and gate-lookahead recall per MoE layer. What `moepic routing-report` reports on and what
`moepic train-predictor` learns from. Pure apart from running the model (no files, no printing).
"""

from __future__ import annotations

import torch

from moepic.analysis.lookahead import GateLookaheadTap, Taps
from moepic.core.model import KVCache, forward
from moepic.errors import ConfigError
from moepic.tracing.recorder import RoutingRecorder


def trace_text(model, codec, text: str, *, chunk: int, max_tokens: int, record_hidden: bool = False):
    """Route `text` through `model` in independent chunks; the trace (with each router's input if
    `record_hidden`) and gate-lookahead recall per layer."""
    ids = codec.encode(text)[:max_tokens]
    if len(ids) < 2:
        raise ConfigError("the text is too short: it needs at least 2 tokens")
    # A caller's fixed chunk (train-predictor's 256) may exceed a small model's positions; a user's
    # --chunk never gets here unchecked (moepic routing-report refuses it).
    chunk = min(chunk, model.spec.max_position_embeddings)
    recorder, lookahead = RoutingRecorder(model.spec, record_hidden=record_hidden), GateLookaheadTap(model)
    with torch.inference_mode():
        for start in range(0, len(ids), chunk):
            piece = torch.tensor(ids[start : start + chunk], device=model.device)
            if start:
                recorder.begin_sequence()
            forward(model, piece, KVCache.allocate(model, len(piece)), logits_for="last", tap=Taps(recorder, lookahead))
    return recorder.trace(source="moepic routing-report"), lookahead.recall()
