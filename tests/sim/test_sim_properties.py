"""What a simulated run must satisfy whatever the trace, shape, policy and budget (property), what the
presets and named baselines are, and the bound the design claims on real routing.

Small random shapes and traces drive the event model through the engine's planner; the `none` and
`oracle` predictors keep planning independent of timing (a wrong prefetch's admission depends on
when it lands), so a change of hardware changes only the times, never the plans.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import attrs
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moepic.cache.layout import plan_layout, staging_buffers
from moepic.core.footprint import footprint
from moepic.core.spec import ModelSpec, MoESpec, RopeSpec
from moepic.errors import ConfigError
from moepic.perfmodel.hardware import load_profile
from moepic.perfmodel.latency import model_times
from moepic.policies import POLICIES
from moepic.sim.baseline import ORDER, load_baseline
from moepic.sim.run import Testbed, SpecOnly, check_trace_fits, run_setup
from moepic.sim.shapes import PRESETS, model_shape
from moepic.sim.simulate import simulate
from moepic.sim.steps import trace_steps
from moepic.tracing import RoutingTrace
from moepic.tracing.jsonl import load_jsonl_trace
from moepic.tracing.synthetic import SyntheticRouting, generate_trace
from sim_support import Case, request_trace, requests, routing_trace
from tests_support import policy_for

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "traces" / "mixtral-8x7b-instruct-fp8"
GSM8K = SHARED / "gsm8k_2_routing.jsonl"
A6000 = load_profile("a6000")


# --- builders ----------------------------------------------------------------------------------


def moe_spec(layers: int, experts: int, top_k: int, ffn: int, hidden: int) -> ModelSpec:
    return ModelSpec(
        model_type="test", vocab_size=64, hidden_size=hidden, num_heads=4, num_kv_heads=2, head_dim=hidden // 4,
        norm_eps=1e-6, rope=RopeSpec(theta=1e4), layer_kinds=("moe",) * layers,
        moe=MoESpec(num_experts=experts, top_k=top_k, expert_ffn=ffn),
    )


@st.composite
def cases(draw, predictors=("none", "oracle")):
    L, K = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    E = draw(st.integers(K + 1, 8))
    spec = moe_spec(L, E, K, ffn=draw(st.sampled_from([64, 256, 2048])), hidden=draw(st.sampled_from([64, 512, 2048])))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    trace = request_trace(rng, draw(requests()), L, E, K, draw(st.sampled_from([0.3, 1.0, 5.0])))
    return Case(
        spec=spec, trace=trace, policy=draw(st.sampled_from(sorted(POLICIES))), predictor=draw(st.sampled_from(predictors)),
        theta=draw(st.sampled_from([0.0, 0.25, 0.5, 1.0])), share=draw(st.floats(0.0, 1.0)),
    )


@st.composite
def hardware(draw):
    """The a6000 profile with a link from very slow to fast and, sometimes, the engine's host work."""
    return attrs.evolve(
        A6000, link_gbps=draw(st.sampled_from([0.05, 1.0, 25.0])), link_latency_us=draw(st.sampled_from([0.0, 10.0])),
        offload_step_us=draw(st.sampled_from([0.0, 20.0])), load_us=draw(st.sampled_from([0.0, 5.0])),
    )


def compute_only_s(times, spec: ModelSpec, predicting: bool) -> float:
    """A decode token with every expert resident: the rest, per MoE layer its layer and k experts, and
    a prediction in every MoE layer that has a next one to predict."""
    L = len(spec.moe_layers)
    predictions = max(0, L - 1) if predicting else 0
    return times.rest_s + L * (times.layer_s + spec.moe.top_k * times.expert_s) + predictions * times.predictor_s


def decode_tokens(trace: RoutingTrace) -> int:
    return int(trace_steps(trace).decode_S.sum())


# --- the event model: faster hardware, resident experts, bounds -----------------------------------


