"""Predictors: what each one names, from which hidden state, and the learned one's training and files."""

from __future__ import annotations

import json

import attrs
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from moepic.analysis.lookahead import GateLookaheadTap
from moepic.cache.layout import PrefetchShape, staging_buffers
from moepic.checkpoint.load import load_model
from moepic.cli import main
from moepic.commands.train_predictor import run_train_predictor
from moepic.core.norms import rms_norm
from moepic.errors import ConfigError
from moepic.predictors import PREDICTORS
from moepic.predictors.base import NoneConfig, merge_votes
from moepic.predictors.gate_lookahead import GateLookaheadConfig
from moepic.predictors.mlp import MLPConfig
from moepic.predictors.oracle import OracleConfig, OraclePredictor
from moepic.runtime.generation import generate
from moepic.tracing import save_trace
from moepic.tracing.recorder import RoutingRecorder
from tests_support import cli_error

PROMPT = [1, 17, 5, 42, 8, 33, 9, 60]


@pytest.fixture(scope="module")
def mixtral(checkpoint_dir):
    return load_model(checkpoint_dir("mixtral"), dtype=torch.float32)


@given(rows=st.lists(st.lists(st.integers(0, 7), min_size=1, max_size=4, unique=True), min_size=1, max_size=6))
def test_merged_candidates_are_every_tokens_candidates_most_voted_first(rows):
    chosen = merge_votes(rows)
    assert set(chosen) == {e for row in rows for e in row} and len(chosen) == len(set(chosen))
    votes = {e: sum(e in row for row in rows) for e in chosen}
    assert [votes[e] for e in chosen] == sorted(votes.values(), reverse=True)
    if len(rows) == 1:
        assert chosen == rows[0]


@pytest.mark.parametrize("reads", ["router_input", "rescaled", "layer_output"])
def test_gate_lookahead_applies_the_next_layers_router_to_the_state_it_reads(mixtral, reads):
    predictor = PREDICTORS.build(GateLookaheadConfig(candidates=3, horizon=2, reads=reads), mixtral)
    x = torch.randn(1, mixtral.spec.hidden_size, generator=torch.Generator().manual_seed(0))
    predicted, _ = predictor.predict(predictor.init(), 0, x, clock=0)
    assert sorted(predicted) == [1, 2]  # two MoE layers ahead of layer 0
    fused, _ = predictor.predict(predictor.init(), 0, x, clock=0, guess_rows=predictor.guess(0, x).tolist())
    assert fused == predicted  # read back with the routing or on its own: the same candidates
    w = mixtral.weights.layers
    for target, experts in predicted.items():
        if reads == "router_input":
            h = x
        elif reads == "rescaled":
            h = x / w[0].post_attention_norm_D * w[target].post_attention_norm_D
        else:
            h = rms_norm(x, w[target].post_attention_norm_D, mixtral.spec.norm_eps)
        expected = F.linear(h, w[target].ffn.router_ED).topk(3, dim=-1).indices[0].tolist()
        assert experts == expected


@given(seed=st.integers(0, 2**16), tokens=st.integers(1, 5), candidates=st.integers(1, 4))
def test_gate_lookahead_names_what_the_routing_reports_lookahead_names(mixtral, seed, tokens, candidates):
    """The predictor (reading the layer output) and the routing report's lookahead score a later layer's
    experts through one function of core/routing.py: the same ids for any hidden state."""
    g = torch.Generator().manual_seed(seed)
    # Random norm weights (a fresh checkpoint's are ones, which no top-k could tell from no norm at all).
    layers = tuple(attrs.evolve(lw, post_attention_norm_D=torch.rand(lw.post_attention_norm_D.shape, generator=g) + 0.1)
                   for lw in mixtral.weights.layers)
    model = attrs.evolve(mixtral, weights=attrs.evolve(mixtral.weights, layers=layers))
    predictor = PREDICTORS.build(GateLookaheadConfig(candidates=candidates, horizon=1, reads="layer_output"), model)
    report = GateLookaheadTap(model, candidates=candidates)
    x = torch.randn(tokens, model.spec.hidden_size, generator=g)
    moe_layers = model.spec.moe_layers
    for layer in moe_layers[:-1]:
        report.layer_output(layer, x)
        report.routed(layer + 1, x, None, predictor.guess(layer, x))  # the predictor's ids, as if routed
    # Every one of the predictor's `candidates` distinct ids per token is among the report's `candidates`.
    assert report.recall() == {layer: 1.0 for layer in moe_layers[1:]}


