"""The noisy oracle: the trace's future degraded to a chosen recall. It names each routed expert with
probability `recall` (per MoE layer), fills k′ candidates with experts the layer does not route,
names routed experts first, is seeded, and answers the engine's `predict` as it answers the
simulator's `trace_predictions`."""

from __future__ import annotations

import attrs
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moepic.core.spec import ModelSpec, MoESpec, RopeSpec
from moepic.errors import ConfigError
from moepic.predictors import PREDICTORS
from moepic.predictors.base import merge_votes
from moepic.predictors.noisy_oracle import NoisyOracle, NoisyOracleConfig
from moepic.perfmodel.workload import measured_recall
from moepic.sim.run import SpecOnly
from moepic.tracing import RoutingTrace, save_trace

# A dense first layer, then three MoE layers (model layers 1, 2, 3): the first MoE layer is not layer 0.
LAYERS = ("dense", "moe", "moe", "moe")


def spec_of(experts: int, top_k: int, layer_kinds=LAYERS) -> ModelSpec:
    return ModelSpec(
        model_type="test", vocab_size=64, hidden_size=16, num_heads=2, num_kv_heads=1, head_dim=8, norm_eps=1e-6,
        rope=RopeSpec(theta=1e4), layer_kinds=layer_kinds, dense_ffn=32,
        moe=MoESpec(num_experts=experts, top_k=top_k, expert_ffn=16),
    )


def uniform_trace(spec: ModelSpec, tokens: int, seed: int) -> RoutingTrace:
    """Each token routes to k distinct experts drawn uniformly, in every MoE layer."""
    rng = np.random.default_rng(seed)
    E, K, L = spec.moe.num_experts, spec.moe.top_k, len(spec.moe_layers)
    ids = np.argsort(rng.random((tokens, L, E)), axis=-1)[..., :K]
    return RoutingTrace(
        model="test", moe_layers=spec.moe_layers, num_experts=E, top_k=K, expert_ids_NLK=ids.astype(np.int64),
        weights_NLK=np.full((tokens, L, K), 1 / K, np.float32), sequence_N=np.zeros(tokens, np.int32),
        position_N=np.arange(tokens, dtype=np.int32), prefill_N=np.zeros(tokens, bool),
    )


def oracle(spec, trace, **config) -> NoisyOracle:
    return NoisyOracle(NoisyOracleConfig(**config), SpecOnly(spec), future=trace)


def measured(trace: RoutingTrace, named: dict[int, np.ndarray]) -> dict[int, tuple[float, float]]:
    """Per named layer: (recall, precision) over all tokens: routed and named, over routed and over named."""
    out = {}
    for layer, named_NC in named.items():
        routed_NK = trace.expert_ids_NLK[:, trace.moe_layers.index(layer)]
        hits = (routed_NK[:, :, None] == named_NC[:, None, :]).any(-1).sum()
        out[layer] = (hits / routed_NK.size, hits / max(1, (named_NC >= 0).sum()))
    return out


SPEC = spec_of(16, 2)
BIG = uniform_trace(SPEC, 3000, seed=0)  # 6000 routed experts a layer: recall's standard error ≤ 0.0065


# --- what it names ----------------------------------------------------------------------------


@pytest.mark.parametrize("recall", [0.0, 0.3, 0.85, 1.0])
def test_measured_recall_over_many_tokens_is_the_configured_recall(recall):
    named = oracle(SPEC, BIG, recall=recall, seed=7).trace_predictions(BIG)
    assert {2, 3} <= set(named)  # the MoE layers after the first
    for layer, (r, _) in measured(BIG, {l: named[l] for l in (2, 3)}).items():
        if recall in (0.0, 1.0):
            assert r == recall, layer
        else:
            assert r == pytest.approx(recall, abs=0.035), layer  # > 5 standard errors


def test_a_recall_per_moe_layer_is_that_layers_recall():
    named = oracle(SPEC, BIG, recall=[0.5, 0.2, 0.9], seed=1).trace_predictions(BIG)
    recall = {layer: r for layer, (r, _) in measured(BIG, named).items()}
    assert recall[2] == pytest.approx(0.2, abs=0.035) and recall[3] == pytest.approx(0.9, abs=0.035)


@pytest.mark.parametrize("candidates, recall", [(2, 0.8), (4, 0.8), (6, 0.5), (14, 1.0)])
def test_precision_is_recall_times_k_over_k_prime(candidates, recall):
    named = oracle(SPEC, BIG, recall=recall, candidates=candidates, seed=2).trace_predictions(BIG)
    for layer, (_, precision) in measured(BIG, {l: named[l] for l in (2, 3)}).items():
        assert precision == pytest.approx(recall * 2 / candidates, abs=0.035), layer