@settings(max_examples=25)
@given(case=cases(), hw=hardware(), faster=st.sampled_from([1.5, 4.0, 100.0]), less_latency=st.sampled_from([0.0, 0.5, 1.0]))
def test_a_faster_link_never_makes_any_token_slower(case, hw, faster, less_latency):
    slow, _ = case.run(hw)
    fast, _ = case.run(attrs.evolve(hw, link_gbps=hw.link_gbps * faster, link_latency_us=hw.link_latency_us * less_latency))
    assert fast.decode == slow.decode  # the same plans: only the times change
    assert np.all(fast.token_s <= slow.token_s * (1 + 1e-12)), np.max(fast.token_s - slow.token_s)
    assert np.all(fast.exposed_s <= slow.exposed_s * (1 + 1e-12) + 1e-15)


@settings(max_examples=25)
@given(case=cases(), hw=hardware(), faster=st.sampled_from([1.5, 4.0, 100.0]))
def test_faster_compute_never_makes_any_token_slower(case, hw, faster):
    slow, _ = case.run(hw)
    quick = attrs.evolve(
        hw, memory_gbps=hw.memory_gbps * faster, matmul_tflops=hw.matmul_tflops * faster,
        device_copy_gbps=hw.device_copy_gbps * faster, expert_overhead_us=hw.expert_overhead_us / faster,
        layer_overhead_us=hw.layer_overhead_us / faster, offload_step_us=hw.offload_step_us / faster,
        load_us=hw.load_us / faster,
    )
    fast, _ = case.run(quick)
    assert fast.decode == slow.decode
    assert np.all(fast.token_s <= slow.token_s * (1 + 1e-12)), np.max(fast.token_s - slow.token_s)


@settings(max_examples=20)
@given(case=cases(), hw=hardware())
def test_with_every_expert_resident_nothing_is_loaded_and_each_token_costs_its_compute(case, hw):
    predictor = case.build_predictor()
    resident = plan_layout(case.spec, dtype_bytes=2, budget=1.0, theta=1.0, staging_experts=staging_buffers(case.spec.moe.top_k, predictor))
    assert all(l.fully_resident for l in resident.layers) and resident.staging_experts == 0
    result, times = case.run(hw, layout=resident)
    assert result.tokens == decode_tokens(case.trace)
    assert result.demand_bytes == result.prefetch_bytes == result.wasted_prefetch_bytes == 0
    assert all(s.misses == s.partial_hits == s.bytes_loaded == 0 for s in result.decode + result.prefill)
    assert np.all(result.exposed_s == 0.0)
    # The engine's host work is charged only where a layer offloads: here none does.
    expected = compute_only_s(times, case.spec, predicting=case.predicting)
    np.testing.assert_allclose(result.token_s, expected, rtol=1e-12)


@settings(max_examples=25)
@given(case=cases(), hw=hardware())
def test_a_token_takes_at_least_its_compute_and_its_waits_fit_inside_it(case, hw):
    result, times = case.run(hw)
    assert result.tokens == decode_tokens(case.trace) == len(result.exposed_s)
    floor = compute_only_s(times, case.spec, predicting=case.predicting)
    assert np.all(result.token_s >= floor * (1 - 1e-12))
    assert np.all(result.exposed_s >= 0.0)
    assert np.all(result.exposed_s <= result.token_s - floor * (1 - 1e-12) + 1e-15)
    # The per-layer means add up, with the rest, to the mean token.
    if result.tokens:
        assert result.layer_s.sum() + times.rest_s == pytest.approx(result.token_s.mean(), rel=1e-9)
        assert result.layer_exposed_s.sum() == pytest.approx(result.exposed_s.mean(), rel=1e-9, abs=1e-15)
        assert np.all(result.layer_exposed_s <= result.layer_s)


