"""The offloading engine: offloaded generation equals the dense model bit for bit, and what it copies
is what the planner says, into slots that hold exactly the host store's bytes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moepic.cache.layout import BudgetError, plan_layout
from moepic.cache.stats import total
from moepic.checkpoint.load import load_model
from moepic.default_model import default_model_dir
from moepic.policies import POLICIES
from moepic.runtime.generation import generate
from moepic.core.packing import flat_buffer
from moepic.runtime.host_store import HostExpertStore
from moepic.runtime.offload import OffloadedExperts, offloaded_experts
from tests_support import (
    assert_slots_hold_the_host_bytes,
    budget_between_the_minimum_and_everything,
    dense_run,
    load_split_friendly,
    policy_for,
)

MODELS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "deepseek_v2_grouped_yarn", "gpt_oss")
PROMPT = [1, 17, 5, 42, 8, 33, 9, 60, 21, 4, 77, 12]


@pytest.fixture(scope="module")
def models(checkpoint_dir):
    return load_split_friendly(checkpoint_dir, MODELS)


def engine_for(model, policy_name, trace, *, budget, theta):
    return offloaded_experts(model, budget, theta, policy=policy_for(policy_name, trace))


class CheckedAfterEveryStep:
    """Wraps an engine: after each layer step, every slot must hold its expert's host bytes."""

    def __init__(self, engine: OffloadedExperts) -> None:
        self.engine = engine

    def begin_request(self) -> None:
        self.engine.begin_request()

    def after_layer(self, layer, x_TD) -> None:
        self.engine.after_layer(layer, x_TD)

    def lookahead(self, layer, router_input_TD):
        return self.engine.lookahead(layer, router_input_TD)

    def experts_for(self, layer, ids_per_token, router_input_TD, lookahead_rows=None, *, decode=None):
        yield from self.engine.experts_for(layer, ids_per_token, router_input_TD, lookahead_rows, decode=decode)
        assert_slots_hold_the_host_bytes(self.engine)


@given(
    name=st.sampled_from(MODELS),
    policy=st.sampled_from(sorted(POLICIES)),
    share=st.floats(0.0, 1.0),
    per_layer=st.booleans(),
    thetas=st.lists(st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]), min_size=3, max_size=3),
    prompt_len=st.integers(1, len(PROMPT)),
    new_tokens=st.integers(1, 8),
)
def test_offloaded_generation_equals_the_dense_model_bit_for_bit(
    models, name, policy, share, per_layer, thetas, prompt_len, new_tokens
):
    model = models[name]
    moe_layers = len(model.spec.moe_layers)
    prompt = PROMPT[:prompt_len]
    dense, trace = dense_run(model, prompt, new_tokens)
    budget = [share] * moe_layers if per_layer else budget_between_the_minimum_and_everything(model, share)
    engine = engine_for(model, policy, trace, budget=budget, theta=thetas[:moe_layers])
    checked = CheckedAfterEveryStep(engine)
    offloaded = generate(model, prompt, max_new_tokens=new_tokens, eos_ids=(), keep_logits=True, experts=checked)
    assert offloaded.token_ids == dense.token_ids
    for got, want in zip(offloaded.logits, dense.logits):
        assert torch.equal(got, want)
    everything = total((*engine.prefill_stats.values(), *engine.decode_stats.values()))
    assert engine.host_to_device_bytes == everything.bytes_loaded
    assert everything.hits + everything.partial_hits + everything.misses == everything.activations
    # Every distinct routed expert of a step is one activation: the prompt is one step, then one per token.
    ids_NLK = trace.expert_ids_NLK
    steps = [slice(0, len(prompt))] + [slice(t, t + 1) for t in range(len(prompt), trace.num_tokens)]
    assert everything.activations == sum(len(set(ids_NLK[step, l].ravel())) for step in steps for l in range(moe_layers))