@st.composite
def settings_and_traces(draw):
    K = draw(st.integers(1, 3))
    E = draw(st.integers(K, 9))
    kinds = draw(st.sampled_from([("moe",) * 3, LAYERS, ("moe", "dense", "moe")]))
    spec = spec_of(E, K, kinds)
    trace = uniform_trace(spec, draw(st.integers(0, 30)), draw(st.integers(0, 2**16)))
    config = dict(recall=draw(st.sampled_from([0.0, 0.5, 0.9, 1.0])), candidates=draw(st.one_of(st.none(), st.integers(1, 12))),
                  seed=draw(st.integers(0, 99)))
    return spec, trace, config


@settings(max_examples=60)
@given(case=settings_and_traces())
def test_each_token_gets_k_prime_distinct_experts_in_range_routed_ones_first(case):
    spec, trace, config = case
    E, K = spec.moe.num_experts, spec.moe.top_k
    predictor = oracle(spec, trace, **config)
    k_prime = min(config["candidates"] or K, E)
    assert predictor.candidates == k_prime
    named = predictor.trace_predictions(trace)
    assert set(spec.moe_layers[1:]) <= set(named) <= set(spec.moe_layers)
    for layer, named_NC in named.items():
        assert named_NC.shape == (trace.num_tokens, k_prime)
        routed_NK = trace.expert_ids_NLK[:, trace.moe_layers.index(layer)]
        for row, routed in zip(named_NC.tolist(), routed_NK.tolist()):
            ids = [e for e in row if e >= 0]
            assert row[: len(ids)] == ids  # padding (−1) only at the end
            assert len(set(ids)) == len(ids) and all(0 <= e < E for e in ids)
            is_routed = [e in routed for e in ids]
            assert is_routed == sorted(is_routed, reverse=True)  # routed experts first, then wrong guesses
            hits = sum(is_routed)
            # Wrong guesses fill up to k′ from the E − k unrouted experts; an unnamed routed expert is never named.
            assert len(ids) == min(k_prime, hits + E - K)
            if config["recall"] == 1.0:
                assert hits == min(K, k_prime)
            if config["recall"] == 0.0:
                assert hits == 0


def test_the_same_seed_names_the_same_experts_and_another_seed_others():
    first = oracle(SPEC, BIG, recall=0.85, seed=3).trace_predictions(BIG)
    again = oracle(SPEC, BIG, recall=0.85, seed=3).trace_predictions(BIG)
    other = oracle(SPEC, BIG, recall=0.85, seed=4).trace_predictions(BIG)
    assert all(np.array_equal(first[l], again[l]) for l in first)
    assert all(not np.array_equal(first[l], other[l]) for l in first)


def test_at_full_recall_it_names_what_the_oracle_names():
    from moepic.predictors.oracle import OracleConfig, OraclePredictor

    perfect = OraclePredictor(OracleConfig(), SpecOnly(SPEC), future=BIG).trace_predictions(BIG)
    noisy = oracle(SPEC, BIG, recall=1.0).trace_predictions(BIG)
    for layer in perfect:
        np.testing.assert_array_equal(np.sort(noisy[layer], axis=1), perfect[layer])


# --- the engine's view: predict ---------------------------------------------------------------------


def test_predict_for_one_token_steps_names_what_trace_predictions_says():
    trace = uniform_trace(SPEC, 40, seed=5)
    predictor = oracle(SPEC, trace, recall=0.6, candidates=3, seed=9)
    named = predictor.trace_predictions(trace)
    state = predictor.init()
    for clock in range(trace.num_tokens):
        for layer in range(len(LAYERS)):
            predicted, state = predictor.predict(state, layer, torch.zeros(1, SPEC.hidden_size), clock)
            # From layer l it names the next MoE layer: from the dense layer 0, the first MoE layer too.
            target = {0: 1, 1: 2, 2: 3, 3: None}[layer]
            assert set(predicted) == ({target} if target is not None else set())
            if target in named:
                assert predicted[target] == [e for e in named[target][clock].tolist() if e >= 0]


def test_predict_for_a_prompt_merges_its_tokens_candidates_by_votes():
    trace = uniform_trace(SPEC, 12, seed=6)
    predictor = oracle(SPEC, trace, recall=0.7, candidates=3, seed=2)
    named = predictor.trace_predictions(trace)
    predicted, _ = predictor.predict(None, 2, torch.zeros(5, SPEC.hidden_size), 4)
    assert predicted == {3: merge_votes([[e for e in row if e >= 0] for row in named[3][4:9].tolist()])}