@settings(max_examples=25)
@given(case=cases(), hw=hardware())
def test_bytes_loaded_are_the_plans_bytes_and_every_copied_byte_is_accounted_for(case, hw):
    result, _ = case.run(hw)
    for stats, layer in zip(result.decode, result.layout.layers):
        assert stats.activations == stats.hits + stats.partial_hits + stats.misses == stats.tokens * case.spec.moe.top_k
        assert stats.bytes_loaded == stats.misses * layer.expert_bytes + stats.partial_hits * layer.bottom_bytes
    for stats, layer in zip(result.prefill, result.layout.layers):
        assert stats.bytes_loaded == stats.misses * layer.expert_bytes + stats.partial_hits * layer.bottom_bytes
    used = sum(s.bytes_loaded for s in result.decode + result.prefill)
    assert used == result.demand_bytes + result.prefetch_bytes - result.wasted_prefetch_bytes - result.kept_prefetch_bytes
    summary = result.summary()
    if result.tokens:
        assert summary["bytes_loaded_per_token"] == pytest.approx(sum(s.bytes_loaded for s in result.decode) / result.tokens)
        assert sum(l["bytes_loaded_per_token"] for l in summary["layers"]) == pytest.approx(summary["bytes_loaded_per_token"])
    json.dumps(summary)  # JSON-ready


@settings(max_examples=25)
@given(case=cases(predictors=("oracle",)), hw=hardware())
def test_the_oracle_names_every_routed_expert_after_the_first_layer_and_wastes_no_copy(case, hw):
    result, _ = case.run(hw)
    assert result.recall[0] is None and result.precision[0] is None  # nothing predicts the first MoE layer
    if result.tokens:
        assert all(r == 1.0 for r in result.recall[1:]) and all(p == 1.0 for p in result.precision[1:])
        assert result.overall_recall == (1.0 if len(result.recall) > 1 else None)
    assert result.wasted_prefetch_bytes == result.cancelled_prefetches == result.kept_prefetches == 0


@settings(max_examples=20)
@given(case=cases(predictors=("none",)), hw=hardware())
def test_without_a_predictor_nothing_is_prefetched_and_every_load_is_on_demand(case, hw):
    result, _ = case.run(hw)
    assert result.prefetch_bytes == result.wasted_prefetch_bytes == result.cancelled_prefetches == result.kept_prefetches == 0
    assert all(r is None for r in result.recall) and result.overall_recall is None
    assert result.demand_bytes == sum(s.bytes_loaded for s in result.decode + result.prefill)


def test_a_wrong_prefetch_on_an_idle_link_is_offered_for_admission_and_kept():
    """A noisy oracle of recall 0 names a wrong expert for layer 1, which routes to 0; the link is idle, so the
    copy lands during layer 0's compute, and LRU admits it into layer 1's free slot: kept, not wasted."""
    from moepic.predictors.noisy_oracle import NoisyOracle, NoisyOracleConfig

    spec = moe_spec(2, 4, 1, ffn=64, hidden=64)
    trace = routing_trace([[[1], [0]]], 4)
    predictor = NoisyOracle(NoisyOracleConfig(recall=0.0, seed=0), SpecOnly(spec), future=trace)
    wrong = int(predictor.trace_predictions(trace)[1][0, 0])
    assert wrong != 0
    staging = staging_buffers(1, predictor)
    layout = plan_layout(spec, dtype_bytes=2, budget=[1.0, 1.0], theta=1.0, staging_experts=staging)
    layout = attrs.evolve(layout, staging_experts=staging, layers=(layout.layers[0], attrs.evolve(layout.layers[1], slots=2)))
    times = model_times(A6000, spec, dtype_bytes=2, predictor=True)
    result = simulate(trace, layout, policy_for("lru", trace), times, A6000, predictor)
    expert_bytes = layout.layers[1].expert_bytes
    assert (result.kept_prefetches, result.kept_prefetch_bytes, result.wasted_prefetch_bytes) == (1, expert_bytes, 0)
    assert result.recall[1] == 0.0 and result.precision[1] == 0.0
    # The cache counters count routed experts only: the kept guess is in kept_prefetches.
    assert (result.decode[1].misses, result.decode[1].admissions) == (1, 1)