@pytest.mark.parametrize("config", [GateLookaheadConfig(candidates=3, horizon=2), GateLookaheadConfig(), NoneConfig()])
def test_staging_is_sized_alike_from_a_predictor_config_and_from_the_predictor_it_builds(mixtral, config):
    k = mixtral.spec.moe.top_k
    shape = config.prefetch_shape(k)
    assert isinstance(shape, PrefetchShape)
    built = PREDICTORS.build(config, mixtral)
    assert (shape.candidates, shape.horizon) == (built.candidates, built.horizon)
    assert staging_buffers(k, shape) == staging_buffers(k, built)


def test_oracle_names_exactly_what_the_trace_routes_at_that_clock(mixtral):
    recorder = RoutingRecorder(mixtral.spec)
    generate(mixtral, PROMPT, max_new_tokens=4, eos_ids=(), tap=recorder)
    trace = recorder.trace()
    oracle = OraclePredictor(OracleConfig(horizon=2), mixtral, future=trace)
    x = torch.zeros(1, mixtral.spec.hidden_size)
    for clock in (len(PROMPT), len(PROMPT) + 2):
        predicted, _ = oracle.predict(oracle.init(), 0, x, clock)
        assert predicted == {t: sorted(trace.expert_ids_NLK[clock, t].tolist()) for t in (1, 2)}


def test_oracle_with_another_models_trace_is_named(mixtral, checkpoint_dir):
    qwen = load_model(checkpoint_dir("qwen2_moe"), dtype=torch.float32)
    recorder = RoutingRecorder(qwen.spec)
    generate(qwen, PROMPT, max_new_tokens=2, eos_ids=(), tap=recorder)
    with pytest.raises(ConfigError, match="trace has MoE layers"):
        OraclePredictor(OracleConfig(), mixtral, future=recorder.trace())


# --- the learned predictor --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(mixtral, checkpoint_dir, tmp_path_factory):
    """(hidden-state trace, folder of an mlp trained on it with horizon 2)."""
    folder = tmp_path_factory.mktemp("mlp")
    recorder = RoutingRecorder(mixtral.spec, record_hidden=True)
    generate(mixtral, PROMPT, max_new_tokens=80, eos_ids=(), tap=recorder)
    save_trace(recorder.trace(), folder / "trace.npz")
    run_train_predictor(
        str(checkpoint_dir("mixtral")), traces=[str(folder / "trace.npz")], text_file=None, out=str(folder / "out"),
        width=16, horizon=2, epochs=40, progress=False,
    )
    return folder / "trace.npz", folder / "out"


