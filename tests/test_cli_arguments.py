"""One meaning per flag across the commands: `--model` names a folder or a preset shape the same way in
inspect, configure, simulate and compare; commands that need weights refuse a preset; every strategy
flag's help lists the registered names; the deprecated `--model-shape` still works, with a note."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import attrs
import numpy as np
import pytest

from moepic.checkpoint.load import read_spec
from moepic.cli import build_parser, main
from moepic.configurators import CONFIGURATORS
from moepic.default_model import model_folder
from moepic.policies import POLICIES
from moepic.predictors import PREDICTORS
from moepic.sim.baseline import ORDER
from moepic.sim.shapes import PRESETS, known_shapes
from moepic.tracing.synthetic import SyntheticRouting, generate_trace
from moepic.tracing import save_trace
from tests_support import cli_error

BUNDLED = model_folder(None)
# Each strategy flag and what must be listed in its help: the registry's names (built here, not typed).
STRATEGY_FLAGS = {
    "--policy": sorted(POLICIES), "--predictor": sorted(PREDICTORS), "--configurator": sorted(CONFIGURATORS),
    "--baseline": list(ORDER), "--baselines": list(ORDER),
}


def _subparsers() -> dict:
    return [a for a in build_parser()._actions if a.dest == "command"][0].choices


def _option_help(command: str, flag: str, monkeypatch) -> str:
    """The help of one option, on one line (wide enough that argparse wraps nothing)."""
    monkeypatch.setenv("COLUMNS", "2000")
    lines = _subparsers()[command].format_help().splitlines()
    return next(line.strip() for line in lines if line.strip().startswith(f"{flag} "))


@pytest.fixture(scope="module")
def traces(tmp_path_factory) -> dict[str, str]:
    """Traces of the bundled model's shape and of Mixtral-8x7B's (synthetic, no router inputs)."""
    spec, _ = read_spec(BUNDLED)
    folder = tmp_path_factory.mktemp("model_arg")
    out = {}
    for name, (experts, top_k, layers) in {"bundled": (spec.moe.num_experts, spec.moe.top_k, len(spec.moe_layers)),
                                            "mixtral-8x7b": (8, 2, 32)}.items():
        routing = SyntheticRouting(num_experts=experts, top_k=top_k, skew=[1.0] * layers, reuse=[1.0] * layers,
                                   decay=[0.5] * layers, correlation=[1.0] * layers)
        save_trace(generate_trace(routing, 24, seed=0, sequences=2), folder / f"{name}.npz")
        out[name] = str(folder / f"{name}.npz")
    return out


def _json(capsys, argv) -> dict:
    capsys.readouterr()
    assert main(argv) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def _argv(command: str, model: str, trace: str) -> list[str]:
    budget = ["--budget", "0.5"]
    return {
        "inspect": ["inspect"],
        "configure": ["configure", *budget, "--hardware", "a6000", "--trace", trace],
        "simulate": ["simulate", *budget, "--hardware", "a6000", "--trace", trace, "--baseline", "cache-only"],
        "compare": ["compare", *budget, "--hardware", "a6000", "--trace", trace, "--baselines", "cache-only,on-demand-lru"],
    }[command] + ["--model", model, "--json"]


@pytest.mark.parametrize("command", ["inspect", "configure", "simulate", "compare"])
def test_the_same_model_argument_names_a_folder_or_a_preset_in_every_shape_command(capsys, traces, command):
    folder = _json(capsys, _argv(command, BUNDLED, traces["bundled"]))
    preset = _json(capsys, _argv(command, "Mixtral-8x7B", traces["mixtral-8x7b"]))  # case-insensitive, as in sim/shapes
    layers = {"inspect": lambda r: r["spec"]["layer_kinds"].count("moe"), "configure": lambda r: len(r["layers"]),
              "simulate": lambda r: len(r["layers"]), "compare": lambda r: len(r["rows"][0]["layers"])}[command]
    assert layers(preset) == len(PRESETS["mixtral-8x7b"].spec.moe_layers) == 32
    assert layers(folder) == len(read_spec(BUNDLED)[0].moe_layers) != 32  # the bundled model's own layers
    if command == "inspect":
        assert preset["model"] == "mixtral-8x7b" and preset["dtype"] == "bfloat16"
        assert preset["bytes_per_expert"] == 3 * 4096 * 14336 * 2
    if command in ("simulate", "compare"):
        assert preset["model_shape"] == "mixtral-8x7b" and folder["model_shape"] == Path(BUNDLED).name


@pytest.mark.parametrize("command", ["inspect", "configure", "simulate", "compare"])
def test_an_unknown_preset_lists_the_known_ones_in_every_shape_command(capsys, traces, command):
    message = cli_error(capsys, _argv(command, "gpt-5", traces["bundled"]))
    assert message == f"unknown model shape 'gpt-5'; known: {known_shapes()} (or a model folder with config.json, or a GGUF file)"


@pytest.mark.parametrize("command", ["inspect", "configure", "simulate", "compare"])
def test_a_missing_folder_is_named_as_one_in_every_shape_command(capsys, traces, tmp_path, command):
    missing = str(tmp_path / "nowhere")
    assert cli_error(capsys, _argv(command, missing, traces["bundled"])) == f"{missing}: model folder not found"


@pytest.mark.parametrize("argv", [
    ["generate", "--prompt-ids", "1,2"],
    ["routing-report", "--dataset", "kjv-heldout"],
    ["train-predictor", "--dataset", "kjv-heldout", "--out", "unused"],
    ["profile", "--device", "cpu", "--quick"],
])
def test_commands_that_need_weights_refuse_a_preset_saying_so(capsys, argv):
    message = cli_error(capsys, [*argv, "--model", "mixtral-8x7b"])
    assert message == f"--model mixtral-8x7b: a preset shape has no weights; {argv[0]} needs a model folder with weights"


def test_configure_on_a_preset_measures_no_recall_it_has_no_weights_for(capsys, traces, tmp_path):
    from moepic.tracing import load_trace

    trace = load_trace(traces["mixtral-8x7b"])
    hidden = tmp_path / "hidden.npz"  # router inputs recorded, but a preset has no router weights to score them
    save_trace(attrs.evolve(trace, hidden_NLD=np.zeros((trace.num_tokens, 32, 4096), np.float16)), hidden)
    argv = ["configure", "--json", "--budget", "0.5", "--hardware", "a6000", "--trace", str(hidden), "--model", "mixtral-8x7b",
            "--predictor", "gate_lookahead"]
    assert cli_error(capsys, argv) == ("measuring the gate_lookahead predictor's recall needs the model's weights, and a "
                                       "preset shape has none: give --model DIR, or --recall")
    assert _json(capsys, [*argv, "--recall", "0.8"])["recall"] == [0.0] + [0.8] * 31


@pytest.mark.parametrize("command", sorted(_subparsers()))
def test_every_strategy_flag_of_every_command_lists_the_registered_names(command, monkeypatch):
    parser = _subparsers()[command]
    flags = [flag for action in parser._actions for flag in action.option_strings if flag in STRATEGY_FLAGS]
    for flag in flags:
        help_of_flag = _option_help(command, flag, monkeypatch)
        for name in STRATEGY_FLAGS[flag]:
            assert name in help_of_flag, (command, flag, name)
    expected = {"generate": {"--policy", "--predictor"}, "serve": {"--policy", "--predictor"}, "configure": {"--policy", "--predictor", "--configurator"},
                "simulate": {"--baseline"}, "compare": {"--baselines"}}.get(command, set())
    assert set(flags) == expected


def test_the_predictor_help_names_every_predictor_and_the_registry_default(monkeypatch):
    for command in ("generate", "configure"):
        predictor = _option_help(command, "--predictor", monkeypatch)
        assert all(name in predictor for name in PREDICTORS) and f"(default: {PREDICTORS.default})" in predictor


def test_the_deprecated_model_shape_still_works_and_prints_one_note(capsys, traces):
    argv = ["simulate", "--trace", traces["mixtral-8x7b"], "--hardware", "a6000", "--budget", "0.5", "--baseline",
            "cache-only", "--json"]
    capsys.readouterr()
    assert main([*argv, "--model-shape", "mixtral-8x7b"]) == 0
    out, err = capsys.readouterr()
    assert err == "moepic: note: --model-shape is deprecated; use --model\n"
    assert json.loads(out) == {**_json(capsys, [*argv, "--model", "mixtral-8x7b"]), **_timings(json.loads(out))}


def _timings(report: dict) -> dict:
    return {key: report[key] for key in ("configure_s", "simulate_s", "layer_steps_per_s")}


def test_bare_help_imports_no_torch():
    code = "import sys, moepic.cli; moepic.cli.build_parser().format_help(); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "False"