# --- steps: a prompt is one step, only one-token steps are timed ----------------------------------


@settings(max_examples=40)
@given(reqs=requests(max_sequences=3, max_prompt=6), seed=st.integers(0, 2**16))
def test_a_prompt_is_one_step_and_only_one_token_steps_are_timed(reqs, seed):
    trace = request_trace(np.random.default_rng(seed), reqs, 2, 6, 2)
    steps = trace_steps(trace)
    assert steps.num_steps == sum((p > 0) + d for p, d in reqs)
    assert int(steps.tokens_S.sum()) == trace.num_tokens
    expected_tokens = [n for p, d in reqs for n in ([p] if p else []) + [1] * d]
    assert steps.tokens_S.tolist() == expected_tokens
    assert steps.new_request_S.sum() == len(reqs)
    assert np.all(trace.sequence_N[steps.start_S[steps.new_request_S]] == np.arange(len(reqs)))
    assert steps.decode_S.tolist() == [n == 1 for n in expected_tokens]  # a one-token prompt counts as decode
    spec = moe_spec(2, 6, 2, ffn=64, hidden=64)
    case = Case(spec=spec, trace=trace, policy="lru", predictor="none", theta=1.0, share=0.3)
    result, _ = case.run(A6000)
    assert result.tokens == sum(d + (p == 1) for p, d in reqs)
    prompts = [p for p, _ in reqs if p > 1]
    for stats in result.prefill:
        assert (stats.steps, stats.tokens) == (len(prompts), sum(prompts))
    for stats in result.decode:
        assert stats.steps == stats.tokens == result.tokens


# --- check_trace_fits -------------------------------------------------------------------------------


def mixtral_like_trace(layers: int = 32, top_k: int = 2, num_experts: int = 8, largest: int = 7) -> RoutingTrace:
    ids = np.zeros((3, layers, top_k), np.int64)
    ids[..., :] = np.arange(top_k)
    ids[1, 0, 0] = largest
    return routing_trace(ids, num_experts)


def test_a_trace_with_more_moe_layers_than_the_shape_is_refused():
    with pytest.raises(ConfigError, match=r"^t\.npz: the trace has 33 MoE layers, the model shape mixtral-8x7b has 32$"):
        check_trace_fits(mixtral_like_trace(layers=33), PRESETS["mixtral-8x7b"], "t.npz")


def test_a_trace_of_another_top_k_is_refused():
    with pytest.raises(ConfigError, match=r"the trace routes top-3, the model shape mixtral-8x7b top-2$"):
        check_trace_fits(mixtral_like_trace(top_k=3), PRESETS["mixtral-8x7b"], "t.npz")


def test_a_trace_with_expert_ids_beyond_the_shapes_experts_is_refused():
    with pytest.raises(ConfigError, match=r"expert ids up to 8, but the model shape mixtral-8x7b has 8 experts$"):
        check_trace_fits(mixtral_like_trace(num_experts=9, largest=8), PRESETS["mixtral-8x7b"], "t.npz")


def test_a_jsonl_trace_that_saw_fewer_experts_adopts_the_shapes_experts_and_layers(tmp_path):
    """A JSONL log knows only the ids it saw (here 0–5) and numbers layers from 0; DeepSeek-V2-Lite
    has 64 experts and its first layer is dense, so its MoE layers are 1–26."""
    shape = PRESETS["deepseek-v2-lite"]
    rng = np.random.default_rng(0)
    lines = [
        json.dumps({"problem_id": 0, "layer": layer, "token_idx": t, "experts": rng.permutation(6)[:6].tolist(),
                    "gating_probs": [1 / 6] * 6})
        for layer in range(26) for t in range(5)
    ]
    (tmp_path / "log.jsonl").write_text("\n".join(lines) + "\n")
    trace = load_jsonl_trace(tmp_path / "log.jsonl")
    assert trace.num_experts == 6 and trace.moe_layers == tuple(range(26))
    fitted = check_trace_fits(trace, shape, "log.jsonl")
    assert fitted.num_experts == 64 and fitted.moe_layers == tuple(range(1, 27)) == shape.spec.moe_layers
    np.testing.assert_array_equal(fitted.expert_ids_NLK, trace.expert_ids_NLK)
    run = run_setup(load_baseline("on-demand-lru"), Testbed(trace=fitted, shape=shape, hw=A6000, budget=0.5))
    assert run.result.tokens == 5 and [s.layer for s in run.result.decode] == list(range(1, 27))