def test_train_predictor_writes_weights_and_a_report_comparing_with_gate_lookahead(capsys, checkpoint_dir, trained, tmp_path):
    trace, _ = trained
    out = tmp_path / "p"
    argv = ["train-predictor", "--model", str(checkpoint_dir("mixtral")), "--trace", str(trace), "--out", str(out)]
    capsys.readouterr()
    assert main([*argv, "--width", "16", "--epochs", "40", "--horizon", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (out / "predictor.safetensors").is_file() and json.loads((out / "predictor.json").read_text())["horizon"] == 2
    pairs = {(m["source"], m["target"]) for m in report["metrics"]}
    assert pairs == {(0, 1), (0, 2), (1, 2)}
    assert all(0 <= m["mlp_recall"] <= 1 and 0 <= m["gate_lookahead_recall"] <= 1 for m in report["metrics"])
    assert report["train_tokens"] + report["valid_tokens"] == len(PROMPT) + 80 - 1


def test_mlp_predictor_runs_its_trained_weights_through_torch_func(mixtral, checkpoint_dir, trained, capsys):
    _, out = trained
    predictor = PREDICTORS.build(MLPConfig(path=str(out), horizon=2, candidates=2), mixtral)
    from safetensors.torch import load_file

    weights = load_file(str(out / "predictor.safetensors"))
    x = torch.randn(1, mixtral.spec.hidden_size, generator=torch.Generator().manual_seed(1))
    predicted, _ = predictor.predict(predictor.init(), 0, x, clock=0)
    for target in (1, 2):
        p = {name.split("/")[1]: t for name, t in weights.items() if name.startswith(f"0->{target}/")}
        scores = F.linear(F.silu(F.linear(x, p["up.weight"], p["up.bias"])), p["out.weight"], p["out.bias"])
        assert predicted[target] == scores.topk(2, dim=-1).indices[0].tolist()


def test_generate_with_the_mlp_predictor_gives_the_dense_tokens(capsys, checkpoint_dir, trained):
    _, out = trained
    model = str(checkpoint_dir("mixtral"))
    base = ["generate", "--model", model, "--json", "--greedy", "--prompt-ids", "1,2,3,4", "--max-new-tokens", "8"]
    capsys.readouterr()
    assert main(base) == 0
    dense = json.loads(capsys.readouterr().out)
    assert main([*base, "--budget", "0.5", "--predictor", "mlp", f"cache.predictor.path={out}"]) == 0
    offloaded = json.loads(capsys.readouterr().out)
    assert offloaded["token_ids"] == dense["token_ids"]
    assert offloaded["stats"]["prediction_recall"] is not None


@pytest.mark.parametrize(
    "argv,message",
    [
        ([], "train-predictor needs --trace FILE (with hidden states) or --text FILE / --dataset NAME"),
        (["--dataset", "psalms"], "unknown dataset 'psalms'; known: kjv-heldout"),
        (["--text", "/nowhere.txt"], "/nowhere.txt: text file not found"),
        (["--dataset", "kjv-heldout", "--valid", "1.5"], "--valid must be in (0, 1)"),
    ],
)
def test_train_predictor_mistakes_are_one_line(capsys, tmp_path, argv, message):
    assert message in cli_error(capsys, ["train-predictor", "--out", str(tmp_path / "p"), *argv])


def test_train_predictor_on_a_trace_without_hidden_states_is_named(capsys, mixtral, checkpoint_dir, tmp_path):
    recorder = RoutingRecorder(mixtral.spec)
    generate(mixtral, PROMPT, max_new_tokens=30, eos_ids=(), tap=recorder)
    save_trace(recorder.trace(), tmp_path / "t.npz")
    argv = ["train-predictor", "--model", str(checkpoint_dir("mixtral")), "--trace", str(tmp_path / "t.npz"), "--out", str(tmp_path / "p")]
    assert "the trace has no hidden states (record it with --trace-hidden)" in cli_error(capsys, argv)


def test_train_predictor_on_a_trace_of_other_layers_is_named(capsys, mixtral, checkpoint_dir, tmp_path):
    recorder = RoutingRecorder(mixtral.spec, record_hidden=True)
    generate(mixtral, PROMPT, max_new_tokens=30, eos_ids=(), tap=recorder)
    trace = recorder.trace()
    other = attrs.evolve(trace, moe_layers=tuple(layer + 1 for layer in trace.moe_layers))  # another model's layers
    save_trace(other, tmp_path / "t.npz")
    argv = ["train-predictor", "--model", str(checkpoint_dir("mixtral")), "--trace", str(tmp_path / "t.npz"), "--out", str(tmp_path / "p")]
    assert cli_error(capsys, argv) == (
        f"{tmp_path / 't.npz'}: trace has MoE layers {list(other.moe_layers)} with {trace.num_experts} experts; "
        f"the model has {list(trace.moe_layers)} with {mixtral.spec.moe.num_experts}"
    )


@pytest.mark.parametrize(
    "config,message",
    [
        ({}, "the mlp predictor needs its weights: set predictor.path=DIR"),
        ({"path": "/nowhere"}, "/nowhere: no predictor.safetensors"),
    ],
)
def test_mlp_predictor_without_weights_is_named(mixtral, config, message):
    with pytest.raises(ConfigError, match=message):
        PREDICTORS.build(MLPConfig(**config), mixtral)


def test_mlp_predictor_trained_for_another_model_is_named(mixtral, tmp_path):
    from moepic.predictors.mlp import save_predictor

    meta = {"hidden": 7, "width": 4, "experts": 3, "horizon": 1, "layers": [0, 1, 2]}
    save_predictor(tmp_path, {"0->1": {"up.weight": torch.zeros(4, 7)}}, meta)
    with pytest.raises(ConfigError, match=r"trained for \{'hidden': 7, 'experts': 3, 'layers': \[0, 1, 2\]\}, but the model has"):
        PREDICTORS.build(MLPConfig(path=str(tmp_path)), mixtral)


def test_predictor_node_names_the_known_predictors():
    from moepic.config import load_config

    with pytest.raises(ConfigError, match="unknown predictor 'psychic'; known: gate_lookahead, mlp, noisy_oracle, none, oracle"):
        load_config(None, ["cache.predictor.name=psychic"])
    assert load_config(None, ["cache.predictor.name=gate_lookahead", "cache.predictor.horizon=2"]).cache.predictor == GateLookaheadConfig(horizon=2)


def test_a_layer_output_predictor_refuses_a_trace_of_router_inputs(mixtral):
    """A trace records router inputs; scoring them as layer outputs would give a silently wrong recall."""
    recorder = RoutingRecorder(mixtral.spec, record_hidden=True)
    generate(mixtral, PROMPT, max_new_tokens=2, eos_ids=(), tap=recorder)
    trace = recorder.trace()
    assert set(PREDICTORS.build(GateLookaheadConfig(), mixtral).trace_predictions(trace)) == set(mixtral.spec.moe_layers[1:])
    with pytest.raises(ConfigError, match="only a predictor that reads the router input"):
        PREDICTORS.build(GateLookaheadConfig(reads="layer_output"), mixtral).trace_predictions(trace)
