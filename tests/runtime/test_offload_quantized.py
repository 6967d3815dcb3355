"""Experts stored quantized (moepic/quant) through the offloading engine: every policy, budget, θ and
predictor produces the tokens and logits of the same checkpoint's all-resident run, bit for bit, and
a miss moves the format's bytes (scales included), not the dense ones."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moepic.cache.layout import plan_layout, staging_buffers
from moepic.cache.stats import total
from moepic.checkpoint.load import load_model
from moepic.core.packing import packed_bytes
from moepic.policies import POLICIES
from moepic.predictors import PREDICTORS
from moepic.quant import build_format
from moepic.runtime.generation import generate
from moepic.runtime.offload import offloaded_experts
from tests_support import assert_slots_hold_the_host_bytes, dense_run, policy_for

# Mixtral's plain experts; Qwen2-MoE's shared expert; DeepSeek-V3's grouped router and dense first
# layer; GPT-OSS's biased experts (gate/up biases are a part of their own, split with their neurons).
MODELS = ("mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss")
FORMATS = {
    "int4": {"name": "int4", "group_size": 16},
    "int4_asym": {"name": "int4", "group_size": 8, "symmetric": False},
    "int8": {"name": "int8", "group_size": 32},
}
PROMPT = [1, 17, 5, 42, 8, 33, 9, 60, 21, 4, 77, 12]


@pytest.fixture(scope="module")
def models(checkpoint_dir):
    """(model, format) → the checkpoint in fp32, experts encoded as they load, neuron blocks of 4."""
    cache = {}

    def get(name: str, fmt: str):
        if (name, fmt) not in cache:
            cache[name, fmt] = load_model(checkpoint_dir(name), dtype=torch.float32, widest_neuron_block=4,
                                          expert_format=build_format(FORMATS[fmt]))
        return cache[name, fmt]

    return get


def budget_from_minimum(model, fmt: str, share: float, staging_experts: int | None = None) -> int:
    """Bytes between the staging minimum (share 0) and every expert in format `fmt` (share 1)."""
    layout = plan_layout(model.spec, dtype_bytes=4, budget=1.0, theta=0.5, expert_format=build_format(FORMATS[fmt]),
                         staging_experts=staging_experts)
    return layout.staging_bytes + int(share * max(0, layout.expert_bytes - layout.staging_bytes))


def routed_expert(model):
    return next(lw.ffn.experts[0] for lw in model.weights.layers if hasattr(lw.ffn, "experts"))


@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from(MODELS),
    fmt=st.sampled_from(sorted(FORMATS)),
    policy=st.sampled_from(sorted(POLICIES)),
    share=st.floats(0.0, 1.0),
    theta=st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]),
    new_tokens=st.integers(1, 6),
)
def test_offloaded_quantized_experts_equal_their_all_resident_run_bit_for_bit(models, name, fmt, policy, share, theta, new_tokens):
    model = models(name, fmt)
    resident, trace = dense_run(model, PROMPT, new_tokens)
    engine = offloaded_experts(model, budget_from_minimum(model, fmt, share), theta, policy=policy_for(policy, trace))
    offloaded = generate(model, PROMPT, max_new_tokens=new_tokens, eos_ids=(), keep_logits=True, experts=engine)
    assert offloaded.token_ids == resident.token_ids
    assert all(torch.equal(a, b) for a, b in zip(offloaded.logits, resident.logits))
    assert_slots_hold_the_host_bytes(engine)  # the slots hold the compressed bytes, scales included


@pytest.mark.parametrize("horizon", [1, 2])
@pytest.mark.parametrize("name", ["mixtral", "gpt_oss"])
def test_prefetching_quantized_experts_changes_no_bit(models, name, horizon):
    model = models(name, "int4")
    resident, trace = dense_run(model, PROMPT, 6)
    predictor = PREDICTORS.build(PREDICTORS.structure_node({"name": "gate_lookahead", "horizon": horizon}, "p"), model)
    budget = budget_from_minimum(model, "int4", 0.2, staging_buffers(model.spec.moe.top_k, predictor))
    engine = offloaded_experts(model, budget, 0.5, policy=policy_for("lru", trace), predictor=predictor)
    offloaded = generate(model, PROMPT, max_new_tokens=6, eos_ids=(), keep_logits=True, experts=engine)
    assert offloaded.token_ids == resident.token_ids
    assert all(torch.equal(a, b) for a, b in zip(offloaded.logits, resident.logits))
    assert engine.counters.prefetch_bytes > 0  # the predictor did copy ahead


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_a_miss_moves_the_formats_bytes(models, fmt):
    """θ = 0 keeps no top, so every routed expert of every step is loaded whole: the bytes copied
    are the activations times the format's packed expert (scales and zero points included)."""
    model = models("mixtral", fmt)
    expert = routed_expert(model)
    F, D = expert.ffn_size, model.spec.hidden_size
    format_bytes = F * build_format(FORMATS[fmt]).neuron_bytes(D, False, 4)
    assert packed_bytes(expert, F) == format_bytes < F * 3 * D * 4  # fewer than the dense fp32 expert's
    resident, trace = dense_run(model, PROMPT, 4)
    engine = offloaded_experts(model, budget_from_minimum(model, fmt, 0.0), 0.0, policy=policy_for("lru", trace))
    generate(model, PROMPT, max_new_tokens=4, eos_ids=(), experts=engine)
    everything = total((*engine.prefill_stats.values(), *engine.decode_stats.values()))
    assert everything.misses == everything.activations > 0
    assert engine.counters.demand_bytes == everything.activations * format_bytes == engine.host_to_device_bytes
    assert engine.layout.layers[0].expert_bytes == format_bytes


def test_hybrid_auto_with_quantized_experts_is_refused_and_host_only_runs_exactly(models):
    from moepic.errors import ConfigError

    model = models("mixtral", "int4")
    resident, trace = dense_run(model, PROMPT, 4)
    with pytest.raises(ConfigError, match=r"prices host compute of experts the host computes as stored \(dense, int4-fused\); with int4 experts"):  # before any pricing
        offloaded_experts(model, budget_from_minimum(model, "int4", 0.3), 0.5, policy=policy_for("lru", trace), hybrid="auto")
    engine = offloaded_experts(model, budget_from_minimum(model, "int4", 0.3), 0.5, policy=policy_for("lru", trace), hybrid="host-only")
    try:
        offloaded = generate(model, PROMPT, max_new_tokens=4, eos_ids=(), keep_logits=True, experts=engine)
    finally:
        engine.close()
    assert offloaded.token_ids == resident.token_ids  # the host decodes the same bytes (its sum rounds apart)
    for a, b in zip(offloaded.logits, resident.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_generate_refuses_hybrid_auto_with_quantized_experts_before_measuring_the_host(capsys):
    from tests_support import cli_error

    message = cli_error(capsys, ["generate", "--expert-format", "int4", "--budget", "0.3", "--hybrid", "auto",
                                 "--max-new-tokens", "2", "--prompt-ids", "1,2"])
    assert message.startswith("--hybrid auto prices host compute of experts the host computes as stored (dense, int4-fused); with int4 experts")
