"""The simulator plans what the engine plans: same trace and configuration, same counters (property).

The engine runs the tiny checkpoints for real (copies, staging, prefetch); the simulator replays
the run's routing trace. They share the planner and the policies, and the simulator's priorities
come from `priority_series`, so every cache counter, byte count and recall must agree exactly.
Predictors here are `none` and `oracle`: a wrong prefetch's fate depends on when its copy lands,
which on a real machine is timing, not planning.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moepic.perfmodel.hardware import load_profile
from moepic.perfmodel.latency import model_times
from moepic.policies import POLICIES
from moepic.predictors.oracle import OracleConfig, OraclePredictor
from moepic.runtime.generation import generate
from moepic.runtime.offload import offloaded_experts
from moepic.cache.layout import staging_buffers
from moepic.sim.simulate import simulate
from moepic.tracing import RoutingTrace
from tests_support import budget_between_the_minimum_and_everything, dense_run, load_split_friendly, policy_for

MODELS = ("mixtral", "qwen2_moe", "olmoe")
PROMPTS = ([1, 17, 5, 42, 8, 33, 9, 60], [7, 3, 29, 12, 41])


@pytest.fixture(scope="module")
def models(checkpoint_dir):
    return load_split_friendly(checkpoint_dir, (*MODELS, "mixtral_deep"))


def concatenated(traces: list[RoutingTrace]) -> RoutingTrace:
    """Several requests' traces as one, each its own sequence."""
    first = traces[0]
    cat = lambda field: np.concatenate([getattr(t, field) for t in traces])  # noqa: E731
    return RoutingTrace(
        model=first.model, moe_layers=first.moe_layers, num_experts=first.num_experts, top_k=first.top_k,
        expert_ids_NLK=cat("expert_ids_NLK"), weights_NLK=cat("weights_NLK"),
        sequence_N=np.concatenate([np.full(t.num_tokens, i, np.int32) for i, t in enumerate(traces)]),
        position_N=cat("position_N"), prefill_N=cat("prefill_N"),
    )


@settings(max_examples=25)
@given(
    name=st.sampled_from(MODELS),
    predictor=st.sampled_from(["none", "oracle"]),
    horizon=st.integers(1, 3),
    policy=st.sampled_from(sorted(POLICIES)),
    share=st.floats(0.0, 1.0),
    theta=st.sampled_from([0.0, 0.25, 0.5, 1.0]),
    prompt_lens=st.lists(st.integers(1, 8), min_size=1, max_size=2),
    new_tokens=st.integers(1, 6),
)
def test_the_simulator_counts_exactly_what_the_engine_counts(
    models, name, predictor, horizon, policy, share, theta, prompt_lens, new_tokens
):
    model = models[name]
    prompts = [PROMPTS[i][:n] for i, n in enumerate(prompt_lens)]
    trace = concatenated([dense_run(model, p, new_tokens)[1] for p in prompts])
    pred = OraclePredictor(OracleConfig(horizon=horizon), model, future=trace) if predictor == "oracle" else None
    staging = staging_buffers(model.spec.moe.top_k, pred) if pred else None
    budget = budget_between_the_minimum_and_everything(model, share, staging_experts=staging)
    engine = offloaded_experts(model, budget, theta, policy=policy_for(policy, trace), predictor=pred)
    try:
        for p in prompts:
            generate(model, p, max_new_tokens=new_tokens, eos_ids=(), experts=engine)
    finally:
        engine.close()
    hw = load_profile("a6000")
    times = model_times(hw, model.spec, dtype_bytes=4, predictor=pred is not None)
    sim = simulate(trace, engine.layout, policy_for(policy, trace), times, hw, predictor=pred)

    assert sim.decode == tuple(engine.decode_stats.values())
    assert sim.prefill == tuple(engine.prefill_stats.values())
    c = engine.counters
    assert (sim.demand_bytes, sim.prefetch_bytes, sim.wasted_prefetch_bytes, sim.cancelled_prefetches, sim.kept_prefetches) == (
        c.demand_bytes, c.prefetch_bytes, c.wasted_prefetch_bytes, c.cancelled_prefetches, c.kept_prefetches
    )
    assert list(sim.recall) == engine.report()["layer_prediction_recall"]
    assert sim.tokens == sum(s.tokens for s in engine.decode_stats.values()) // len(engine.decode_stats)


