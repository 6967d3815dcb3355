"""`moepic simulate` and `moepic compare` end to end: a trace, a model shape (preset or folder) and a
hardware profile give one configuration's simulated decode, or every baseline side by side; every
mistake is one line."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import attrs
import numpy as np
import pytest
import yaml

from moepic.cli import main
from moepic.core.footprint import footprint
from moepic.perfmodel.hardware import PROFILES_DIR, load_profile
from moepic.perfmodel.latency import model_times
from moepic.sim.baseline import HYBRID_ORDER, ORDER
from moepic.sim.shapes import PRESETS, known_shapes
from moepic.sim.steps import trace_steps
from moepic.tracing import RoutingTrace, load_trace, save_trace
from moepic.tracing.synthetic import SyntheticRouting, generate_trace
from tests_support import cli_error

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "traces" / "mixtral-8x7b-instruct-fp8"
GSM8K = SHARED / "gsm8k_2_routing.jsonl"
MIXTRAL = PRESETS["mixtral-8x7b"]
MIXTRAL_EXPERT_BYTES = footprint(MIXTRAL.spec).routed_expert_bytes(2)
# What `moepic simulate --json` reports: the run, its decode summary (SimResult.summary) and the testbed.
SIMULATE_KEYS = {
    "name", "approximates", "configure_s", "simulate_s", "layer_steps_per_s", "tokens", "ms_per_token", "p50_ms",
    "p99_ms", "exposed_copy_ms_per_token", "expert_hit_rate", "hits", "partial_hits", "misses", "bytes_loaded_per_token",
    "prediction_recall", "prediction_precision", "demand_bytes", "prefetch_bytes", "wasted_prefetch_bytes",
    "cancelled_prefetches", "kept_prefetches", "cache_bytes", "staging_bytes", "layers", "hardware", "host", "model_shape",
    "trace", "hybrid", "host_experts", "host_bottoms", "host_splits", "fill_bytes", "miss_fill_bytes", "decode_host_s_per_token", "host_ms_per_token",
    "host_wait_ms_per_token", "steps", "ms_per_step", "tokens_per_s", "exposed_copy_ms_per_step", "batch", "stream_tokens",
}
LAYER_KEYS = {"layer", "theta", "slots", "hit_rate", "bytes_loaded_per_token", "recall", "precision", "ms_per_token",
              "exposed_copy_ms_per_token", "host_experts", "host_bottoms", "host_splits", "host_ms_per_token"}

needs_gsm8k = pytest.mark.skipif(not GSM8K.is_file(), reason=f"shared Mixtral routing trace not found at {GSM8K}")


def _run(capsys, argv) -> dict:
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def _text(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 0
    out, _ = capsys.readouterr()
    return out


def _mixtral_like(layers: int = 32, experts: int = 8, tokens: int = 24) -> RoutingTrace:
    routing = SyntheticRouting(num_experts=experts, top_k=2, skew=[1.0] * layers, reuse=[1.0] * layers,
                               decay=[0.5] * layers, correlation=[1.0] * layers)
    return generate_trace(routing, tokens, seed=0, sequences=2)


@pytest.fixture(scope="module")
def traces(tmp_path_factory) -> dict[str, str]:
    """Mixtral-shaped synthetic traces (.npz, no router inputs): one that fits, one with a 33rd MoE
    layer, one whose router has a 9th expert and uses it."""
    folder = tmp_path_factory.mktemp("sim_traces")
    save_trace(_mixtral_like(), folder / "mixtral.npz")
    save_trace(_mixtral_like(layers=33), folder / "deeper.npz")
    wide = _mixtral_like(experts=9, tokens=64)
    assert wide.expert_ids_NLK.max() == 8
    save_trace(wide, folder / "wide.npz")
    return {name: str(folder / f"{name}.npz") for name in ("mixtral", "deeper", "wide")}


def _common(trace: str, *more: str, shape: str = "mixtral-8x7b", hardware: str = "a6000") -> list[str]:
    return ["--trace", trace, "--model", shape, "--hardware", hardware, *more]


# --- moepic simulate on real routing ------------------------------------------------------------


@needs_gsm8k
def test_simulate_moepic_on_the_gsm8k_trace_reports_a_sane_decode(capsys):
    report = _run(capsys, ["simulate", *_common(str(GSM8K), "--baseline", "moepic", "--budget", "0.25", "--recall", "0.85", "--json")])
    assert set(report) == SIMULATE_KEYS
    assert (report["name"], report["hardware"], report["model_shape"], report["trace"]) == ("moepic", "a6000", "mixtral-8x7b", str(GSM8K))
    assert report["approximates"].startswith("MoEpic")
    tokens = report["tokens"]
    assert 200 < tokens < 333  # the README: about 244 complete tokens
    times = model_times(load_profile("a6000"), MIXTRAL.spec, dtype_bytes=2, predictor=True)
    compute_ms = 1e3 * (times.rest_s + 32 * (times.layer_s + times.predictor_s + 2 * times.expert_s))
    assert compute_ms < report["ms_per_token"] < 10 * 1e3  # slower than all-resident, not absurdly so
    assert report["p50_ms"] <= report["p99_ms"]
    assert 0 < report["exposed_copy_ms_per_token"] < report["ms_per_token"] - compute_ms + 1e-6
    assert report["hits"] + report["partial_hits"] + report["misses"] == tokens * 32 * 2
    assert report["expert_hit_rate"] == pytest.approx((report["hits"] + report["partial_hits"]) / (tokens * 64))
    assert report["prediction_recall"] == pytest.approx(0.85, abs=0.03)
    assert report["prediction_precision"] == pytest.approx(report["prediction_recall"])  # k′ = k: as many named as routed
    assert report["cache_bytes"] + report["staging_bytes"] <= 0.25 * MIXTRAL_EXPERT_BYTES
    assert report["staging_bytes"] == 6 * 3 * 4096 * 14336 * 2  # k + k′ for this layer and the next: 6 whole experts
    assert report["wasted_prefetch_bytes"] <= report["prefetch_bytes"]
    assert report["bytes_loaded_per_token"] * tokens <= report["demand_bytes"] + report["prefetch_bytes"]
    layers = report["layers"]
    assert [l["layer"] for l in layers] == list(range(32)) and all(set(l) == LAYER_KEYS for l in layers)
    assert all(0 <= l["theta"] <= 1 and 0 <= l["slots"] <= 8 and 0 <= l["hit_rate"] <= 1 for l in layers)
    assert sum(l["bytes_loaded_per_token"] for l in layers) == pytest.approx(report["bytes_loaded_per_token"])
    assert sum(l["ms_per_token"] for l in layers) + 1e3 * times.rest_s == pytest.approx(report["ms_per_token"])
    assert sum(l["exposed_copy_ms_per_token"] for l in layers) == pytest.approx(report["exposed_copy_ms_per_token"])
    assert all(0 <= l["exposed_copy_ms_per_token"] <= l["ms_per_token"] for l in layers)
    assert layers[0]["recall"] is None and all(l["recall"] is not None for l in layers[1:])  # nothing predicts layer 0
    assert all(isinstance(report[k], float) and report[k] >= 0 for k in ("configure_s", "simulate_s", "layer_steps_per_s"))


@needs_gsm8k
def test_compare_json_on_the_gsm8k_trace_has_the_chosen_rows_and_their_ratios(capsys):
    report = _run(capsys, ["compare", *_common(str(GSM8K), "--budget", "0.25", "--recall", "0.85", "--json",
                                               "--baselines", "on-demand-lru, moepic,oracle")])
    rows = {r["name"]: r for r in report["rows"]}
    assert [r["name"] for r in report["rows"]] == ["on-demand-lru", "moepic", "oracle"]
    assert rows["moepic"]["vs_moepic"] == 1.0 and rows["oracle"]["vs_oracle"] == 1.0
    for r in report["rows"]:
        assert r["vs_moepic"] == pytest.approx(r["ms_per_token"] / rows["moepic"]["ms_per_token"])
        assert r["vs_oracle"] == pytest.approx(r["ms_per_token"] / rows["oracle"]["ms_per_token"])
        assert r["vs_oracle"] >= 1.0  # nothing beats the bound
    assert report["moepic_reduction_percent"] == {}  # none of the paper's systems was asked for
    assert (report["budget"], report["recall"], report["tokens"]) == ("0.25", 0.85, rows["moepic"]["tokens"])


# --- moepic compare as text, --config, a folder shape ------------------------------------------------


def test_compare_prints_one_row_per_baseline_with_ratios_to_moepic_and_the_oracle(capsys, traces):
    out = _text(capsys, ["compare", *_common(traces["mixtral"], "--budget", "0.5", "--recall", "0.8")])
    lines = out.splitlines()
    assert lines[0].startswith("mixtral-8x7b on a6000, budget 0.5") and "gate-lookahead stand-in recall 0.8" in lines[0]
    assert re.match(r"baseline +ms/token +p99 +× moepic +× oracle ", lines[1]), lines[1]
    rows = {line.split()[0]: line.split() for line in lines[2 : 2 + len(ORDER)]}
    assert list(rows) == list(ORDER)
    assert rows["moepic"][3] == "1.00" and rows["oracle"][4] == "1.00"
    moepic_ms, oracle_ms = float(rows["moepic"][1]), float(rows["oracle"][1])
    for name, row in rows.items():
        assert float(row[3]) == pytest.approx(float(row[1]) / moepic_ms, abs=0.01), name
        assert float(row[4]) == pytest.approx(float(row[1]) / oracle_ms, abs=0.01), name
    assert rows["on-demand-lru"][-3] == "–" and rows["oracle"][-3] == "100.0%"  # no predictor; a perfect one
    assert all(row[-2:] == ["0.0", "0.0"] for row in rows.values())  # copy-only: no host time
    assert lines[-1].startswith("moepic's latency reduction: pre-gated ") and lines[-1].endswith("(the paper reports 37.51–65.73 %)")
    assert len(lines) == 2 + len(ORDER) + 1


def test_simulate_with_a_run_config_uses_its_cache_node_and_budget(capsys, traces, tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text(yaml.safe_dump({"cache": {"budget": 0.3, "theta": 0.5, "policy": {"name": "lru"},
                                                "predictor": {"name": "noisy_oracle", "recall": 0.9, "seed": 3}}}))
    report = _run(capsys, ["simulate", *_common(traces["mixtral"], "--config", str(config), "--json")])
    assert (report["name"], report["approximates"]) == ("mine", "")
    assert all(l["theta"] == 0.5 for l in report["layers"])
    assert len({l["slots"] for l in report["layers"]}) == 1  # no configurator: an even split
    assert report["cache_bytes"] + report["staging_bytes"] <= 0.3 * MIXTRAL_EXPERT_BYTES
    assert report["prediction_recall"] == pytest.approx(0.9, abs=0.04)
    # --budget replaces the config's own
    larger = _run(capsys, ["simulate", *_common(traces["mixtral"], "--config", str(config), "--budget", "0.6", "--json")])
    assert larger["cache_bytes"] > report["cache_bytes"]
    assert larger["cache_bytes"] + larger["staging_bytes"] <= 0.6 * MIXTRAL_EXPERT_BYTES


def test_simulate_prints_a_table_of_layers_and_a_summary_line(capsys, traces):
    out = _text(capsys, ["simulate", *_common(traces["mixtral"], "--baseline", "cache-only", "--budget", "0.5")])
    lines = out.splitlines()
    assert lines[0] == "cache-only (MoEpic's θ = 1 end point without prefetch) on mixtral-8x7b, a6000, 24 decode tokens"
    assert lines[1].split()[:2] == ["layer", "theta"]
    assert [int(line.split()[0]) for line in lines[2:34]] == list(range(32))
    assert " ms/token (p50 " in lines[34] and len(lines) == 35


@needs_gsm8k
def test_simulate_a_batch_decodes_the_same_tokens_in_fewer_steps_and_says_so(capsys):
    common = _common(str(GSM8K), "--baseline", "cache-only", "--budget", "0.25", "--stream-tokens", "8")
    alone = _run(capsys, ["simulate", *common, "--json"])
    batched = _run(capsys, ["simulate", *common, "--batch", "8", "--json"])
    assert (alone["batch"], batched["batch"], batched["stream_tokens"]) == (1, 8, 8)
    assert batched["tokens"] == alone["tokens"] == alone["steps"] and batched["steps"] < alone["tokens"] / 4
    assert batched["tokens_per_s"] > alone["tokens_per_s"] and batched["ms_per_token"] > alone["ms_per_token"]
    assert batched["hits"] + batched["partial_hits"] + batched["misses"] < alone["hits"] + alone["partial_hits"] + alone["misses"]
    out = _text(capsys, ["simulate", *common, "--batch", "8"])
    assert f"batch 8: {batched['steps']} decode steps of " in out.splitlines()[-1] and "tokens/s over all streams" in out


def test_a_batch_outside_its_range_is_one_line(capsys, traces):
    message = cli_error(capsys, ["simulate", *_common(traces["mixtral"], "--baseline", "cache-only", "--budget", "0.5", "--batch", "0")])
    assert "argument --batch: expected an integer in [1, 1024], got '0'" in message


def test_a_hardware_profile_file_is_used_and_a_slower_link_is_slower(capsys, traces, tmp_path):
    profile = yaml.safe_load((PROFILES_DIR / "a6000.yaml").read_text())
    profile.update(name="slow-link", link_gbps=2.0)
    (tmp_path / "slow.yaml").write_text(yaml.safe_dump(profile))
    argv = ["simulate", "--baseline", "on-demand-lru", "--budget", "0.5", "--json"]
    fast = _run(capsys, [*argv, *_common(traces["mixtral"])])
    slow = _run(capsys, [*argv, *_common(traces["mixtral"], hardware=str(tmp_path / "slow.yaml"))])
    assert slow["hardware"] == "slow-link"
    assert slow["ms_per_token"] > fast["ms_per_token"] and slow["hits"] == fast["hits"]


@pytest.fixture(scope="module")
def tiny(checkpoint_dir, tmp_path_factory):
    """The tiny Mixtral checkpoint's folder and a greedy run's trace of it, with router inputs."""
    from moepic.checkpoint.load import load_model
    from moepic.runtime.generation import generate
    from moepic.tracing.recorder import RoutingRecorder

    folder = checkpoint_dir("mixtral")
    model = load_model(folder)
    recorder = RoutingRecorder(model.spec, model_name="tiny", record_hidden=True)
    generate(model, [1, 17, 5, 42, 8], max_new_tokens=12, eos_ids=(), tap=recorder)
    path = tmp_path_factory.mktemp("tiny") / "run.npz"
    save_trace(recorder.trace(), path)
    return str(folder), str(path)


def test_a_model_folder_is_a_shape_with_its_own_layers_experts_and_dtype(capsys, tiny):
    folder, trace_path = tiny
    trace = load_trace(trace_path)
    report = _run(capsys, ["simulate", *_common(trace_path, "--baseline", "cache-only", "--budget", "0.6", "--json", shape=folder)])
    assert report["model_shape"] == Path(folder).name
    assert [l["layer"] for l in report["layers"]] == [0, 1, 2]
    assert report["tokens"] == int(trace_steps(trace).decode_S.sum()) > 0
    assert report["staging_bytes"] == 2 * (3 * 32 * 48 * 4)  # k whole experts: 3·D·F fp32 weights each
    assert all(0 <= l["slots"] <= 4 for l in report["layers"])


def test_gate_lookahead_runs_on_recorded_router_inputs_with_the_models_weights(capsys, tiny, tmp_path):
    folder, trace_path = tiny
    shape_only = tmp_path / "shape-only"  # config.json alone: a shape without weights
    shape_only.mkdir()
    shutil.copy(Path(folder) / "config.json", shape_only / "config.json")
    argv = ["simulate", *_common(trace_path, "--baseline", "lru-prefetch", "--budget", "0.9", "--json", shape=str(shape_only))]
    message = cli_error(capsys, argv)
    assert message == ("the gate_lookahead predictor cannot run here (no model weights were given (--model)); give --recall R "
                       "to simulate it as a noisy_oracle of that recall")
    report = _run(capsys, ["simulate", *_common(trace_path, "--baseline", "lru-prefetch", "--budget", "0.9", "--json", shape=folder)])
    assert report["layers"][0]["recall"] is None  # nothing predicts the first MoE layer
    assert all(0.0 <= l["recall"] <= 1.0 for l in report["layers"][1:])


# --- one-line mistakes ------------------------------------------------------------------------


def test_an_unknown_preset_is_one_line_listing_the_known(capsys, traces):
    message = cli_error(capsys, ["simulate", *_common(traces["mixtral"], "--baseline", "moepic", shape="gpt-5")])
    assert message == f"unknown model shape 'gpt-5'; known: {known_shapes()} (or a model folder with config.json, or a GGUF file)"
    assert "mixtral-8x7b" in known_shapes() and "qwen3-30b-a3b" in known_shapes()


@pytest.mark.parametrize("command", ["simulate", "compare"])
def test_an_unknown_baseline_is_one_line_listing_the_known(capsys, traces, command):
    which = ["--baseline", "magic"] if command == "simulate" else ["--baselines", "moepic,magic"]
    message = cli_error(capsys, [command, *_common(traces["mixtral"], *which, "--budget", "0.5")])
    assert message == f"unknown baseline 'magic'; known: {', '.join(ORDER + HYBRID_ORDER)}"


def test_a_trace_with_more_moe_layers_than_the_shape_is_one_line(capsys, traces):
    message = cli_error(capsys, ["simulate", *_common(traces["deeper"], "--baseline", "cache-only", "--budget", "0.5")])
    assert message == f"{traces['deeper']}: the trace has 33 MoE layers, the model shape mixtral-8x7b has 32"


def test_a_trace_with_expert_ids_beyond_the_shapes_experts_is_one_line(capsys, traces):
    message = cli_error(capsys, ["simulate", *_common(traces["wide"], "--baseline", "cache-only", "--budget", "0.5")])
    assert message == f"{traces['wide']}: the trace has expert ids up to 8, but the model shape mixtral-8x7b has 8 experts"


def test_compare_without_a_budget_is_one_line(capsys, traces):
    message = cli_error(capsys, ["compare", *_common(traces["mixtral"])])
    assert message.startswith("compare: --budget is required (all baselines run at the same budget: ")


def test_a_baseline_without_a_budget_is_one_line(capsys, traces):
    message = cli_error(capsys, ["simulate", *_common(traces["mixtral"], "--baseline", "on-demand-lru")])
    assert message.startswith("on-demand-lru: no budget; give --budget")


def test_gate_lookahead_on_a_trace_without_router_inputs_asks_for_a_recall(capsys, traces):
    message = cli_error(capsys, ["simulate", *_common(traces["mixtral"], "--baseline", "lru-prefetch", "--budget", "0.5")])
    assert message == ("the gate_lookahead predictor cannot run here (the trace has no router inputs); give --recall R to "
                       "simulate it as a noisy_oracle of that recall")


@pytest.mark.parametrize("recall", ["1.5", "-0.1", "nan", "0.5,0.6", "high"])
def test_a_recall_outside_zero_to_one_or_of_another_length_is_one_line(capsys, traces, recall):
    message = cli_error(capsys, ["simulate", *_common(traces["mixtral"], "--baseline", "moepic", "--budget", "0.5", "--recall", recall)])
    assert message == f"--recall must be one value in [0, 1] or 32 (one per MoE layer), got {recall!r}"


def test_a_recall_per_layer_sets_each_layers_stand_in(capsys, traces):
    recall = ["0"] * 16 + ["1"] * 16
    report = _run(capsys, ["simulate", *_common(traces["mixtral"], "--baseline", "lru-prefetch", "--budget", "0.5",
                                                "--recall", ",".join(recall), "--json")])
    layer_recall = [l["recall"] for l in report["layers"]]
    assert layer_recall[0] is None and set(layer_recall[1:16]) == {0.0} and set(layer_recall[16:]) == {1.0}


@pytest.mark.parametrize("name", ["absent.npz", "absent.jsonl"])
def test_a_missing_trace_file_is_one_line(capsys, tmp_path, name):
    path = str(tmp_path / name)
    assert cli_error(capsys, ["simulate", *_common(path, "--baseline", "moepic", "--budget", "0.5")]) == f"{path}: trace file not found"


def test_simulate_without_a_baseline_or_config_is_one_line(capsys, traces):
    message = cli_error(capsys, ["simulate", *_common(traces["mixtral"], "--budget", "0.5")])
    assert message == "simulate: one of the arguments --config --baseline is required"


def test_a_budget_below_the_staging_is_one_line_naming_the_minimum(capsys, traces):
    message = cli_error(capsys, ["simulate", *_common(traces["mixtral"], "--baseline", "cache-only", "--budget", "0.001")])
    # Staging for k = 2 whole experts of 3·4096·14336 bf16 weights: 672 MiB.
    assert message.startswith("cache.budget '0.001' is ") and "below the minimum working set of 672.00 MiB" in message


# --- once bugs: a run config's oracle, no decode tokens, the KV-cache length --------------------------


def test_a_run_config_whose_oracle_names_the_simulated_trace_file_runs(capsys, traces, tmp_path):
    config = tmp_path / "oracle.yaml"
    config.write_text(yaml.safe_dump({"cache": {"budget": 0.5, "theta": 0.5, "policy": {"name": "lru"},
                                                "predictor": {"name": "oracle", "trace": traces["mixtral"]}}}))
    report = _run(capsys, ["simulate", *_common(traces["mixtral"], "--config", str(config), "--json")])
    assert report["prediction_recall"] == 1.0


@pytest.fixture(scope="module")
def prompt_only(tmp_path_factory) -> str:
    """A run that only prefilled (a prompt and one generated token): no decode step to time."""
    trace = _mixtral_like(tokens=6)
    path = tmp_path_factory.mktemp("prompt_only") / "prompt.npz"
    save_trace(attrs.evolve(trace, prefill_N=np.ones(6, bool)), path)
    return str(path)


@pytest.mark.parametrize("argv", [["simulate", "--baseline", "cache-only"], ["compare", "--baselines", "cache-only,moepic", "--recall", "0.8"]],
                         ids=["simulate", "compare"])
def test_a_trace_without_decode_tokens_gives_a_report_or_one_line(capsys, prompt_only, argv):
    capsys.readouterr()
    code = main([*argv, *_common(prompt_only, "--budget", "0.5")])
    out, err = capsys.readouterr()
    assert code in (0, 2)
    if code == 2:
        assert err.startswith("moepic: error: ") and err.count("\n") == 1 and out == ""


def test_a_negative_context_is_one_line(capsys, traces):
    message = cli_error(capsys, ["simulate", *_common(traces["mixtral"], "--baseline", "cache-only", "--budget", "0.5", "--context", "-1")])
    assert "--context" in message


def test_a_stand_in_for_a_predictor_two_layers_ahead_is_one_line(capsys, traces, tmp_path):
    config = tmp_path / "h2.yaml"
    config.write_text(yaml.safe_dump({"cache": {"budget": 0.5, "theta": 0.5, "policy": {"name": "lru"},
                                                "predictor": {"name": "gate_lookahead", "horizon": 2}}}))
    message = cli_error(capsys, ["simulate", *_common(traces["mixtral"], "--config", str(config), "--recall", "0.8")])
    assert message == (
        "the noisy_oracle standing in for the gate_lookahead predictor names one MoE layer ahead, not 2; run the "
        "predictor itself on a trace recorded with --trace-hidden (and --model)"
    )
