"""Bad predictor inputs are one clear line: horizons outside 1-3, train-predictor flags out of range,
router inputs of another width than the model's, and a corrupt or misshaped mlp predictor folder."""

from __future__ import annotations

import json
import math

import attrs
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moepic.checkpoint.load import load_model
from moepic.errors import ConfigError
from moepic.predictors import PREDICTORS, PredictorConfig
from moepic.predictors.base import MAX_HORIZON
from moepic.tracing.checks import router_inputs
from moepic.predictors.gate_lookahead import GateLookaheadConfig
from moepic.predictors.mlp import META, WEIGHTS, MLPConfig, load_predictor, save_predictor
from moepic.runtime.generation import generate
from moepic.tracing import save_trace
from moepic.tracing.recorder import RoutingRecorder
from tests_support import cli_error


@pytest.fixture(scope="module")
def mixtral(checkpoint_dir):
    return load_model(checkpoint_dir("mixtral"), dtype=torch.float32)


@pytest.fixture(scope="module")
def hidden_trace(mixtral):
    recorder = RoutingRecorder(mixtral.spec, record_hidden=True)
    generate(mixtral, [1, 17, 5, 42, 8, 33], max_new_tokens=30, eos_ids=(), tap=recorder)
    return recorder.trace()


# --- horizon ----------------------------------------------------------------------------------------


@given(name=st.sampled_from(["gate_lookahead", "oracle", "mlp"]), horizon=st.integers(-3, 12))
def test_a_predictor_horizon_is_taken_from_1_to_3_and_nothing_else(name, horizon):
    node = {"name": name, "horizon": horizon}
    if 1 <= horizon <= MAX_HORIZON:
        assert PredictorConfig.structure_node(node, "cache.predictor").horizon == horizon
    else:
        with pytest.raises(ConfigError, match=rf"predictor\.horizon must be an integer from 1 to 3 \(MoE layers ahead\), got {horizon}$"):
            PredictorConfig.structure_node(node, "cache.predictor")


def test_mlp_candidates_below_one_are_an_error():
    with pytest.raises(ConfigError, match=r"predictor\.candidates must be >= 1, got 0"):
        PredictorConfig.structure_node({"name": "mlp", "candidates": 0}, "cache.predictor")


# --- train-predictor flags, checked before anything is loaded ---------------------------------------


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--horizon", "9"], "train-predictor --horizon must be an integer from 1 to 3 (MoE layers ahead), got 9"),
        (["--horizon", "0"], "train-predictor --horizon must be an integer from 1 to 3 (MoE layers ahead), got 0"),
        (["--width", "0"], "train-predictor --width must be an integer from 1 to 65536, got 0"),
        (["--width", "10000000"], "train-predictor --width must be an integer from 1 to 65536, got 10000000"),
        (["--epochs", "-1"], "train-predictor --epochs must be an integer from 1 to 1000000, got -1"),
        (["--max-tokens", "0"], "train-predictor --max-tokens must be an integer from 1 to 1099511627776, got 0"),
        (["--seed", "-2"], "train-predictor --seed must be an integer from 0 to 9223372036854775807, got -2"),
        (["--valid", "0"], "train-predictor --valid must be in (0, 1) (the share of tokens held out), got 0.0"),
        (["--valid", "nan"], "train-predictor --valid must be in (0, 1) (the share of tokens held out), got nan"),
        (["--valid", "1"], "train-predictor --valid must be in (0, 1) (the share of tokens held out), got 1.0"),
    ],
)
def test_train_predictor_flags_out_of_range_are_one_line_naming_the_flag_and_range(capsys, monkeypatch, tmp_path, flags, message):
    def no_loading(*args, **kwargs):
        raise AssertionError("loaded the model before checking the flags")

    monkeypatch.setattr("moepic.checkpoint.load.load_model", no_loading)
    argv = ["train-predictor", "--dataset", "kjv-heldout", "--out", str(tmp_path / "p"), *flags]
    assert cli_error(capsys, argv) == message
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("lr", [0.0, -1e-3, math.nan, math.inf])
def test_a_learning_rate_that_is_not_a_positive_number_is_an_error(tmp_path, lr):
    from moepic.commands.train_predictor import run_train_predictor

    with pytest.raises(ConfigError, match="the learning rate must be a finite number > 0"):
        run_train_predictor(None, traces=["t.npz"], text_file=None, out=str(tmp_path / "p"), lr=lr)


# --- router inputs of another width ------------------------------------------------------------------


def widened(trace, extra: int):
    return attrs.evolve(trace, hidden_NLD=np.concatenate([trace.hidden_NLD, trace.hidden_NLD[:, :, :extra]], axis=2))


@given(extra=st.integers(1, 8))
def test_router_inputs_of_another_width_name_the_trace_and_both_widths(hidden_trace, extra):
    D = hidden_trace.hidden_NLD.shape[2]
    assert router_inputs(hidden_trace, D, "t.npz") is hidden_trace.hidden_NLD
    with pytest.raises(ConfigError, match=rf"^t\.npz: the trace's router inputs \('hidden'\) are {D + extra} wide; the model's hidden size is {D}$"):
        router_inputs(widened(hidden_trace, extra), D, "t.npz")


