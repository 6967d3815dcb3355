"""Prefetching: any predictor, policy, θ and link gives the dense model's numbers bit for bit; what is
prefetched and then used replaces demand copies byte for byte; predictions are scored honestly."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moepic.cache.stats import total
from moepic.commands.train_predictor import run_train_predictor
from moepic.checkpoint.load import load_model
from moepic.default_model import default_model_dir
from moepic.policies import POLICIES
from moepic.predictors import PREDICTORS
from moepic.predictors.gate_lookahead import GateLookaheadConfig
from moepic.predictors.mlp import MLPConfig
from moepic.predictors.noisy_oracle import NoisyOracle, NoisyOracleConfig
from moepic.predictors.oracle import OracleConfig, OraclePredictor
from moepic.runtime.copy_engine import Link
from moepic.runtime.generation import generate
from moepic.cache.layout import staging_buffers
from moepic.runtime.offload import offloaded_experts
from moepic.tracing import save_trace
from moepic.tracing.recorder import RoutingRecorder
from tests_support import (
    Models,
    assert_slots_hold_the_host_bytes,
    budget_between_the_minimum_and_everything,
    dense_run,
    load_split_friendly,
    policy_for,
)

MODELS = ("mixtral", "qwen2_moe", "olmoe")
PROMPT = [1, 17, 5, 42, 8, 33, 9, 60, 21, 4, 77, 12]


@pytest.fixture(scope="module")
def models(checkpoint_dir):
    return load_split_friendly(checkpoint_dir, MODELS)


@pytest.fixture(scope="module")
def mlp_dirs(models, checkpoint_dir, tmp_path_factory):
    """A small trained `mlp` predictor (horizon 2) per model, from a trace with hidden states."""
    out = {}
    for name, model in models.items():
        recorder = RoutingRecorder(model.spec, model_name=name, record_hidden=True)
        generate(model, PROMPT, max_new_tokens=40, eos_ids=(), tap=recorder)
        folder = tmp_path_factory.mktemp(f"mlp-{name}")
        save_trace(recorder.trace(), folder / "trace.npz")
        run_train_predictor(
            str(checkpoint_dir(name)), traces=[str(folder / "trace.npz")], text_file=None, out=str(folder / "mlp"),
            width=16, horizon=2, epochs=30, valid=0.5, progress=False,
        )
        out[name] = str(folder / "mlp")
    return Models(out)


def predictor_for(name, model_name, model, trace, draw_config, mlp_dirs):
    if name == "oracle":
        return OraclePredictor(OracleConfig(horizon=draw_config["horizon"]), model, future=trace)
    if name == "noisy_oracle":
        return NoisyOracle(NoisyOracleConfig(recall=0.6, candidates=draw_config["candidates"]), model, future=trace)
    if name == "gate_lookahead":
        return PREDICTORS.build(GateLookaheadConfig(**draw_config), model)
    if name == "mlp":
        config = MLPConfig(path=mlp_dirs[model_name], candidates=draw_config["candidates"], horizon=draw_config["horizon"])
        return PREDICTORS.build(config, model)
    return PREDICTORS.build(PREDICTORS[name].config(), model)


def run_offloaded(model, prompt, new_tokens, engine):
    try:
        return generate(model, prompt, max_new_tokens=new_tokens, eos_ids=(), keep_logits=True, experts=engine)
    finally:
        engine.close()


def assert_prefetched_bytes_replace_demand_bytes(engine) -> None:
    planned = total((*engine.prefill_stats.values(), *engine.decode_stats.values())).bytes_loaded
    c = engine.counters
    # Every byte loaded was routed (demand, used prefetch), wasted, or kept in the cache by the policy.
    assert c.demand_bytes + c.prefetch_bytes - c.wasted_prefetch_bytes - c.kept_prefetch_bytes == planned
    assert engine.copies.current_stats().bytes == c.demand_bytes + c.prefetch_bytes


@given(
    name=st.sampled_from(MODELS),
    predictor=st.sampled_from(sorted(PREDICTORS)),
    predictor_config=st.fixed_dictionaries(
        {"candidates": st.integers(1, 5), "horizon": st.integers(1, 2), "reads": st.sampled_from(["router_input", "rescaled", "layer_output"])}
    ),
    policy=st.sampled_from(sorted(POLICIES)),
    share=st.floats(0.0, 1.0),
    theta=st.sampled_from([0.0, 0.25, 0.5, 1.0]),
    link=st.sampled_from([None, Link(gbps=2.0, latency_us=5.0)]),
    prompt_len=st.integers(1, len(PROMPT)),
    new_tokens=st.integers(1, 6),
)
def test_prefetching_generation_equals_the_dense_model_bit_for_bit(
    models, mlp_dirs, name, predictor, predictor_config, policy, share, theta, link, prompt_len, new_tokens
):
    model = models[name]
    prompt = PROMPT[:prompt_len]
    dense, trace = dense_run(model, prompt, new_tokens)
    pred = predictor_for(predictor, name, model, trace, predictor_config, mlp_dirs)
    staging = staging_buffers(model.spec.moe.top_k, pred)
    budget = budget_between_the_minimum_and_everything(model, share, staging_experts=staging)
    engine = offloaded_experts(model, budget, theta, link=link, policy=policy_for(policy, trace), predictor=pred)
    offloaded = run_offloaded(model, prompt, new_tokens, engine)
    assert offloaded.token_ids == dense.token_ids
    assert all(torch.equal(a, b) for a, b in zip(offloaded.logits, dense.logits))
    assert_prefetched_bytes_replace_demand_bytes(engine)
    assert engine.staging.in_use == 0  # every staging buffer came back


def test_oracle_predicts_every_decode_expert_and_wastes_nothing(models):
    model = models["mixtral"]
    dense, trace = dense_run(model, PROMPT, 8)
    oracle = OraclePredictor(OracleConfig(), model, future=trace)
    engine = offloaded_experts(model, 0.5, 0.5, POLICIES["lru"].config(), predictor=oracle)
    offloaded = run_offloaded(model, PROMPT, 8, engine)
    report = engine.report()
    assert offloaded.token_ids == dense.token_ids
    assert report["prediction_recall"] == report["prediction_precision"] == 1.0
    assert report["wasted_prefetch_bytes"] == 0
    assert report["layer_prediction_recall"][0] is None  # nothing predicts the first MoE layer
    assert_prefetched_bytes_replace_demand_bytes(engine)


def test_no_predictor_loads_everything_on_demand(models):
    model = models["olmoe"]
    dense, trace = dense_run(model, PROMPT, 5)
    engine = offloaded_experts(model, 0.5, 0.5, POLICIES["lcp"].config())
    run_offloaded(model, PROMPT, 5, engine)
    report = engine.report()
    assert report["prefetch_bytes"] == 0 and report["demand_bytes"] == report["bytes_loaded"]
    assert report["prediction_recall"] is None


def test_gate_lookahead_recall_on_the_bundled_model_is_reported_per_layer_and_beats_chance():
    model = load_model(default_model_dir(), offload_experts=True)
    prompt = list(range(300, 340))
    engine = offloaded_experts(model, 0.3, 0.4, POLICIES["lcp"].config(), GateLookaheadConfig())
    run_offloaded(model, prompt, 24, engine)
    report = engine.report()
    recalls = report["layer_prediction_recall"]
    assert recalls[0] is None and all(0 <= r <= 1 for r in recalls[1:])
    chance = model.spec.moe.top_k / model.spec.moe.num_experts
    assert report["prediction_recall"] > 2 * chance  # the bundled model: 68–86 % measured by routing-report


def test_a_slow_link_makes_copies_exposed_and_prefetching_hides_part_of_them():
    model = load_model(default_model_dir(), offload_experts=True)
    prompt = list(range(300, 316))
    dense, trace = dense_run(model, prompt, 12)
    link = Link(gbps=0.5, latency_us=50)
    exposed = {}
    for name in ("none", "oracle"):
        predictor = OraclePredictor(OracleConfig(), model, future=trace) if name == "oracle" else None
        engine = offloaded_experts(model, 0.3, 0.0, POLICIES["lcp"].config(), link=link, predictor=predictor)
        result = run_offloaded(model, prompt, 12, engine)
        assert result.token_ids == dense.token_ids
        exposed[name] = engine.report()["decode_exposed_copy_s_per_token"]
    assert exposed["none"] > 0
    assert exposed["oracle"] < exposed["none"]


def test_wrong_prefetches_the_policy_admits_are_kept_and_the_numbers_stay_exact(models):
    model = models["mixtral"]
    dense, trace = dense_run(model, PROMPT, 10)
    # Predict every expert, so most prefetches are wrong; random priorities keep some of them.
    predictor = PREDICTORS.build(GateLookaheadConfig(candidates=model.spec.moe.num_experts), model)
    engine = offloaded_experts(model, [0.75] * 3, 1.0, policy=policy_for("random", trace), predictor=predictor)
    offloaded = run_offloaded(model, PROMPT, 10, engine)
    assert offloaded.token_ids == dense.token_ids
    assert all(torch.equal(a, b) for a, b in zip(offloaded.logits, dense.logits))
    assert engine.counters.kept_prefetches > 0
    assert_prefetched_bytes_replace_demand_bytes(engine)
    assert any(e >= 0 for r in engine.residency.values() for e in r.cache.slots_S)
    assert_slots_hold_the_host_bytes(engine)


@given(
    name=st.sampled_from(MODELS),
    predictor=st.sampled_from(["none", "gate_lookahead", "oracle"]),
    theta=st.sampled_from([0.25, 0.5, 0.75]),
    link=st.sampled_from([None, Link(gbps=2.0, latency_us=5.0)]),
    prompt_len=st.integers(1, len(PROMPT)),
)
def test_overlapping_the_cached_top_with_its_bottom_copy_keeps_tokens_and_logits_within_rounding(
    models, name, predictor, theta, link, prompt_len
):
    model = models[name]
    prompt = PROMPT[:prompt_len]
    dense, trace = dense_run(model, prompt, 6)
    pred = predictor_for(predictor, name, model, trace, {"candidates": 2, "horizon": 1, "reads": "router_input"}, None)
    engine = offloaded_experts(model, 1.0, theta, POLICIES["lru"].config(), link=link, predictor=pred, overlap_top=True)
    offloaded = run_offloaded(model, prompt, 6, engine)
    assert offloaded.token_ids == dense.token_ids
    for a, b in zip(offloaded.logits, dense.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert total(engine.decode_stats.values()).partial_hits > 0 or len(dense.token_ids) == 1
    assert_prefetched_bytes_replace_demand_bytes(engine)


def test_router_input_predictions_are_read_back_with_the_routing_not_on_their_own(models):
    """The engine hands the predictor's device-side guess to the MoE block, which reads it in the same
    transfer as the routing; the predictor then never reads anything back itself."""
    model = models["mixtral"]
    predictor = PREDICTORS.build(GateLookaheadConfig(), model)
    seen = []
    original = predictor.predict

    def predict(state, layer, hidden, clock, guess_rows=None):
        seen.append((layer, guess_rows is not None))
        return original(state, layer, hidden, clock, guess_rows)

    predictor.predict = predict
    engine = offloaded_experts(model, 0.9, 0.5, POLICIES["lcp"].config(), predictor=predictor)
    run_offloaded(model, PROMPT, 3, engine)
    ahead = set(model.spec.moe_layers[:-1])  # the last MoE layer has nothing ahead: nothing to read
    assert seen and all(fused for layer, fused in seen if layer in ahead)
    assert {layer for layer, fused in seen if fused} == ahead
