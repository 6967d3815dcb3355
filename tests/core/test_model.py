"""The decoder forward: KV-cache consistency, sliding windows, and the ExpertSource seam."""

from __future__ import annotations

import attrs
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moepic.checkpoint.load import load_model
from moepic.core.ffn import SegmentOutput, split_expert, swiglu, top_neurons_for
from moepic.core.model import KVCache, forward
from moepic.core.moe import combine_experts
from moepic.runtime.generation import generate
from tests_support import random_expert_set

TOKENS = [1, 17, 5, 42, 8, 77, 3, 61, 29, 11, 90, 4]


@pytest.fixture(scope="module")
def qwen2(checkpoint_dir):
    # Qwen2-MoE: dense and MoE layers, shared expert, GQA, biases: the most moving parts.
    # Neuron blocks of 2 so the 16-neuron experts can be split at 8 places.
    return load_model(checkpoint_dir("qwen2_moe"), dtype=torch.float32, widest_neuron_block=2)


def _logits(model, tokens, chunks):
    cache = KVCache.allocate(model, len(tokens))
    out, start = [], 0
    for size in chunks:
        logits, cache = forward(model, torch.tensor(tokens[start : start + size]), cache)
        out.append(logits)
        start += size
    assert cache.length == len(tokens)
    return torch.cat(out)


@given(cuts=st.sets(st.integers(1, len(TOKENS) - 1)))
def test_any_chunking_of_the_prompt_matches_one_prefill(qwen2, cuts):
    # Token-by-token decoding is the chunking with every cut; one prefill is the one with none.
    bounds = [0, *sorted(cuts), len(TOKENS)]
    chunks = [b - a for a, b in zip(bounds, bounds[1:])]
    torch.testing.assert_close(_logits(qwen2, TOKENS, chunks), _logits(qwen2, TOKENS, [len(TOKENS)]), atol=1e-5, rtol=0)


def test_sliding_window_changes_attention_once_the_prompt_exceeds_it(checkpoint_dir):
    windowed = load_model(checkpoint_dir("mixtral_window"), dtype=torch.float32)
    assert windowed.spec.sliding_window == 4
    unwindowed = attrs.evolve(windowed, spec=attrs.evolve(windowed.spec, sliding_window=None))
    a, b = _logits(windowed, TOKENS, [12]), _logits(unwindowed, TOKENS, [12])
    torch.testing.assert_close(a[:4], b[:4], atol=1e-6, rtol=0)  # within the window: identical
    assert (a[4:] - b[4:]).abs().max() > 1e-3
    # Chunked decoding honours the window too.
    torch.testing.assert_close(_logits(windowed, TOKENS, [6, 1, 1, 4]), a, atol=1e-5, rtol=0)


def test_kv_cache_overflow_is_a_clear_error(qwen2):
    with pytest.raises(ValueError, match="KV cache holds 4 positions"):
        forward(qwen2, torch.tensor(TOKENS[:5]), KVCache.allocate(qwen2, 4))


def test_last_only_logits_equal_the_last_row_of_all_logits(qwen2):
    all_TV, _ = forward(qwen2, torch.tensor(TOKENS), KVCache.allocate(qwen2, 12))
    last_TV, _ = forward(qwen2, torch.tensor(TOKENS), KVCache.allocate(qwen2, 12), logits_for="last")
    torch.testing.assert_close(last_TV, all_TV[-1:])


@given(T=st.integers(1, 10), E=st.integers(2, 6), seed=st.integers(0, 2**16))
def test_grouped_expert_combine_equals_a_per_token_loop(T, E, seed):
    g = torch.Generator().manual_seed(seed)
    experts = random_expert_set(E, D=8, F=12, seed=seed)
    x_TD = torch.randn(T, 8, generator=g)
    ids = [torch.randperm(E, generator=g)[:2].tolist() for _ in range(T)]
    weights_TK = torch.rand(T, 2, generator=g)
    routed = sorted({e for token_ids in ids for e in token_ids})
    combined = combine_experts(x_TD, weights_TK, ids, ((e, (experts[e],)) for e in routed))
    for t in range(T):
        expected = sum(
            weights_TK[t, k] * combine_experts(x_TD[t : t + 1], torch.ones(1, 1), [[e]], [(e, (experts[e],))])[0]
            for k, e in enumerate(ids[t])
        )
        torch.testing.assert_close(combined[t], expected, atol=1e-5, rtol=1e-5)