@pytest.mark.parametrize("name", ["deepseek_v2_lite", "deepseek_v2_grouped_yarn", "deepseek_v3", "deepseek_v3_halves_yarn", "glm4_moe", "dots1", "minimax_m2", "granitemoe", "granitemoeshared", "ernie4_5_moe",
                                  "gpt_oss_rope_default", "gpt_oss_mxfp4", "phimoe", "phimoe_default_rope",
                                  "llama4_text", "llama4_text_llama3_rope", "llama4",
                                  "hunyuan_v1_moe", "hunyuan_v1_moe_linear_rope", "flex_olmo", "flex_olmo_unnormalised",
                                  "glm4_moe_grouped_full_head_norm_off", "minimax_m2_full_rotary", "ernie4_5_moe_every_other_layer",
                                  "granitemoe_top1_untied", "granitemoeshared_tied"])
@pytest.mark.parametrize("theta", [0.25, 0.5])
def test_deepseek_offloaded_at_a_small_budget_and_a_split_equals_its_dense_run(checkpoint_dir, name, theta):
    """Latent attention (GLM-4.5: grouped-query), dense first layers, shared experts and all three DeepSeek routers;
    GPT-OSS's biased experts (gate/up biases split with their neurons, the down bias once per expert) and its sinks:
    the engine at its minimum budget (most loads copied, tops split at θ) changes no bit."""
    model = load_split_friendly(checkpoint_dir, [name])[name]
    dense, trace = dense_run(model, PROMPT, 8)
    engine = engine_for(model, "lcp", trace, budget=budget_between_the_minimum_and_everything(model, 0.0), theta=theta)
    offloaded = generate(model, PROMPT, max_new_tokens=8, eos_ids=(), keep_logits=True, experts=CheckedAfterEveryStep(engine))
    assert offloaded.token_ids == dense.token_ids
    assert all(torch.equal(a, b) for a, b in zip(offloaded.logits, dense.logits))
    stats = total(engine.decode_stats.values())
    assert stats.misses + stats.partial_hits > 0  # the cache really was too small to hold it


@pytest.fixture(scope="module")
def bundled():
    model = load_model(default_model_dir())
    prompt = list(range(300, 340))
    return model, prompt, *dense_run(model, prompt, 24)


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("budget,theta", [(0.2, 0.5), (0.5, 0.25), ("1000000", 0.75), (1.0, 1.0)])
def test_bundled_model_offloaded_equals_dense_in_bf16(bundled, policy, budget, theta):
    model, prompt, dense, trace = bundled
    engine = engine_for(model, policy, trace, budget=budget, theta=theta)
    offloaded = generate(model, prompt, max_new_tokens=24, eos_ids=(), keep_logits=True, experts=engine)
    assert offloaded.token_ids == dense.token_ids
    assert all(torch.equal(a, b) for a, b in zip(offloaded.logits, dense.logits))
    assert_slots_hold_the_host_bytes(engine)


def test_full_budget_of_whole_experts_loads_nothing_while_generating(models):
    model = models["mixtral"]
    dense, trace = dense_run(model, PROMPT, 6)
    engine = engine_for(model, "lru", trace, budget=1.0, theta=1.0)
    generate(model, PROMPT, max_new_tokens=6, eos_ids=(), experts=engine)
    report = engine.report()
    assert (report["bytes_loaded"], report["staging_bytes"], report["expert_hit_rate"]) == (0, 0, 1.0)
    assert report["preload_bytes"] == report["cache_bytes"] == engine.layout.expert_bytes


def test_theta_zero_caches_nothing_and_loads_every_activated_expert_whole(models):
    model = models["mixtral"]
    _, trace = dense_run(model, PROMPT, 5)
    engine = engine_for(model, "lcp", trace, budget=1.0, theta=0.0)
    generate(model, PROMPT, max_new_tokens=5, eos_ids=(), experts=engine)
    stats = total((*engine.prefill_stats.values(), *engine.decode_stats.values()))
    assert engine.layout.cache_bytes == 0 and stats.misses == stats.activations
    assert stats.bytes_loaded == stats.activations * engine.layout.layers[0].expert_bytes