def test_a_predictor_run_on_router_inputs_of_another_width_is_one_error(mixtral, hidden_trace):
    predictor = PREDICTORS.build(GateLookaheadConfig(), mixtral)
    assert predictor.trace_predictions(hidden_trace)  # the model's own width: fine
    with pytest.raises(ConfigError, match="are 35 wide; the model's hidden size is 32"):
        predictor.trace_predictions(widened(hidden_trace, 3))


def test_train_predictor_on_router_inputs_of_another_width_is_one_line(capsys, checkpoint_dir, hidden_trace, tmp_path):
    trace = tmp_path / "wide.npz"
    save_trace(widened(hidden_trace, 3), trace)
    argv = ["train-predictor", "--model", str(checkpoint_dir("mixtral")), "--trace", str(trace), "--out", str(tmp_path / "p")]
    assert cli_error(capsys, argv) == f"{trace}: the trace's router inputs ('hidden') are 35 wide; the model's hidden size is 32"
    assert not (tmp_path / "p").exists()


def test_simulate_and_configure_with_router_inputs_of_another_width_are_one_line(capsys, checkpoint_dir, hidden_trace, tmp_path):
    trace, model = tmp_path / "wide.npz", str(checkpoint_dir("mixtral"))
    save_trace(widened(hidden_trace, 3), trace)
    expected = f"{trace}: the trace's router inputs ('hidden') are 35 wide; the model's hidden size is 32"
    simulate = ["simulate", "--trace", str(trace), "--model", model, "--hardware", "a6000",
                "--budget", "0.5", "--baseline", "moepic"]
    assert cli_error(capsys, simulate) == expected
    configure = ["configure", "--trace", str(trace), "--model", model, "--hardware", "a6000", "--budget", "0.5",
                 "--predictor", "gate_lookahead"]
    assert cli_error(capsys, configure) == expected


# --- the mlp predictor's files ----------------------------------------------------------------------


@pytest.fixture
def mlp_folder(mixtral, tmp_path):
    """A valid horizon-1 predictor folder for the tiny mixtral, written by save_predictor."""
    spec = mixtral.spec
    D, H, E = spec.hidden_size, 4, spec.moe.num_experts
    layers = list(spec.moe_layers)
    pairs = {f"{s}->{t}": {"up.weight": torch.zeros(H, D), "up.bias": torch.zeros(H), "out.weight": torch.zeros(E, H),
                           "out.bias": torch.zeros(E)} for s, t in zip(layers, layers[1:])}
    meta = {"hidden": D, "width": H, "experts": E, "horizon": 1, "layers": layers}
    folder = tmp_path / "mlp"
    save_predictor(folder, pairs, meta)
    return folder, pairs, meta


def test_a_valid_folder_loads(mixtral, mlp_folder):
    folder, _, _ = mlp_folder
    assert PREDICTORS.build(MLPConfig(path=str(folder)), mixtral).horizon == 1


@pytest.mark.parametrize(
    "content,message",
    [
        ("{not json", "predictor.json: not valid JSON"),
        ("[1, 2]", "predictor.json: expected a JSON object, got list"),
        ('{"hidden": 32}', "predictor.json: key 'width' should be a positive integer, got None"),
    ],
)
def test_a_corrupt_predictor_json_is_one_error_naming_the_file(mixtral, mlp_folder, content, message):
    folder, _, _ = mlp_folder
    (folder / META).write_text(content)
    with pytest.raises(ConfigError, match=rf"^{folder / META}: ") as err:
        PREDICTORS.build(MLPConfig(path=str(folder)), mixtral)
    assert message in str(err.value)


def test_corrupt_weights_are_one_error_naming_the_file(mixtral, mlp_folder):
    folder, _, _ = mlp_folder
    (folder / WEIGHTS).write_bytes(b"\x00" * 5)
    with pytest.raises(ConfigError, match=rf"^{folder / WEIGHTS}: not a readable safetensors file"):
        load_predictor(folder)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda p: p["0->1"].pop("out.bias"), "missing tensor 0->1/out.bias"),
        (lambda p: p["0->1"].update({"up.weight": torch.zeros(4, 31)}), r"tensor 0->1/up.weight has shape \[4, 31\], expected \[4, 32\]"),
        (lambda p: p["1->2"].update({"out.weight": torch.full((4, 4), math.nan)}), "tensor 1->2/out.weight holds NaN or infinite values"),
    ],
)
def test_misshaped_or_missing_tensors_are_one_error_naming_the_file_and_tensor(mixtral, mlp_folder, change, message):
    folder, pairs, meta = mlp_folder
    change(pairs)
    save_predictor(folder, pairs, meta)
    with pytest.raises(ConfigError, match=rf"^{folder / WEIGHTS}: {message}"):
        PREDICTORS.build(MLPConfig(path=str(folder)), mixtral)


def test_a_saved_predictor_round_trips(mlp_folder):
    folder, pairs, meta = mlp_folder
    params, loaded = load_predictor(folder)
    assert loaded == meta
    assert params.keys() == pairs.keys() and all(torch.equal(params[k][n], pairs[k][n]) for k in pairs for n in pairs[k])
    assert json.loads((folder / META).read_text()) == meta