# --- presets -----------------------------------------------------------------------------------------

# Published configs: model width D and expert width F (one routed expert is 3·D·F bf16 weights, and
# 2·F gate/up biases where experts have them: GPT-OSS), its
# size in MB as usually quoted, MoE layers, experts, top-k, and total parameters from the model cards.
PUBLISHED = {
    "mixtral-8x7b": (4096, 14336, 352.3, 32, 8, 2, 46.7e9),
    "qwen1.5-moe-a2.7b": (2048, 1408, 17.3, 24, 60, 4, 14.3e9),
    "deepseek-v2-lite": (2048, 1408, 17.3, 26, 64, 6, 15.7e9),
    "deepseek-v3": (7168, 2048, 88.1, 58, 256, 8, 671e9),
    "glm-4.5-air": (4096, 1408, 34.6, 45, 128, 8, 106e9),
    "gpt-oss-20b": (2880, 2880, 49.8, 24, 32, 4, 20.91e9),
    "gpt-oss-120b": (2880, 2880, 49.8, 36, 128, 4, 116.83e9),
    "phi-3.5-moe": (4096, 6400, 157.3, 32, 16, 2, 41.9e9),
    "llama-4-scout": (5120, 8192, 251.7, 48, 16, 1, 107.77e9),  # the text model: 109 B with the vision tower
    "olmoe-1b-7b": (2048, 1024, 12.6, 16, 64, 8, 6.9e9),
    "qwen3-30b-a3b": (2048, 768, 9.4, 48, 128, 8, 30.5e9),
}


def test_the_presets_are_the_published_shapes():
    assert set(PRESETS) == set(PUBLISHED)
    for name, (D, F, megabytes, moe_layers, experts, top_k, total) in PUBLISHED.items():
        shape = PRESETS[name]
        fp = footprint(shape.spec)
        expert_bytes = fp.routed_expert_params * shape.dtype_bytes
        assert expert_bytes == (3 * D + 2 * shape.spec.moe.expert_bias) * F * 2 and round(expert_bytes / 1e6, 1) == megabytes, name
        assert len(shape.spec.moe_layers) == moe_layers, name
        assert (shape.spec.moe.num_experts, shape.spec.moe.top_k) == (experts, top_k), name
        assert fp.total_params == pytest.approx(total, rel=0.01), name


def test_a_preset_is_found_by_name_in_any_case_and_an_unknown_one_lists_the_known():
    assert model_shape("Mixtral-8x7B") is PRESETS["mixtral-8x7b"]
    with pytest.raises(ConfigError) as error:
        model_shape("gpt-5")
    assert str(error.value).startswith("unknown model shape 'gpt-5'; known: deepseek-v2-lite, deepseek-v3, glm-4.5-air, gpt-oss-120b, gpt-oss-20b, llama-4-scout, mixtral")


# --- named baselines -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic_runs():
    """{preset: (trace, {baseline: SetupRun})} at a budget of 0.5 and a stand-in recall of 0.8."""
    out = {}
    for name in ("mixtral-8x7b", "deepseek-v2-lite"):
        shape = PRESETS[name]
        L, moe = len(shape.spec.moe_layers), shape.spec.moe
        routing = SyntheticRouting(num_experts=moe.num_experts, top_k=moe.top_k, skew=[1.0] * L, reuse=[1.0] * L,
                                   decay=[0.5] * L, correlation=[1.0] * L)
        trace = check_trace_fits(generate_trace(routing, 32, seed=1, sequences=2), shape, "synthetic")
        testbed = Testbed(trace=trace, shape=shape, hw=A6000, budget=0.5, recall=0.8)
        out[name] = (trace, {b: run_setup(load_baseline(b), testbed) for b in ORDER})
    return out