def test_partial_hits_load_only_bottoms(models):
    model = models["mixtral"]
    _, trace = dense_run(model, PROMPT, 8)
    engine = engine_for(model, "lru", trace, budget=1.0, theta=0.5)
    generate(model, PROMPT, max_new_tokens=8, eos_ids=(), experts=engine)
    stats = total((*engine.prefill_stats.values(), *engine.decode_stats.values()))
    layer = engine.layout.layers[0]
    assert stats.partial_hits > 0 and stats.hits == 0
    assert stats.bytes_loaded == stats.partial_hits * layer.bottom_bytes + stats.misses * layer.expert_bytes


def test_budget_below_the_working_set_names_the_minimum(models):
    model = models["mixtral"]
    with pytest.raises(BudgetError, match=r"below the minimum working set of 0.04 MiB \(36864 bytes\): staging for 2 whole"):
        plan_layout(model.spec, dtype_bytes=4, budget="1KB", theta=0.5)


def test_host_store_adopts_packed_experts_without_copying(checkpoint_dir):
    model = load_model(checkpoint_dir("mixtral"), dtype=torch.float32, offload_experts=True)
    expert = model.weights.layers[0].ffn.experts[1]
    store = HostExpertStore(model.weights)
    assert flat_buffer(expert) is not None
    assert store.flat[0][1].data_ptr() == expert.gate_up_N2BD.data_ptr()


def test_host_store_packs_unpacked_experts_into_one_flat_buffer_each(models):
    model = models["qwen2_moe"]
    store = HostExpertStore(model.weights)
    layer = model.spec.moe_layers[0]
    original, packed = model.weights.layers[layer].ffn.experts[2], store.experts[layer][2]
    assert torch.equal(original.gate_up_N2BD, packed.gate_up_N2BD) and torch.equal(original.down_FD, packed.down_FD)
    flat = store.flat[layer][2]
    assert flat.dtype == torch.uint8 and flat.numel() == 3 * original.ffn_size * original.down_FD.shape[1] * 4  # fp32 bytes
    assert packed.down_FD.data_ptr() == flat.data_ptr() + 2 * original.ffn_size * original.down_FD.shape[1] * 4


def test_engine_reports_cache_counters_and_sizes(models):
    model = models["olmoe"]
    _, trace = dense_run(model, PROMPT, 6)
    engine = engine_for(model, "lfu", trace, budget=0.6, theta=0.5)
    generate(model, PROMPT, max_new_tokens=6, eos_ids=(), experts=engine)
    report = engine.report()
    for key in ("expert_hit_rate", "bytes_loaded", "bytes_loaded_per_token", "cache_bytes", "staging_bytes", "layer_hit_rates"):
        assert key in report
    assert len(report["layer_hit_rates"]) == len(model.spec.moe_layers)
    assert report["bytes_loaded_per_token"] == report["bytes_loaded"] / (len(PROMPT) + 6 - 1)
    assert report["cache_bytes"] + report["staging_bytes"] <= 0.6 * engine.layout.expert_bytes


def test_engines_with_different_theta_share_one_host_store_without_rereading_or_repacking(checkpoint_dir):
    model = load_model(checkpoint_dir("mixtral"), dtype=torch.float32, offload_experts=True, widest_neuron_block=4)
    _, trace = dense_run(model, PROMPT, 4)
    a = engine_for(model, "lcp", trace, budget=0.5, theta=0.25)
    b = engine_for(model, "lcp", trace, budget=0.5, theta=[1.0, 0.5, 0.0])
    for layer in a.store.flat:
        assert [f.data_ptr() for f in a.store.flat[layer]] == [f.data_ptr() for f in b.store.flat[layer]]
    assert [l.top_neurons for l in b.layout.layers] == [48, 24, 0]
