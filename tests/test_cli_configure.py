"""`moepic profile` measures a hardware profile; `moepic configure` turns a trace, a profile and a
budget into per-layer cache sizes and θ that beat the uniform baselines and that `moepic generate
--config` runs with the dense run's tokens; every mistake is one line."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import attrs
import pytest
import torch
import yaml

from moepic.checkpoint.load import read_spec
from moepic.cli import main
from moepic.config import RunConfig
from moepic.configurators import CONFIGURATORS
from moepic.default_model import model_folder
from moepic.perfmodel.hardware import PROFILES_DIR, known_profiles, load_profile
from moepic.policies import POLICIES
from moepic.predictors import PREDICTORS
from moepic.policies.base import auto_policies
from moepic.tracing import load_trace, save_trace
from tests_support import cli_error

PROFILE_KEYS = ("link_gbps", "link_latency_us", "device_copy_gbps", "memory_gbps", "matmul_tflops",
                "expert_overhead_us", "layer_overhead_us")
HOST_RATES = ("bf16_expert_gbps", "fp32_expert_gbps", "call_overhead_us", "memory_gbps")
BASELINES = {"uniform theta=0", "uniform theta=0.4", "uniform theta=1"}
SHARED = Path(__file__).resolve().parents[2] / "shared" / "traces" / "mixtral-8x7b-instruct-fp8"
GSM8K = SHARED / "gsm8k_2_routing.jsonl"


def _run(capsys, argv) -> dict:
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def _moe_layers() -> tuple[int, ...]:
    spec, _ = read_spec(model_folder(None))
    return tuple(spec.moe_layers)


# --- moepic profile ----------------------------------------------------------------------------


def test_quick_cpu_profile_prints_positive_rates_and_writes_a_loadable_yaml(capsys, tmp_path):
    out = tmp_path / "cpu.yaml"
    report = _run(capsys, ["profile", "--device", "cpu", "--quick", "--out", str(out), "--json"])
    assert set(PROFILE_KEYS) <= set(report)
    for key in PROFILE_KEYS:
        value = report[key]
        assert isinstance(value, float) and math.isfinite(value), (key, value)
        assert value >= 0 if key.endswith("_us") else value > 0, (key, value)
    assert "measured" in report["source"] and "not measured" not in report["source"]
    assert report["device"] == "cpu" and report["name"] == "measured-cpu"
    assert report["written_to"] == str(out)
    loaded = load_profile(out)
    assert loaded.as_dict() == {k: v for k, v in report.items() if k != "written_to"}
    # The host side, measured too; the result latency only where a CUDA device takes the result.
    host = report["host"]
    for key in HOST_RATES:
        assert isinstance(host[key], float) and math.isfinite(host[key]) and host[key] > 0, (key, host[key])
    assert isinstance(host["physical_cores"], int) and host["physical_cores"] >= 1
    assert "result_latency_us" not in host and "not measured (no CUDA device here)" in host["source"]
    assert loaded.host is not None and loaded.host.name == "measured-cpu-host"


def test_measured_profile_file_drives_configure(capsys, tmp_path, trace_files):
    out = tmp_path / "here.yaml"
    _run(capsys, ["profile", "--device", "cpu", "--quick", "--name", "this-box", "--out", str(out), "--json"])
    report = _run(capsys, ["configure", "--budget", "0.3", "--hardware", str(out), "--trace", trace_files["hidden"], "--json"])
    assert report["hardware"] == "this-box"
    assert report["predicted_ms_per_token"] > 0


def test_profile_through_an_emulated_link_measures_that_link(capsys):
    report = _run(capsys, ["profile", "--device", "cpu", "--quick", "--link-gbps", "2", "--json"])
    assert report["link_gbps"] == pytest.approx(2.0, rel=0.3)
    assert "emulated link" in report["source"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here, so --device cuda is not a mistake")
def test_profile_on_cuda_without_cuda_is_one_line(capsys):
    assert cli_error(capsys, ["profile", "--device", "cuda", "--quick"]) == "--device cuda: no CUDA device is available here"


@pytest.mark.parametrize("argv,message", [
    (["--device", "cpu", "--host-threads", "0"], "argument --host-threads: expected an integer in [1, 4096], got '0'"),
    (["--device", "cpu", "--host-threads", "two"], "argument --host-threads: expected an integer in [1, 4096], got 'two'"),
    (["--device", "cpu", "--link-gbps", "0"], "argument --link-gbps: expected a number in (0, 10000], got '0'"),
    (["--device", "cpu", "--link-gbps", "-1"], "argument --link-gbps: expected a number in (0, 10000], got '-1'"),
    (["--device", "cpu", "--link-gbps", "nan"], "argument --link-gbps: expected a number in (0, 10000], got 'nan'"),
    (["--device", "cpu", "--link-gbps", "5", "--link-latency-us", "inf"], "argument --link-latency-us: expected a number in [0, 1000000], got 'inf'"),
    (["--device", "gpu"], "--device: not a device: 'gpu'"),
    (["--device", "cpu", "--dtype", "int4"], "argument --dtype: invalid choice"),
])
def test_profile_mistakes_are_one_line(capsys, argv, message):
    assert message in cli_error(capsys, ["profile", "--quick", *argv])


@pytest.mark.parametrize("argv", [["--link-gbps", "inf"], ["--link-gbps", "2", "--link-latency-us", "-1"]])
def test_profile_link_values_the_emulator_rejects_are_one_line(capsys, argv):
    message = cli_error(capsys, ["profile", "--device", "cpu", "--quick", *argv])
    assert "--link" in message


# --- moepic configure --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trace_files(tmp_path_factory) -> dict[str, str]:
    """A greedy run's trace with router inputs, and three edits of it: without them, with fewer MoE
    layers, and a hardware profile missing link_gbps."""
    folder = tmp_path_factory.mktemp("configure")
    hidden = folder / "run.npz"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = main(["generate", "--prompt-ids", "1,2,3,4,5", "--max-new-tokens", "40", "--greedy", "--json",
                     "--record-trace", str(hidden), "--trace-hidden"])
    assert code == 0
    trace = load_trace(hidden)
    assert trace.hidden_NLD is not None
    save_trace(attrs.evolve(trace, hidden_NLD=None), folder / "no_hidden.npz")
    keep = len(trace.moe_layers) - 2
    save_trace(
        attrs.evolve(
            trace, moe_layers=trace.moe_layers[:keep], expert_ids_NLK=trace.expert_ids_NLK[:, :keep],
            weights_NLK=trace.weights_NLK[:, :keep], hidden_NLD=trace.hidden_NLD[:, :keep],
        ),
        folder / "short.npz",
    )
    profile = yaml.safe_load((PROFILES_DIR / "a6000.yaml").read_text())
    del profile["link_gbps"]
    (folder / "no_link.yaml").write_text(yaml.safe_dump(profile))
    return {name: str(folder / file) for name, file in
            [("hidden", "run.npz"), ("no_hidden", "no_hidden.npz"), ("short", "short.npz"), ("no_link", "no_link.yaml")]}


def _configure(capsys, trace_files, *extra, trace="hidden", budget="0.3") -> dict:
    return _run(capsys, ["configure", "--budget", budget, "--hardware", "a6000", "--trace", trace_files[trace], "--json", *extra])


def _assert_consistent(report: dict) -> None:
    layers = report["layers"]
    assert [l["layer"] for l in layers] == list(_moe_layers())
    for l in layers:
        assert 0.0 <= l["theta"] <= 1.0 and l["budget_bytes"] >= 0 and l["slots"] >= 0
        assert (l["budget_bytes"] == 0) == (l["slots"] == 0 or l["theta"] == 0)
        assert 0.0 <= l["hit_rate"] <= 1.0 and l["predicted_ms"] > 0
    assert sum(l["budget_bytes"] for l in layers) + report["staging_bytes"] == report["total_bytes"]
    assert report["total_bytes"] <= report["budget_bytes"]
    assert set(report["baselines"]) == BASELINES
    assert report["predicted_ms_per_token"] > 0


def test_configure_beats_every_uniform_baseline_and_its_config_runs_with_the_dense_tokens(capsys, tmp_path, trace_files):
    config = tmp_path / "c.yaml"
    report = _configure(capsys, trace_files, "--predictor", "gate_lookahead", "--out", str(config))
    assert len(_moe_layers()) == 6 and len(report["layers"]) == 6
    _assert_consistent(report)
    for name, ms in report["baselines"].items():
        assert report["predicted_ms_per_token"] <= ms * (1 + 1e-9), name
    assert report["configurator"]["name"] == "moepic" and report["hardware"] == "a6000"
    assert report["config"] == str(config)

    written = yaml.safe_load(config.read_text())
    assert written["cache"]["theta"] == [l["theta"] for l in report["layers"]]
    assert written["cache"]["budget"] == [f"{l['budget_bytes']}B" for l in report["layers"]]
    assert written["cache"]["predictor"]["name"] == "gate_lookahead" and written["cache"]["policy"]["name"] == "lcp"

    run = ["generate", "--prompt-ids", "1,2,3", "--max-new-tokens", "5", "--greedy", "--json"]
    dense = _run(capsys, run)
    offloaded = _run(capsys, [*run, "--config", str(config)])
    assert offloaded["token_ids"] == dense["token_ids"]
    stats = offloaded["stats"]
    assert stats["theta"] == [l["theta"] for l in report["layers"]]
    assert stats["slots"] == [l["slots"] for l in report["layers"]]
    assert stats["cache_bytes"] == sum(l["budget_bytes"] for l in report["layers"])
    assert stats["staging_bytes"] == report["staging_bytes"]
    assert stats["cache_bytes"] + stats["staging_bytes"] <= report["budget_bytes"]
    assert offloaded["cache"]["predictor"]["name"] == "gate_lookahead"


def test_plain_output_lists_every_layer_and_the_baselines(capsys, tmp_path, trace_files):
    capsys.readouterr()
    assert main(["configure", "--budget", "0.3", "--hardware", "a6000", "--trace", trace_files["hidden"],
                 "--out", str(tmp_path / "c.yaml")]) == 0
    out = capsys.readouterr().out
    assert "predicted" in out and all(f"vs {name}:" in out for name in BASELINES)
    assert f"wrote {tmp_path / 'c.yaml'}" in out


def test_dp_is_at_least_as_good_as_moepic_and_uniform_splits_evenly(capsys, trace_files):
    moepic = _configure(capsys, trace_files)
    dp = _configure(capsys, trace_files, "--configurator", "dp")
    uniform = _configure(capsys, trace_files, "--configurator", "uniform")
    for report in (dp, uniform):
        _assert_consistent(report)
    assert dp["configurator"]["name"] == "dp" and uniform["configurator"]["name"] == "uniform"
    # moepic's candidates are a subset of dp's options on the same discretised budget.
    assert dp["predicted_ms_per_token"] <= moepic["predicted_ms_per_token"] * (1 + 1e-9)
    for name, ms in dp["baselines"].items():
        assert dp["predicted_ms_per_token"] <= ms * (1 + 1e-9), name
    assert dp["baselines"] == moepic["baselines"] == uniform["baselines"]
    assert len({(l["budget_bytes"], l["theta"], l["slots"]) for l in uniform["layers"]}) == 1


def test_policy_auto_keeps_the_fastest_predicted_of_its_candidates(capsys, tmp_path, trace_files):
    single = {name: _configure(capsys, trace_files, "--policy", name) for name in auto_policies()}
    auto = _configure(capsys, trace_files, "--policy", "auto", "--out", str(tmp_path / "auto.yaml"))
    _assert_consistent(auto)
    fastest = min(single, key=lambda name: single[name]["predicted_ms_per_token"])
    assert auto["policy"]["name"] == fastest
    assert auto["predicted_ms_per_token"] == single[fastest]["predicted_ms_per_token"]
    assert yaml.safe_load((tmp_path / "auto.yaml").read_text())["cache"]["policy"] == auto["policy"]


def test_a_learned_policy_file_is_weighed_by_auto_and_written_into_the_config(capsys, tmp_path, trace_files):
    from moepic.policies.learned import LearnedPolicy

    other = tmp_path / "other.npz"  # fit on another run's routing than the one configured on
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["generate", "--prompt-ids", "9,8,7", "--max-new-tokens", "40", "--json", "--record-trace", str(other)]) == 0
        assert main(["train-policy", "--trace", str(other), "--out", str(tmp_path / "p.json"), "--json"]) == 0
    learned = _configure(capsys, trace_files, "--policy", "learned", "--learned-policy", str(tmp_path / "p.json"),
                         "--out", str(tmp_path / "l.yaml"))
    _assert_consistent(learned)
    assert learned["policy"] == {"name": "learned", "path": str(tmp_path / "p.json")}
    assert yaml.safe_load((tmp_path / "l.yaml").read_text())["cache"]["policy"] == learned["policy"]
    assert isinstance(POLICIES.build(POLICIES.structure_node(learned["policy"], "cache.policy")), LearnedPolicy)
    single = {name: _configure(capsys, trace_files, "--policy", name)["predicted_ms_per_token"] for name in auto_policies()}
    auto = _configure(capsys, trace_files, "--policy", "auto", "--learned-policy", str(tmp_path / "p.json"))
    assert auto["predicted_ms_per_token"] == min([*single.values(), learned["predicted_ms_per_token"]])
    message = cli_error(capsys, ["configure", "--trace", trace_files["hidden"], "--hardware", "a6000", "--budget", "0.25",
                                 "--policy", "lru", "--learned-policy", str(tmp_path / "p.json")])
    assert message.startswith("--learned-policy has no effect with --policy lru")


def test_predictor_none_and_oracle_set_the_recall(capsys, trace_files):
    L = len(_moe_layers())
    gate = _configure(capsys, trace_files, "--predictor", "gate_lookahead")
    none = _configure(capsys, trace_files, "--predictor", "none")
    oracle = _configure(capsys, trace_files, "--predictor", "oracle")
    assert none["recall"] == [0.0] * L
    assert oracle["recall"] == [0.0] + [1.0] * (L - 1)
    assert gate["recall"][0] == 0.0 and all(0.0 <= r <= 1.0 for r in gate["recall"]) and max(gate["recall"]) > 0
    assert none["staging_bytes"] < gate["staging_bytes"]  # no prefetch buffers without a predictor
    for report in (none, oracle):
        _assert_consistent(report)


def test_the_default_predictor_is_the_registrys_as_in_generate(capsys, tmp_path, trace_files):
    report = _configure(capsys, trace_files, "--out", str(tmp_path / "c.yaml"))
    written = yaml.safe_load((tmp_path / "c.yaml").read_text())["cache"]["predictor"]
    assert written["name"] == PREDICTORS.default == RunConfig().cache.predictor.name
    assert report["recall"] == [0.0] * len(_moe_layers())


def test_given_recall_replaces_the_measurement_and_needs_no_router_inputs(capsys, trace_files):
    L = len(_moe_layers())
    one = _configure(capsys, trace_files, "--predictor", "gate_lookahead", "--recall", "0.5", trace="no_hidden")
    assert one["recall"] == [0.0] + [0.5] * (L - 1)
    per_layer = [round(0.1 * i, 1) for i in range(L)]
    each = _configure(capsys, trace_files, "--predictor", "gate_lookahead", "--recall", ",".join(map(str, per_layer)),
                      trace="no_hidden")
    assert each["recall"] == per_layer


def test_budget_holding_every_expert_caches_them_all_without_staging(capsys, trace_files):
    report = _configure(capsys, trace_files, budget="1.0")
    assert report["staging_bytes"] == 0
    assert all(l["theta"] == 1.0 and l["hit_rate"] == 1.0 for l in report["layers"])
    assert len({l["slots"] for l in report["layers"]}) == 1
    assert set(report["baselines"].values()) == {report["predicted_ms_per_token"]}


@pytest.mark.parametrize("argv,needles", [
    (["--budget", "1KB"], ["minimum working set"]),
    (["--budget", "lots"], ["--budget", "'lots'"]),
    (["--trace", "{short}"], ["{short}", "another model shape", "4 MoE layers", "the model has 6"]),
    (["--hardware", "{no_link}"], ["{no_link}", "misses 'link_gbps'"]),
    (["--hardware", "no-such-gpu"], ["'no-such-gpu'", *known_profiles()]),
    (["--configurator", "greedy"], ["unknown configurator 'greedy'", f"known: {CONFIGURATORS.known()}"]),
    (["--policy", "fifo"], ["unknown policy 'fifo'", f"known: {POLICIES.known()}"]),
    (["--predictor", "psychic"], ["unknown predictor 'psychic'", f"known: {PREDICTORS.known()}"]),
    (["--trace", "{no_hidden}"], ["no router inputs", "--recall"]),
    (["--recall", "1.5"], ["--recall", "'1.5'"]),
    (["--recall", "0.5,0.5"], ["--recall", "6 (one per MoE layer)"]),
    (["--recall", "high"], ["--recall", "'high'"]),
    (["--recall", "0.5,0.5,0.5,0.5,0.5,0.5"], ["--recall", "first MoE layer's recall must be 0"]),
    (["--recall", "0.5", "--predictor", "none"], ["--recall has no effect with --predictor none"]),
    (["--trace", "{missing}"], ["{missing}", "not found"]),
    (["--out", "{unwritable}"], ["{unwritable}", "cannot write the config"]),
])
def test_configure_mistakes_are_one_line_naming_the_problem(capsys, tmp_path, trace_files, argv, needles):
    paths = trace_files | {"missing": str(tmp_path / "gone.npz"), "unwritable": str(tmp_path / "no" / "c.yaml")}
    base = {"--budget": "0.3", "--hardware": "a6000", "--trace": paths["hidden"], "--predictor": "gate_lookahead"}
    for flag, value in zip(argv[::2], argv[1::2]):
        base[flag] = value.format(**paths)
    # --json: no progress bar on stderr, so the error is the only thing there.
    message = cli_error(capsys, ["configure", "--json", *[part for pair in base.items() for part in pair]])
    for needle in needles:
        assert needle.format(**paths) in message, (needle, message)


def test_error_after_the_progress_bar_is_what_a_terminal_shows_last(capsys, trace_files):
    capsys.readouterr()
    assert main(["configure", "--budget", "1KB", "--hardware", "a6000", "--trace", trace_files["hidden"]]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.split("\r")[-1].startswith("moepic: error: budget is 0.00 MiB (1000 bytes), below the minimum working set of")


def test_trace_without_router_inputs_is_named_by_its_file(capsys, trace_files):
    message = cli_error(capsys, ["configure", "--json", "--budget", "0.3", "--hardware", "a6000", "--trace", trace_files["no_hidden"],
                                 "--predictor", "gate_lookahead"])
    assert message.startswith(trace_files["no_hidden"])


# --- the shared Mixtral-8x7B traces --------------------------------------------------------------


@pytest.mark.skipif(not GSM8K.is_file(), reason=f"shared Mixtral routing trace not found: {GSM8K}")
def test_configure_for_mixtral_8x7b_on_its_real_routing_beats_uniform(capsys, tmp_path):
    import transformers

    folder = tmp_path / "mixtral-8x7b"
    transformers.MixtralConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        num_local_experts=8, num_experts_per_tok=2, vocab_size=32000, dtype="bfloat16",
    ).save_pretrained(folder)
    shape = _run(capsys, ["inspect", "--model", str(folder), "--json"])
    assert shape["dtype"] == "bfloat16" and len(shape["spec"]["layer_kinds"]) == 32
    report = _run(capsys, ["configure", "--model", str(folder), "--budget", "0.25", "--hardware", "a6000",
                           "--trace", str(GSM8K), "--predictor", "gate_lookahead", "--recall", "0.85", "--json"])
    assert len(report["layers"]) == 32
    assert report["recall"] == [0.0] + [0.85] * 31
    assert report["budget_bytes"] == shape["routed_expert_bytes"] // 4
    assert report["total_bytes"] <= report["budget_bytes"]
    assert set(report["baselines"]) == BASELINES
    for name, ms in report["baselines"].items():
        assert report["predicted_ms_per_token"] <= ms * (1 + 1e-9), name
    # The JSONL logs hold no router inputs: gate lookahead's recall must be given.
    message = cli_error(capsys, ["configure", "--json", "--model", str(folder), "--budget", "0.25", "--hardware", "a6000",
                                 "--trace", str(GSM8K), "--predictor", "gate_lookahead"])
    assert "no router inputs" in message and "--recall" in message