@pytest.mark.parametrize("preset", ["mixtral-8x7b", "deepseek-v2-lite"])
@pytest.mark.parametrize("name", ORDER)
def test_every_named_baseline_says_what_it_approximates_and_runs_within_its_budget(synthetic_runs, preset, name):
    setup = load_baseline(name)
    assert setup.name == name and setup.approximates.strip()
    trace, runs = synthetic_runs[preset]
    shape = PRESETS[preset]
    result = runs[name].result
    assert result.tokens == 32
    predicting = setup.predictor.name != "none"
    times = model_times(A6000, shape.spec, dtype_bytes=2, predictor=predicting)
    assert np.all(np.isfinite(result.token_s)) and np.all(result.token_s >= compute_only_s(times, shape.spec, predicting) * (1 - 1e-12))
    layout = result.layout
    assert layout.cache_bytes + layout.staging_bytes <= 0.5 * footprint(shape.spec).routed_expert_bytes(2)
    if setup.configurator is None:
        assert all(l.theta == pytest.approx(setup.theta, abs=l.block / l.ffn_size) for l in layout.layers)
    if setup.predictor.name == "none":
        assert result.prefetch_bytes == 0 and result.overall_recall is None
    elif setup.predictor.name == "oracle":
        assert result.overall_recall == 1.0 and result.wasted_prefetch_bytes == 0
    else:  # gate lookahead, simulated as a noisy oracle of recall 0.8: ~31·32·k draws
        assert result.overall_recall == pytest.approx(0.8, abs=0.06)
    if setup.theta == 0.0 and setup.configurator is None:  # nothing cached: every expert is copied whole
        assert layout.cache_bytes == 0 and all(s.hits == s.partial_hits == 0 for s in result.decode)


@pytest.mark.parametrize("preset", [
    "mixtral-8x7b",
    "deepseek-v2-lite",
])
def test_no_baseline_counts_a_prediction_for_the_first_moe_layer(synthetic_runs, preset):
    _, runs = synthetic_runs[preset]
    for name, run in runs.items():
        assert run.result.recall[0] is None, name


def test_the_oracle_bound_is_the_fastest_baseline_on_synthetic_routing(synthetic_runs):
    for preset, (_, runs) in synthetic_runs.items():
        oracle = runs["oracle"].result.token_s.mean()
        slower = {n: r.result.token_s.mean() for n, r in runs.items() if r.result.token_s.mean() < oracle}
        assert not slower, (preset, oracle, slower)


@pytest.fixture(scope="module")
def gsm8k():
    """The shared GSM8K trace on the Mixtral shape, and the oracle bound's mean token time per budget."""
    if not GSM8K.is_file():
        pytest.skip(f"shared Mixtral routing trace not found at {GSM8K}")
    shape = PRESETS["mixtral-8x7b"]
    trace = check_trace_fits(load_jsonl_trace(GSM8K), shape, str(GSM8K))
    oracle = {b: run_setup(load_baseline("oracle"), Testbed(trace=trace, shape=shape, hw=A6000, budget=b)).result for b in (0.25, 0.5)}
    return trace, shape, oracle


@pytest.mark.parametrize("recall", [0.85, 1.0])
@pytest.mark.parametrize("budget", [0.25, 0.5])
def test_the_oracle_bound_is_never_slower_than_moepic_on_real_routing(gsm8k, budget, recall):
    trace, shape, oracle = gsm8k
    moepic = run_setup(load_baseline("moepic"), Testbed(trace=trace, shape=shape, hw=A6000, budget=budget, recall=recall)).result
    assert moepic.tokens == oracle[budget].tokens > 200
    assert math.isfinite(moepic.token_s.mean())
    assert oracle[budget].token_s.mean() <= moepic.token_s.mean()
