"""The latency model, the layout, the simulator and the configurator price routed experts in their
format (moepic/quant): a miss moves the format's bytes, a budget share is of the format's bytes,
and `--format` on simulate / compare / configure says which."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from moepic.cache.layout import plan_layout
from moepic.cli import main
from moepic.perfmodel.hardware import load_profile
from moepic.perfmodel.latency import model_times
from moepic.quant import build_format
from moepic.sim.shapes import model_shape
from tests_support import cli_error, mixtral_shaped_trace

INT4 = {"name": "int4", "group_size": 64}


@pytest.fixture(scope="module")
def trace(tmp_path_factory) -> str:
    return mixtral_shaped_trace(tmp_path_factory.mktemp("quant_trace"))


def test_model_times_price_a_miss_at_the_formats_bytes_and_a_step_at_its_kernels():
    spec, hw = model_shape("mixtral-8x7b").spec, load_profile("a6000")
    dense = model_times(hw, spec, dtype_bytes=2)
    int4 = model_times(hw, spec, dtype_bytes=2, expert_format=build_format(INT4))
    D, F = spec.hidden_size, spec.moe.expert_ffn
    assert dense.neuron_bytes == 3 * D * 2
    assert int4.neuron_bytes == 3 * D // 2 + 3 * (D // 64) * 2  # codes + float16 scales
    assert int4.expert_bytes == F * int4.neuron_bytes < dense.expert_bytes / 3.5
    # decoded into a dense buffer before the matmul: it reads its bytes, writes and reads the dense ones
    assert int4.expert_s > dense.expert_s
    assert (int4.layer_s, int4.rest_s) == (dense.layer_s, dense.rest_s)  # only the routed experts change


def test_a_budget_share_is_of_the_formats_bytes_and_bytes_hold_more_quantized_experts():
    spec = model_shape("mixtral-8x7b").spec
    fmt = build_format(INT4)
    share = plan_layout(spec, dtype_bytes=2, budget=0.25, theta=1.0, expert_format=fmt)
    assert share.layers[0].expert_bytes == spec.moe.expert_ffn * fmt.neuron_bytes(spec.hidden_size, False, 2)
    bf16 = plan_layout(spec, dtype_bytes=2, budget=0.25, theta=1.0)
    assert sum(l.slots for l in share.layers) == pytest.approx(sum(l.slots for l in bf16.layers), abs=len(spec.moe_layers))
    same_bytes = plan_layout(spec, dtype_bytes=2, budget=f"{bf16.expert_bytes // 4}B", theta=1.0, expert_format=fmt)
    assert sum(l.slots for l in same_bytes.layers) > 3 * sum(l.slots for l in bf16.layers)


def _rows(capsys, argv) -> dict:
    capsys.readouterr()
    assert main([*argv, "--json"]) == 0
    return {row["name"]: row for row in json.loads(capsys.readouterr().out)["rows"]}


def test_compare_runs_every_baseline_on_the_format(capsys, trace):
    argv = ["compare", "--trace", trace, "--model", "mixtral-8x7b", "--hardware", "a6000", "--budget", "0.25", "--recall", "0.85"]
    bf16, int4 = _rows(capsys, argv), _rows(capsys, [*argv, "--format", "int4"])
    assert bf16.keys() == int4.keys()
    shape = model_shape("mixtral-8x7b")
    expert = {"bf16": shape.spec.moe.expert_ffn * 3 * shape.spec.hidden_size * 2,
              "int4": shape.spec.moe.expert_ffn * build_format(INT4).neuron_bytes(shape.spec.hidden_size, False, 2)}
    for rows, fmt in ((bf16, "bf16"), (int4, "int4")):
        # on-demand-lru copies whole experts and nothing else: every miss is one expert of the format
        row = rows["on-demand-lru"]
        assert row["demand_bytes"] == row["misses"] * expert[fmt] > 0
    for name in int4:
        assert int4[name]["bytes_loaded_per_token"] < bf16[name]["bytes_loaded_per_token"] / 3 or bf16[name]["bytes_loaded_per_token"] == 0
        assert int4[name]["ms_per_token"] < bf16[name]["ms_per_token"]


def test_simulate_reads_the_format_a_quantized_folder_stores(capsys, tmp_path, trace):
    config = model_shape("mixtral-8x7b")
    folder = tmp_path / "mixtral-int4"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8,
        "num_experts_per_tok": 2, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
        "torch_dtype": "bfloat16", "quantization_config": build_format(INT4).quantization_config(),
    }))
    shape = model_shape(str(folder))
    assert shape.expert_format.config.as_dict() == build_format(INT4).config.as_dict()
    assert shape.expert_bytes < config.expert_bytes / 3.5
    argv = ["simulate", "--trace", trace, "--model", str(folder), "--hardware", "a6000", "--budget", "0.25", "--recall", "0.85",
            "--baseline", "on-demand-lru", "--json"]
    capsys.readouterr()
    assert main(argv) == 0
    stored = json.loads(capsys.readouterr().out)
    assert main([*argv[:-1], "--format", "int4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ms_per_token"] == stored["ms_per_token"]


def test_configure_keeps_the_format_in_the_config_it_writes(capsys, tmp_path, trace):
    out = tmp_path / "cache.yaml"
    capsys.readouterr()
    assert main(["configure", "--trace", trace, "--model", "mixtral-8x7b", "--hardware", "a6000", "--budget", "0.25",
                 "--format", "int4", "--group-size", "128", "--out", str(out)]) == 0
    config = OmegaConf.to_container(OmegaConf.load(out))
    assert config["model"]["expert_format"] == {"name": "int4", "group_size": 128, "symmetric": True}


@pytest.mark.parametrize("flags,message", [
    (["--format", "int3"], "--format: unknown expert format 'int3'; known: dense, fp8, gguf, int4, int4-fused, int8, mxfp4"),
    (["--format", "int4", "--group-size", "0"], "--group-size: at least 1, got 0"),
])
def test_a_bad_format_flag_is_one_line(capsys, trace, flags, message):
    argv = ["compare", "--trace", trace, "--model", "mixtral-8x7b", "--hardware", "a6000", "--budget", "0.25", "--recall", "0.85"]
    assert cli_error(capsys, [*argv, *flags]) == message


def test_hybrid_with_quantized_experts_is_refused_rather_than_mispriced(capsys, trace):
    argv = ["simulate", "--trace", trace, "--model", "mixtral-8x7b", "--hardware", "a6000", "--budget", "0.25", "--recall", "0.85",
            "--baseline", "fiddler", "--host", "desktop-ddr5", "--format", "int4"]
    assert cli_error(capsys, argv).startswith("fiddler (hybrid auto) prices host compute of experts the host computes as stored (dense, int4-fused); with int4 experts")
    capsys.readouterr()
    assert main([*argv[:-2], "--json"]) == 0  # the same run with dense experts is priced


def test_hybrid_with_int4_fused_experts_is_priced_at_the_hosts_int4_rate(capsys, trace, tmp_path):
    """int4-fused is the quantized format the host computes as stored: a faster int4 rate makes
    a hybrid setup faster, and a host that gives none is refused in one line naming the key."""
    import yaml

    from moepic.perfmodel.hardware import load_host

    def host_file(name: str, int4_gbps: float | None) -> str:
        data = load_host("desktop-ddr5").as_dict() | {"name": name, "int4_expert_gbps": int4_gbps}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({k: v for k, v in data.items() if v is not None}))
        return str(path)

    argv = ["simulate", "--trace", trace, "--model", "mixtral-8x7b", "--hardware", "a6000", "--budget", "0.25", "--recall",
            "0.85", "--baseline", "fiddler", "--format", "int4-fused"]
    ms = {}
    for name, gbps in (("slow", 2.0), ("fast", 60.0)):
        capsys.readouterr()
        assert main([*argv, "--host", host_file(name, gbps), "--json"]) == 0
        ms[name] = json.loads(capsys.readouterr().out)["ms_per_token"]
    assert ms["fast"] < ms["slow"]
    assert cli_error(capsys, [*argv, "--host", host_file("none", None)]).startswith(
        "host profile 'none' has no int4_expert_gbps to price host compute of int4-fused experts")