@pytest.mark.parametrize("layer_kinds", [
    pytest.param(("moe",) * 3, id="all-moe"),
    pytest.param(LAYERS, id="dense-first"),
])
def test_the_first_moe_layer_is_never_named_nor_counted_as_predicted(layer_kinds):
    """Nothing routes before the first MoE layer to predict it: like the oracle, the noisy oracle
    must not name it, and neither the workload's recall nor the simulator's may count it."""
    from moepic.cache.layout import plan_layout, staging_buffers
    from moepic.perfmodel.hardware import load_profile
    from moepic.perfmodel.latency import model_times
    from moepic.policies.lru import LRUPolicy
    from moepic.predictors.oracle import OracleConfig, OraclePredictor
    from moepic.sim.simulate import simulate

    spec = spec_of(16, 2, layer_kinds)
    trace = uniform_trace(spec, 200, seed=8)
    predictor = oracle(spec, trace, recall=0.9, seed=0)
    perfect = OraclePredictor(OracleConfig(), SpecOnly(spec), future=trace)
    assert set(predictor.trace_predictions(trace)) == set(perfect.trace_predictions(trace)) == set(spec.moe_layers[1:])
    recall_L = measured_recall(trace, predictor)
    assert recall_L[0] == 0.0 and all(r == pytest.approx(0.9, abs=0.07) for r in recall_L[1:])
    hw = load_profile("a6000")
    layout = plan_layout(spec, dtype_bytes=2, budget=0.6, theta=0.5, staging_experts=staging_buffers(2, predictor))
    result = simulate(trace, layout, LRUPolicy(), model_times(hw, spec, dtype_bytes=2, predictor=True), hw, predictor)
    assert result.recall[0] is None and result.precision[0] is None
    assert result.recall[1:] == pytest.approx(recall_L[1:])


# --- configuration and refusals -------------------------------------------------------------------


@pytest.mark.parametrize("config, message", [
    (dict(recall=1.5), "predictor.recall must be a number in [0, 1] or one per MoE layer, got 1.5"),
    (dict(recall=-0.1), "predictor.recall must be a number in [0, 1] or one per MoE layer, got -0.1"),
    (dict(recall=[0.5, 1.2, 0.5]), "predictor.recall must be a number in [0, 1] or one per MoE layer, got (0.5, 1.2, 0.5)"),
    (dict(recall=float("nan")), "predictor.recall must be a number in [0, 1] or one per MoE layer, got nan"),
    (dict(candidates=0), "'candidates' must be >= 1: 0"),
    (dict(seed=-1), "'seed' must be >= 0: -1"),
])
def test_a_config_outside_its_range_is_refused(config, message):
    with pytest.raises(ValueError) as error:
        NoisyOracleConfig(**config)
    assert str(error.value) == message


def test_a_config_node_outside_its_range_is_a_config_error():
    with pytest.raises(ConfigError, match=r"predictor.recall must be a number in \[0, 1\]"):
        PREDICTORS.structure_node({"name": "noisy_oracle", "recall": 2}, "cache.predictor")
    built = PREDICTORS.build(PREDICTORS.structure_node({"name": "noisy_oracle", "recall": [0.1, 0.2, 0.3]}, "cache.predictor"),
                             SpecOnly(SPEC), future=BIG)
    assert isinstance(built, NoisyOracle) and built.candidates == 2


def test_a_recall_list_of_the_wrong_length_is_refused():
    with pytest.raises(ValueError, match=r"^predictor.recall: expected one value per MoE layer \(3\), got 2$"):
        oracle(SPEC, BIG, recall=[0.5, 0.5])


def test_it_refuses_to_predict_any_trace_but_its_own():
    predictor = oracle(SPEC, BIG, recall=0.8)
    with pytest.raises(ValueError, match="^noisy_oracle predicts only the trace it was built with$"):
        predictor.trace_predictions(attrs.evolve(BIG))  # equal content, another run
    with pytest.raises(ValueError, match="^noisy_oracle predicts only the trace it was built with$"):
        predictor.trace_predictions(uniform_trace(SPEC, 10, seed=1))


def test_without_the_future_it_asks_for_the_trace_and_reads_it_from_a_file(tmp_path):
    with pytest.raises(ConfigError, match=r"needs the future: set predictor.trace=FILE"):
        NoisyOracle(NoisyOracleConfig(), SpecOnly(SPEC))
    save_trace(BIG, tmp_path / "run.npz")
    from_file = NoisyOracle(NoisyOracleConfig(trace=str(tmp_path / "run.npz"), seed=5), SpecOnly(SPEC))
    given = oracle(SPEC, BIG, seed=5)
    named = from_file.trace_predictions(from_file.future)
    assert all(np.array_equal(named[l], given.trace_predictions(BIG)[l]) for l in named)


def test_a_trace_of_another_expert_count_is_refused():
    with pytest.raises(ConfigError, match=r"trace has MoE layers \[1, 2, 3\] with 16 experts; the model's layer 1 has 8"):
        oracle(spec_of(8, 2), BIG)
