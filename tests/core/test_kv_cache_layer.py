"""A layer that sees a bounded span keeps only that span, as a ring (core/kv_cache_layer.py): a
sequence fed in any pieces gives the logits of one forward over all of it, and the ring's buffers
are the span's size, not the sequence's."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moepic.checkpoint.load import load_model
from moepic.core.kv_cache_layer import cache_positions, span_of
from moepic.core.model import KVCache, forward

# Windows of 4 (with sinks), 3 and 4; chunks of 4 (Llama-4's rotating layers).
RING_MODELS = ("gpt_oss", "gpt_oss_rope_default", "mixtral_window", "dots1_windows", "llama4_text")
LENGTH = 23


@pytest.fixture(scope="module")
def models(checkpoint_dir):
    return {name: load_model(checkpoint_dir(name), dtype=torch.float32) for name in RING_MODELS}


@pytest.fixture(scope="module")
def whole_runs(models):
    """Each model's logits for every position of one sequence, from one forward over all of it."""
    tokens = torch.randint(3, 90, (LENGTH,), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return tokens, {name: forward(m, tokens, KVCache.allocate(m, LENGTH))[0] for name, m in models.items()}


@settings(max_examples=25)
@given(name=st.sampled_from(RING_MODELS), cuts=st.lists(st.integers(1, LENGTH - 1), max_size=6, unique=True))
def test_any_pieces_give_the_logits_of_one_forward(models, whole_runs, name, cuts):
    """Pieces longer and shorter than the span, single tokens, and ring wrap-arounds mid-piece."""
    tokens, whole_TV = whole_runs[0], whole_runs[1][name]
    model = models[name]
    cache = KVCache.allocate(model, LENGTH)
    bounds = [0, *sorted(cuts), LENGTH]
    pieces = []
    with torch.inference_mode():
        for a, b in zip(bounds, bounds[1:]):
            logits_TV, cache = forward(model, tokens[a:b], cache)
            pieces.append(logits_TV)
    torch.testing.assert_close(torch.cat(pieces), whole_TV, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", RING_MODELS)
def test_layers_with_a_span_keep_only_that_many_slots(models, name):
    model = models[name]
    spec = model.spec
    cache = KVCache.allocate(model, 1000)
    assert cache.capacity == 1000
    spans = [span_of(spec, layer) for layer in range(spec.num_layers)]
    assert any(s is not None for s in spans)
    for layer, span in enumerate(spans):
        slots = cache.keys[layer].shape[1] - (1 if spec.attention_sinks else 0)
        assert slots == (1000 if span is None else span) == cache_positions(spec, layer, 1000)
    short = KVCache.allocate(model, 2)  # shorter than every span: no layer needs more than the sequence
    assert all(k.shape[1] - (1 if spec.attention_sinks else 0) == 2 for k in short.keys)
