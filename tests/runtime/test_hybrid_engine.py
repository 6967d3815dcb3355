"""Hybrid execution in the offloading engine: loads computed on the host (whole experts, and the
bottoms of partial hits beside their cached tops on the device) keep the dense model's greedy
tokens and fp32 logits within 1e-5, whatever the policy, θ, budget, predictor or placement; the
host really computes them, admitted tops are filled into the cache and hit later, and the
counters add up. Hybrid off is the copy-only engine (test_offload.py, test_prefetch.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moepic.cache.layout import staging_buffers
from moepic.cache.stats import total
from moepic.perfmodel.hardware import HostProfile
from moepic.perfmodel.host_costs import HostPricing
from moepic.policies import POLICIES
from moepic.predictors import PREDICTORS
from moepic.predictors.base import NoPredictor
from moepic.predictors.gate_lookahead import GateLookaheadConfig
from moepic.runtime.copy_engine import Link
from moepic.runtime.generation import generate
from moepic.runtime.offload import offloaded_experts
from tests_support import (
    assert_slots_hold_the_host_bytes,
    budget_between_the_minimum_and_everything,
    dense_run,
    load_split_friendly,
    policy_for,
)

MODELS = ("mixtral", "qwen2_moe", "olmoe", "deepseek_v3", "gpt_oss", "llama4_text")  # qwen2_moe: a shared expert and a dense layer between MoE layers; deepseek_v3: latent attention, a biased grouped router; gpt_oss: biased experts split between device and host; llama4_text: experts whose input the router scales
PROMPT = [1, 17, 5, 42, 8, 33, 9, 60, 21, 4, 77, 12]


def pricing(host_gbps: float, link_gbps: float) -> HostPricing:
    """fp32 prices with the host streaming `host_gbps` and the link moving `link_gbps`."""
    host = HostProfile(name="test", source="test", bf16_expert_gbps=host_gbps, fp32_expert_gbps=host_gbps,
                       call_overhead_us=0.0, memory_gbps=4 * host_gbps, physical_cores=2, matmul_gflops=1e4)
    return HostPricing(host=host, link_gbps=link_gbps, link_latency_us=0.0, dtype_bytes=4)


# mode name → (hybrid, pricing): the host far cheaper, or priced like the link (some loads each way).
MODES = {
    "host-only": ("host-only", None),
    "auto, host cheaper": ("auto", pricing(host_gbps=100.0, link_gbps=0.01)),
    "auto, balanced": ("auto", pricing(host_gbps=0.8, link_gbps=1.0)),
}


@pytest.fixture(scope="module")
def models(checkpoint_dir):
    return load_split_friendly(checkpoint_dir, MODELS)


def run_hybrid(model, prompt, new_tokens, engine):
    try:
        result = generate(model, prompt, max_new_tokens=new_tokens, eos_ids=(), keep_logits=True, experts=engine)
        engine.slots.settle()
        return result
    finally:
        engine.close()


def assert_close_to_dense(result, dense) -> None:
    assert result.token_ids == dense.token_ids
    for got, want in zip(result.logits, dense.logits):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def assert_counters_add_up(engine, *, predicted: bool) -> None:
    everything = total((*engine.prefill_stats.values(), *engine.decode_stats.values()))
    report = engine.report()
    # Every planned byte was copied on demand, brought by a prefetch that was used, or computed on the host.
    c = engine.counters
    assert c.demand_bytes + c.prefetch_bytes - c.wasted_prefetch_bytes - c.kept_prefetch_bytes + c.host_bytes == everything.bytes_loaded
    assert engine.copies.current_stats().bytes == c.demand_bytes + c.prefetch_bytes + c.fill_bytes
    assert report["host_experts"] == sum(report["layer_host_experts"])
    assert report["host_bottoms"] == sum(report["layer_host_bottoms"])
    if not predicted:  # every load is a demand load: copied, computed on the host, or split between the two
        hosted = report["host_experts"] + report["host_bottoms"] + report["host_splits"]
        assert hosted + report["demand_copies"] == everything.partial_hits + everything.misses
        assert report["host_experts"] + report["host_splits"] <= everything.misses
        assert report["host_bottoms"] <= everything.partial_hits


@given(
    name=st.sampled_from(MODELS),
    mode=st.sampled_from(sorted(MODES)),
    policy=st.sampled_from(sorted(POLICIES)),
    theta=st.sampled_from([0.0, 0.25, 0.5, 1.0]),
    share=st.floats(0.0, 1.0),
    predictor=st.sampled_from(["none", "gate_lookahead"]),
    prompt_len=st.integers(1, len(PROMPT)),
    new_tokens=st.integers(1, 6),
)
def test_hybrid_generation_keeps_the_dense_tokens_and_logits_within_rounding(
    models, name, mode, policy, theta, share, predictor, prompt_len, new_tokens
):
    model, prompt = models[name], PROMPT[:prompt_len]
    dense, trace = dense_run(model, prompt, new_tokens)
    pred = PREDICTORS.build(GateLookaheadConfig(candidates=3), model) if predictor == "gate_lookahead" else NoPredictor()
    budget = budget_between_the_minimum_and_everything(model, share, staging_experts=staging_buffers(model.spec.moe.top_k, pred))
    hybrid, prices = MODES[mode]
    engine = offloaded_experts(model, budget, theta, policy=policy_for(policy, trace), predictor=pred, hybrid=hybrid, pricing=prices)
    assert_close_to_dense(run_hybrid(model, prompt, new_tokens, engine), dense)
    assert_counters_add_up(engine, predicted=predictor != "none")
    assert_slots_hold_the_host_bytes(engine)
    assert engine.staging.in_use == 0


def test_host_only_computes_every_load_on_the_host_and_copies_none(models):
    model = models["olmoe"]
    dense, trace = dense_run(model, PROMPT, 8)
    engine = offloaded_experts(model, 0.5, 0.5, POLICIES["lru"].config(), hybrid="host-only")
    assert_close_to_dense(run_hybrid(model, PROMPT, 8, engine), dense)  # the prompt is a multi-token step
    report = engine.report()
    assert report["host_experts"] > 0 and report["host_bottoms"] > 0
    assert report["demand_bytes"] == report["demand_copies"] == report["prefetch_bytes"] == 0
    assert report["host_bytes"] == report["bytes_loaded"]
    assert report["host_s"] > 0 and report["decode_host_s_per_token"] > 0
    assert len(report["layer_host_s"]) == len(model.spec.moe_layers)
    assert_counters_add_up(engine, predicted=False)


def test_admitted_host_misses_are_filled_into_the_cache_and_hit_later(models):
    """θ = 1 and nothing copied on demand: the only way a slot gets an expert is a fill, so every
    later hit reads a filled slot. The link is slow, so a hit that did not wait for its fill would
    read a slot still empty."""
    model = models["mixtral"]
    dense, trace = dense_run(model, PROMPT, 10)
    slow = Link(gbps=0.001, latency_us=1000.0)  # a fill holds the link ~20 ms
    engine = offloaded_experts(model, 0.6, 1.0, POLICIES["lru"].config(), link=slow, hybrid="host-only")
    assert engine.preload_bytes == 0
    assert_close_to_dense(run_hybrid(model, PROMPT, 10, engine), dense)
    report = engine.report()
    assert report["fill_bytes"] > 0 and report["demand_bytes"] == 0
    assert total(engine.decode_stats.values()).hits > 0
    assert_slots_hold_the_host_bytes(engine)


def test_auto_places_loads_on_both_sides_when_they_cost_alike(models):
    model = models["mixtral"]
    dense, trace = dense_run(model, PROMPT, 8)
    engine = offloaded_experts(model, 0.5, 0.0, POLICIES["lru"].config(), hybrid="auto", pricing=MODES["auto, balanced"][1])
    assert_close_to_dense(run_hybrid(model, PROMPT, 8, engine), dense)
    report = engine.report()
    assert report["host_experts"] > 0 and report["demand_copies"] > 0
    assert_counters_add_up(engine, predicted=False)


def test_auto_with_the_link_far_cheaper_copies_everything_like_hybrid_off(models):
    model = models["mixtral"]
    dense, trace = dense_run(model, PROMPT, 6)
    engine = offloaded_experts(model, 0.5, 0.5, POLICIES["lru"].config(), hybrid="auto", pricing=pricing(0.001, 1000.0))
    result = run_hybrid(model, PROMPT, 6, engine)
    assert engine.report()["host_experts"] == engine.report()["host_bottoms"] == 0
    assert result.token_ids == dense.token_ids and all(torch.equal(a, b) for a, b in zip(result.logits, dense.logits))


def test_hybrid_off_starts_no_host_pool_and_auto_needs_prices(models):
    model = models["mixtral"]
    engine = offloaded_experts(model, 0.5, 0.5, POLICIES["lru"].config())
    assert engine.host is None
    engine.close()
    with pytest.raises(ValueError, match="hybrid auto needs the costs"):
        offloaded_experts(model, 0.5, 0.5, POLICIES["lru"].config(), hybrid="auto")
    with pytest.raises(ValueError, match="host threads have no effect with hybrid off"):
        offloaded_experts(model, 0.5, 0.5, POLICIES["lru"].config(), host_threads=2)
    with pytest.raises(ValueError, match="hybrid must be one of off, auto, host-only"):
        offloaded_experts(model, 0.5, 0.5, POLICIES["lru"].config(), hybrid="banana")


@pytest.mark.parametrize("name", MODELS)
def test_auto_splits_admitted_misses_between_link_and_host_and_stays_exact(models, name):
    """Link and host at one rate, θ 0.5: an admitted miss finishes soonest split (its top copied
    into its slot while the host computes its bottom, each half the expert), so auto splits; the
    device computes the top from the slot once it has landed, and the sum stays the dense model's."""
    model = models[name]
    dense, trace = dense_run(model, PROMPT, 8)
    engine = offloaded_experts(model, 0.5, 0.5, POLICIES["lru"].config(), hybrid="auto", pricing=pricing(1.0, 1.0))
    assert_close_to_dense(run_hybrid(model, PROMPT, 8, engine), dense)
    report = engine.report()
    assert report["host_splits"] > 0 and sum(report["layer_host_splits"]) == report["host_splits"]
    assert_slots_hold_the_host_bytes(engine)  # a split miss's top landed in its slot, as admitted