@settings(max_examples=20)
@given(
    name=st.sampled_from([*MODELS, "mixtral_deep", "mixtral_deep"]),
    horizon=st.integers(2, 3),
    candidates=st.integers(1, 8),
    prompt_len=st.integers(1, 8),
    new_tokens=st.integers(1, 6),
)
def test_with_a_real_predictor_ahead_the_simulator_issues_the_engine_s_prefetches(models, name, horizon, candidates, prompt_len, new_tokens):
    """A gate lookahead several layers ahead names different experts from each source, so its
    prefetches compete for staging (later layers' prefetches hold buffers). Without a cache
    nothing depends on timing but a wrong prefetch's fate (wasted or cancelled), so the copies
    issued, the demand bytes and the recall must agree exactly."""
    from moepic.predictors.gate_lookahead import GateLookahead, GateLookaheadConfig
    from moepic.tracing.recorder import RoutingRecorder

    model = models[name]
    prompt = PROMPTS[0][:prompt_len]
    recorder = RoutingRecorder(model.spec, model_name="test", record_hidden=True)
    generate(model, prompt, max_new_tokens=new_tokens, eos_ids=(), tap=recorder)
    trace = recorder.trace()
    pred = GateLookahead(GateLookaheadConfig(candidates=candidates, horizon=horizon), model)
    staging = staging_buffers(model.spec.moe.top_k, pred)
    from moepic.cache.layout import plan_layout

    big = plan_layout(model.spec, dtype_bytes=model.dtype.itemsize, budget=10**12, theta=0.5, staging_experts=staging)
    budget = staging * big.layers[0].expert_bytes  # staging only: no cache
    engine = offloaded_experts(model, budget, 0.5, policy=policy_for("lru", trace), predictor=pred)
    try:
        generate(model, prompt, max_new_tokens=new_tokens, eos_ids=(), experts=engine)
    finally:
        engine.close()
    assert all(l.slots == 0 for l in engine.layout.layers)
    hw = load_profile("a6000")
    sim = simulate(trace, engine.layout, policy_for("lru", trace), model_times(hw, model.spec, dtype_bytes=4, predictor=True), hw, pred)

    expert_bytes = engine.layout.layers[0].expert_bytes
    assert {l.expert_bytes for l in engine.layout.layers} == {expert_bytes}
    c = engine.counters
    assert sim.prefetch_bytes // expert_bytes + sim.cancelled_prefetches == c.prefetch_bytes // expert_bytes + c.cancelled_prefetches
    assert sim.demand_bytes == c.demand_bytes
    assert sim.decode == tuple(engine.decode_stats.values())
    assert list(sim.recall) == engine.report()["layer_prediction_recall"]


def test_recall_counts_what_every_layer_named_even_where_staging_ran_out():
    """Three layers ahead on the bundled model (16 experts), prefetching runs out of staging before
    the last targets; the engine's recall still counts every named expert, as the simulator does."""
    from moepic.experiments.backends import run_cell
    from moepic.experiments.config import load_experiment

    common = ["workload.source=recorded", "workload.model_shape=bundled", "workload.recorded.requests=2",
              "workload.recorded.prompt_tokens=16", "workload.recorded.new_tokens=12", "configurator=null",
              "cache.theta=0.5", "cache.budget=0.25", "cache.predictor.name=gate_lookahead", "cache.predictor.horizon=3",
              "engine.repeats=1"]
    sim = run_cell(load_experiment(None, "moepic-lcp", common))
    engine = run_cell(load_experiment(None, "moepic-lcp", [*common, "backend=engine"]))
    assert [r["recall"] for r in engine["layers"]] == [r["recall"] for r in sim["layers"]]
    assert engine["metrics"]["prediction_recall"] == sim["metrics"]["prediction_recall"]


@settings(max_examples=20, deadline=None)
@given(
    name=st.sampled_from(MODELS),
    policy=st.sampled_from(sorted(POLICIES)),
    share=st.floats(0.0, 1.0),
    theta=st.sampled_from([0.0, 0.25, 0.5, 1.0]),
    mode=st.sampled_from(["host-only", "auto"]),
    host_gbps=st.sampled_from([0.05, 1.0, 100.0]),
    new_tokens=st.integers(1, 6),
)
def test_hybrid_the_simulator_places_and_counts_exactly_what_the_engine_does(
    models, name, policy, share, theta, mode, host_gbps, new_tokens
):
    """Without a predictor a hybrid step's placement depends on nothing the two time differently
    (no prefetch is under way), so with the same prices the engine and the simulator place every
    load alike: the same hits, host loads, fills and copies. One-token prompts: every step is a decode step."""
    import attrs

    from moepic.perfmodel.hardware import HostProfile
    from moepic.perfmodel.host_costs import HostPricing

    model = models[name]
    prompts = [PROMPTS[0][:1], PROMPTS[1][:1]]
    trace = concatenated([dense_run(model, p, new_tokens)[1] for p in prompts])
    host = HostProfile(name="test", source="test", bf16_expert_gbps=host_gbps, fp32_expert_gbps=host_gbps,
                       call_overhead_us=5.0, memory_gbps=4 * host_gbps, physical_cores=2, result_latency_us=2.0)
    hw = attrs.evolve(load_profile("a6000"), link_gbps=0.5, host=host)
    engine = offloaded_experts(
        model, budget_between_the_minimum_and_everything(model, share), theta, policy=policy_for(policy, trace),
        hybrid=mode, pricing=HostPricing.of(hw, model.dtype.itemsize) if mode == "auto" else None,
    )
    try:
        for p in prompts:
            generate(model, p, max_new_tokens=new_tokens, eos_ids=(), experts=engine)
    finally:
        engine.close()
    sim = simulate(trace, engine.layout, policy_for(policy, trace), model_times(hw, model.spec, dtype_bytes=4), hw, hybrid=mode)

    assert sim.decode == tuple(engine.decode_stats.values())
    c = engine.counters
    layers = [l.layer for l in engine.layout.layers]
    counted = lambda h: (h.experts, h.bottoms, h.splits, h.bytes, h.fills, h.fill_bytes)  # noqa: E731 (not the seconds)
    assert [counted(h) for h in sim.host] == [counted(c.host[l]) for l in layers]
    assert sim.demand_bytes == c.demand_bytes