@attrs.frozen
class SplitExperts:
    """An ExpertSource that hands every expert out as a top and a bottom segment at per-layer θ."""

    model: object
    thetas: tuple[float, ...]
    asked: list = attrs.field(factory=list)

    def begin_request(self):
        pass

    def after_layer(self, layer, x_TD):
        pass

    def lookahead(self, layer, router_input_TD):
        return None

    def experts_for(self, layer, ids_per_token, router_input_TD, lookahead_rows=None, *, decode=None):
        expert_ids = sorted({e for ids in ids_per_token for e in ids})
        self.asked.append((layer, tuple(expert_ids)))
        experts = self.model.weights.layers[layer].ffn.experts
        theta = self.thetas[layer]
        for e in expert_ids:
            yield e, split_expert(experts[e], top_neurons_for(theta, experts[e].ffn_size, experts[e].block))


@given(thetas=st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3), prompt_len=st.integers(1, 8))
def test_generation_through_split_experts_equals_the_dense_model(qwen2, thetas, prompt_len):
    assert qwen2.weights.layers[qwen2.spec.moe_layers[0]].ffn.experts[0].block == 2  # real splits, not 0|F only
    prompt = TOKENS[:prompt_len]
    dense = generate(qwen2, prompt, max_new_tokens=6, eos_ids=(), keep_logits=True)
    source = SplitExperts(qwen2, tuple(thetas))
    split = generate(qwen2, prompt, max_new_tokens=6, eos_ids=(), keep_logits=True, experts=source)
    assert split.token_ids == dense.token_ids
    for a, b in zip(split.logits, dense.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # Only MoE layers ask for experts, once per forward, and only for experts that were routed.
    moe_layers = set(qwen2.spec.moe_layers)
    assert {layer for layer, _ in source.asked} == moe_layers
    assert len(source.asked) == 6 * len(moe_layers)
    assert all(0 < len(ids) <= qwen2.spec.moe.num_experts for _, ids in source.asked)


@attrs.frozen
class BottomsElsewhere(SplitExperts):
    """An ExpertSource that hands each expert's top out as weights and computes its bottom itself,
    handing back the bottom's output (as a source computing on the host would)."""

    def experts_for(self, layer, ids_per_token, router_input_TD, lookahead_rows=None, *, decode=None):
        for e, (top, bottom) in super().experts_for(layer, ids_per_token, router_input_TD, lookahead_rows):
            tokens_T = torch.tensor([t for t, ids in enumerate(ids_per_token) if e in ids])
            yield e, (top, SegmentOutput(swiglu(router_input_TD[tokens_T], bottom)))


@pytest.mark.parametrize("prompt_len", [1, 5])
def test_experts_handed_back_as_outputs_computed_elsewhere_give_the_dense_model_bit_for_bit(qwen2, prompt_len):
    """θ = 0: every expert comes back whole as its output, computed from the same bytes on the same
    tokens, so the block adds exactly what it would have computed."""
    prompt = TOKENS[:prompt_len]
    dense = generate(qwen2, prompt, max_new_tokens=4, eos_ids=(), keep_logits=True)
    source = BottomsElsewhere(qwen2, (0.0,) * len(qwen2.weights.layers))
    elsewhere = generate(qwen2, prompt, max_new_tokens=4, eos_ids=(), keep_logits=True, experts=source)
    assert elsewhere.token_ids == dense.token_ids
    assert all(torch.equal(a, b) for a, b in zip(elsewhere.logits, dense.logits))
    assert len(source.asked) == 4 * len(qwen2.spec.moe_layers)


@given(thetas=st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3), prompt_len=st.integers(1, 8))
def test_a_top_computed_here_plus_a_bottom_computed_elsewhere_equals_the_dense_model(qwen2, thetas, prompt_len):
    prompt = TOKENS[:prompt_len]
    dense = generate(qwen2, prompt, max_new_tokens=4, eos_ids=(), keep_logits=True)
    split = generate(qwen2, prompt, max_new_tokens=4, eos_ids=(), keep_logits=True, experts=BottomsElsewhere(qwen2, tuple(thetas)))
    assert split.token_ids == dense.token_ids
    for a, b in zip(split.logits, dense.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@given(T=st.integers(1, 5), K=st.integers(1, 3), N=st.integers(0, 4), seed=st.integers(0, 2**16))
def test_routing_and_extra_ids_read_in_one_transfer_split_back_exactly(T, K, N, seed):
    from moepic.core.moe import routing_to_host_sync

    g = torch.Generator().manual_seed(seed)
    ids_TK, extra_TN = torch.randint(0, 8, (T, K), generator=g), torch.randint(0, 8, (T, N), generator=g)
    routed, extra = routing_to_host_sync(ids_TK, extra_TN)
    assert routed == ids_TK.tolist() and extra == extra_TN.tolist()
    assert routing_to_host_sync(ids_TK) == (ids_TK.tolist(), None)
