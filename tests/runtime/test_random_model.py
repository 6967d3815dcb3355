"""The random Mixtral-shaped model that benchmarks and GPU tests build: its dense and offloaded
halves are the same model."""

from __future__ import annotations

import torch

from moepic.policies import POLICIES
from moepic.runtime.generation import generate
from moepic.runtime.offload import offloaded_experts
from moepic.runtime.random_model import MixtralShape, random_models

TINY = MixtralShape(layers=2, hidden=64, ffn=128, heads=4, kv_heads=2, vocab=200)


def test_the_dense_and_offloaded_random_models_are_one_model():
    dense, offload = random_models(TINY, torch.device("cpu"), dense=True, dtype=torch.float32)
    assert dense.spec == offload.spec and dense.spec.moe.num_experts == TINY.experts
    assert offload.weights.embed_VD is dense.weights.embed_VD
    engine = offloaded_experts(offload, 0.5, 0.5, POLICIES["lru"].config())
    try:
        got = generate(offload, [3, 1, 4, 1, 5], max_new_tokens=6, eos_ids=(), keep_logits=True, experts=engine)
    finally:
        engine.close()
    want = generate(dense, [3, 1, 4, 1, 5], max_new_tokens=6, eos_ids=(), keep_logits=True)
    assert got.token_ids == want.token_ids
    for a, b in zip(got.logits, want.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert engine.report()["demand_bytes"] > 0


def test_a_seed_draws_the_same_weights_and_another_seed_others():
    _, a = random_models(TINY, torch.device("cpu"), dense=False, seed=3)
    _, b = random_models(TINY, torch.device("cpu"), dense=False, seed=3)
    _, c = random_models(TINY, torch.device("cpu"), dense=False, seed=4)
    first = [lw.ffn.experts[0].down_FD for lw in (m.weights.layers[0] for m in (a, b, c))]
    assert torch.equal(first[0], first[1]) and not torch.equal(first[0], first[2])
