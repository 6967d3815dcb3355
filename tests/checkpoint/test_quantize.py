"""`moepic quantize`: the folder it writes stores exactly what quantizing on load produces, every other
tensor untouched; it runs offloaded bit for bit as it runs resident; its report counts the bytes the
format says; a user mistake is one `moepic: error:` line, exit code 2 and no output folder left.

Every folder written here lies under pytest's temporary folders (the shared tiny checkpoints are
quantized once per session; a test that breaks a quantized folder breaks its own copy).
"""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tests_support import cli_error

from moepic.cache.stats import total
from moepic.checkpoint.load import load_model, read_spec
from moepic.cli import main
from moepic.core.weights import WIDEST_NEURON_BLOCK, MoEWeights, neuron_block
from moepic.default_model import default_model_dir
from moepic.policies import POLICIES
from moepic.quant import build_format
from moepic.runtime.generation import generate
from moepic.runtime.offload import offloaded_experts

INT4 = {"name": "int4", "group_size": 16}
STORED_INT4 = {"quant_method": "moepic", "expert_format": {"name": "int4", "group_size": 16, "symmetric": True}}
PROMPT = [1, 17, 5, 42, 8, 33, 9, 60]
NEW_TOKENS = 4

# The source tensors each family reads for its routed experts only (full names): gone from the output.
_PER_EXPERT_MATRICES = r"model\.layers\.\d+\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight"
_MIXTRAL_EXPERTS = r"model\.layers\.\d+\.block_sparse_moe\.experts\.\d+\.w[123]\.weight"
ROUTED_EXPERT_SOURCE = {
    "mixtral": _MIXTRAL_EXPERTS,
    "phimoe": _MIXTRAL_EXPERTS,
    "qwen2_moe": _PER_EXPERT_MATRICES,
    "deepseek_v3": _PER_EXPERT_MATRICES,
    # Fused on disk; the gate/up bias travels with its neurons (the expert's `gate_up_bias` part),
    # while the down bias stays the layer's (added once per expert, core/moe.py), so it is kept.
    "gpt_oss": r"model\.layers\.\d+\.mlp\.experts\.(gate_up_proj|down_proj|gate_up_proj_bias)",
    "gpt_oss_mxfp4": r"model\.layers\.\d+\.mlp\.experts\.((gate_up_proj|down_proj)_(blocks|scales)|gate_up_proj_bias)",
    "llama4": r"language_model\.model\.layers\.\d+\.feed_forward\.experts\.(gate_up_proj|down_proj)",
    "granitemoe": r"model\.layers\.\d+\.block_sparse_moe\.(input|output)_linear\.weight",
}
FAMILIES = tuple(ROUTED_EXPERT_SOURCE)


def _quantize(src, out, *extra) -> int:
    return main(["quantize", "--model", str(src), "--format", "int4", "--group-size", "16", *extra, "--out", str(out)])


@pytest.fixture(scope="session")
def quantized(checkpoint_dir, tmp_path_factory):
    """quantized(name) → that tiny checkpoint quantized to int4 (group 16) by the CLI, once per session."""
    built = {}

    def get(name: str):
        if name not in built:
            out = tmp_path_factory.mktemp(f"{name}-int4") / "quantized"
            assert _quantize(checkpoint_dir(name), out) == 0
            built[name] = out
        return built[name]

    return get


def _run(model, **kwargs):
    return generate(model, PROMPT, max_new_tokens=NEW_TOKENS, eos_ids=(), keep_logits=True, **kwargs)


def _assert_same_run(got, want) -> None:
    assert got.token_ids == want.token_ids
    assert len(got.logits) == len(want.logits) == NEW_TOKENS
    for step, (a, b) in enumerate(zip(got.logits, want.logits, strict=True)):
        assert torch.equal(a, b), f"logits of step {step} differ by up to {(a - b).abs().max().item()}"


def _routed_experts(model):
    return [e for layer in model.weights.layers if isinstance(layer.ffn, MoEWeights) for e in layer.ffn.experts]


def _names(path) -> set[str]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return set(f.keys())


def _raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _no_output_left(out) -> None:
    assert not out.exists()
    leftovers = [n for n in os.listdir(out.parent) if n.startswith(f".{out.name}.")]
    assert leftovers == [], f"partial output left beside {out}: {leftovers}"


# --- 1. the round trip, family by family ---------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_the_quantized_folder_stores_what_quantizing_on_load_produces(checkpoint_dir, quantized, name):
    src, out = checkpoint_dir(name), quantized(name)
    stored = load_model(out, dtype=torch.float32)
    on_load = load_model(src, dtype=torch.float32, expert_format=build_format(INT4))
    # What the file holds, part for part: the same encoded bytes, read back in the same neuron blocks.
    got, want = _routed_experts(stored), _routed_experts(on_load)
    assert len(got) == len(want) > 0
    for e, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.format.config == b.format.config and a.block == b.block and a.biased == b.biased
        assert len(a.parts) == len(b.parts)
        for p, (x, y) in enumerate(zip(a.parts, b.parts, strict=True)):
            assert x.dtype == y.dtype and torch.equal(x, y), f"routed expert {e}, part {p}"
    # And so the same greedy tokens and the same logits, bit for bit: the loader gives every weight
    # aligned memory of its own, so no file's header length changes how a matmul rounds (files.py).
    _assert_same_run(_run(stored), _run(on_load))


@pytest.mark.parametrize("name", FAMILIES)
def test_the_quantized_config_records_the_format_and_keeps_everything_else(checkpoint_dir, quantized, name):
    src, out = checkpoint_dir(name), quantized(name)
    source, written = (json.loads((p / "config.json").read_text()) for p in (src, out))
    assert written["quantization_config"] == STORED_INT4
    source.pop("quantization_config", None)  # GPT-OSS's MXFP4 one: its experts are int4 now
    written.pop("quantization_config")
    assert written == source
    # Every other file but the weights is copied as it is.
    others = {p.name for p in src.iterdir() if p.name != "config.json" and p.suffix != ".safetensors"}
    assert others <= {p.name for p in out.iterdir()}
    for other in others:
        assert (out / other).read_bytes() == (src / other).read_bytes()


@pytest.mark.parametrize("name", FAMILIES)
def test_routed_expert_sources_are_replaced_by_parts_and_every_other_tensor_is_untouched(checkpoint_dir, quantized, name):
    src, out = checkpoint_dir(name), quantized(name)
    source_names, out_names = _names(src), _names(out)
    expert_sources = {n for n in source_names if re.fullmatch(ROUTED_EXPERT_SOURCE[name], n)}
    assert expert_sources, "the pattern names no tensor of the source: fix the test"
    assert sorted(expert_sources & out_names) == [], "source tensors read for routed experts left in the output"
    kept = source_names - expert_sources
    assert sorted(kept - out_names) == [], "tensors the experts do not use went missing"
    with safe_open(str(src / "model.safetensors"), "pt") as a, safe_open(str(out / "model.safetensors"), "pt") as b:
        for n in sorted(kept):
            x, y = a.get_tensor(n), b.get_tensor(n)
            assert x.dtype == y.dtype and x.shape == y.shape and _raw_bytes(x) == _raw_bytes(y), n
    # What was added: each routed expert's parts, `<layer prefix>.experts.<e>.<part>`, under the
    # prefix the source keeps its experts under (a multimodal file's `language_model.` included).
    spec = read_spec(src)[0]
    fmt = build_format(INT4)
    parts = {p.name for p in fmt.parts(spec.hidden_size, neuron_block(spec.moe.expert_ffn, WIDEST_NEURON_BLOCK),
                                       torch.float32, spec.moe.expert_bias)}
    added = out_names - kept
    keys = set()
    for n in added:
        key, _, part = n.rpartition(".")
        assert part in parts and re.fullmatch(r".+\.experts\.\d+", key), n
        keys.add(key)
    assert len(keys) == len(spec.moe_layers) * spec.moe.num_experts
    assert len(added) == len(keys) * len(parts)
    source_roots = {n.split(".layers.")[0] for n in expert_sources}
    assert {n.split(".layers.")[0] for n in added} == source_roots


# --- 2. offloaded as resident ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mixtral", "gpt_oss"])
def test_an_offloaded_run_of_the_quantized_folder_equals_its_all_resident_run(quantized, name):
    out = quantized(name)
    resident = _run(load_model(out, dtype=torch.float32))
    model = load_model(out, dtype=torch.float32, offload_experts=True)
    engine = offloaded_experts(model, 0.3, 0.5, POLICIES.default_config())
    _assert_same_run(_run(model, experts=engine), resident)
    stats = total((*engine.prefill_stats.values(), *engine.decode_stats.values()))
    assert stats.misses + stats.partial_hits > 0  # the budget really was too small to hold them all
    assert engine.host_to_device_bytes == stats.bytes_loaded > 0


# --- 3. the report ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mixtral", "mixtral_bf16", "gpt_oss"])
def test_the_json_report_counts_the_bytes_the_format_says(checkpoint_dir, capsys, tmp_path, name):
    src = checkpoint_dir(name)
    capsys.readouterr()
    assert _quantize(src, tmp_path / "q", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert {"experts", "expert_bytes_before", "expert_bytes_after"} <= report.keys()
    spec, cfg = read_spec(src)
    D, F, biased = spec.hidden_size, spec.moe.expert_ffn, spec.moe.expert_bias
    itemsize = cfg.checkpoint_dtype().itemsize
    experts = len(spec.moe_layers) * spec.moe.num_experts
    assert report["experts"] == experts
    after = experts * F * build_format(INT4).neuron_bytes(D, biased, itemsize)
    assert report["expert_bytes_after"] == after
    assert report["expert_bytes_after"] < report["expert_bytes_before"]
    # That is what the file holds for them.
    written = load_file(tmp_path / "q" / "model.safetensors")
    keys = {n.rpartition(".")[0] for n in written if re.search(r"\.experts\.\d+\.[a-z_]+$", n)}
    assert len(keys) == experts
    assert sum(t.numel() * t.element_size() for n, t in written.items() if n.rpartition(".")[0] in keys) == after
    # Before: every source tensor read for the routed experts only, as stored.
    pattern = ROUTED_EXPERT_SOURCE["mixtral" if name == "mixtral_bf16" else name]
    source = load_file(src / "model.safetensors")
    before = sum(t.numel() * t.element_size() for n, t in source.items() if re.fullmatch(pattern, n))
    assert report["expert_bytes_before"] == before


# --- 4. the bundled model ---------------------------------------------------------------------------------


def test_the_bundled_model_quantizes_to_int8_and_generates(capsys, tmp_path):
    bundled = default_model_dir()
    before = {p.name: p.stat().st_mtime_ns for p in bundled.iterdir()}
    out = tmp_path / "kjv-int8"
    assert main(["quantize", "--format", "int8", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "moepic",
                                             "expert_format": {"name": "int8", "group_size": 64, "symmetric": True}}
    assert (out / "tokenizer.json").read_bytes() == (bundled / "tokenizer.json").read_bytes()
    capsys.readouterr()
    assert main(["generate", "--model", str(out), "--max-new-tokens", "3", "--greedy", "--prompt-ids", "1,2,3"]) == 0
    assert capsys.readouterr().out.strip()
    assert {p.name: p.stat().st_mtime_ns for p in bundled.iterdir()} == before


def test_the_bundled_model_quantizes_to_int4_fused_and_its_folder_runs_what_encoding_on_load_runs(capsys, tmp_path):
    """int4-fused keeps its codes in the tile order of this machine's kernel; the folder keeps one
    order for every machine (quant/int4_tiles.py CANONICAL) and reads back into this one's."""
    out = tmp_path / "kjv-int4-fused"
    assert main(["quantize", "--format", "int4-fused", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["expert_format"] == {"name": "int4-fused", "group_size": 64}
    greedy = ["generate", "--max-new-tokens", "4", "--greedy", "--prompt-ids", "1,2,3", "--json"]
    capsys.readouterr()
    assert main([*greedy, "--model", str(out)]) == 0
    from_folder = json.loads(capsys.readouterr().out)
    assert main([*greedy, "--expert-format", "int4-fused"]) == 0
    on_load = json.loads(capsys.readouterr().out)
    assert from_folder["token_ids"] == on_load["token_ids"]
    from moepic.checkpoint.load import load_model
    from moepic.quant import build_format

    experts = [load_model(out, dtype=torch.float32).weights.layers[0].ffn.experts,
               load_model(default_model_dir(), dtype=torch.float32, expert_format=build_format("int4-fused")).weights.layers[0].ffn.experts]
    for read, encoded in zip(*experts, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(read.parts, encoded.parts, strict=True))


# --- 5. user mistakes: one line, exit 2, nothing written --------------------------------------------------


def test_a_group_size_that_does_not_divide_the_hidden_size_names_config_and_hidden_size(checkpoint_dir, capsys, tmp_path):
    src, out = checkpoint_dir("mixtral"), tmp_path / "q"
    message = cli_error(capsys, ["quantize", "--model", str(src), "--group-size", "24", "--out", str(out)])
    assert message.startswith(f"{src / 'config.json'}: ")
    assert "group size 24" in message and "hidden size 32" in message
    _no_output_left(out)


def test_an_unknown_format_names_the_known_ones(checkpoint_dir, capsys, tmp_path):
    out = tmp_path / "q"
    message = cli_error(capsys, ["quantize", "--model", str(checkpoint_dir("mixtral")), "--format", "int3", "--out", str(out)])
    assert "'int3'" in message
    assert re.search(r"known: .*\bint4\b", message) and "int8" in message
    _no_output_left(out)


def test_an_existing_output_folder_is_refused_and_left_untouched(checkpoint_dir, capsys, tmp_path):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    message = cli_error(capsys, ["quantize", "--model", str(checkpoint_dir("mixtral")), "--group-size", "16", "--out", str(out)])
    assert message.startswith(f"{out}: ") and "already exists" in message
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []


def test_the_source_folder_as_output_is_refused(checkpoint_dir, capsys, tmp_path):
    src = tmp_path / "mixtral"
    shutil.copytree(checkpoint_dir("mixtral"), src)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    message = cli_error(capsys, ["quantize", "--model", str(src), "--group-size", "16", "--out", str(src)])
    assert message.startswith(f"{src}: ") and "source" in message
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []


def test_a_folder_moepic_already_quantized_is_refused(quantized, capsys, tmp_path):
    src, out = quantized("mixtral"), tmp_path / "again"
    message = cli_error(capsys, ["quantize", "--model", str(src), "--group-size", "16", "--out", str(out)])
    assert message.startswith(f"{src / 'config.json'}: ") and "already stored as" in message
    _no_output_left(out)


def test_a_failure_while_writing_leaves_no_partial_folder(checkpoint_dir, capsys, tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("moepic.checkpoint.quantize.save_file", disk_full)
    out = tmp_path / "q"
    message = cli_error(capsys, ["quantize", "--model", str(checkpoint_dir("mixtral")), "--group-size", "16", "--out", str(out)])
    assert message.startswith(f"{out}: ") and "disk full" in message
    _no_output_left(out)


# --- 6. a broken quantized folder, when loaded --------------------------------------------------------------

GENERATE = ["generate", "--prompt-ids", "1,2", "--max-new-tokens", "1"]
SCALES = "model.layers.1.block_sparse_moe.experts.2.gate_up_scales"  # [2, F = 48, D / 16 = 2] float16


@pytest.fixture
def broken(quantized, tmp_path):
    """A copy of the quantized mixtral folder, to break."""
    folder = tmp_path / "quantized"
    shutil.copytree(quantized("mixtral"), folder)
    assert main([*GENERATE, "--model", str(folder)]) == 0  # unbroken, it loads
    return folder


def _edit_tensors(folder, change) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_a_missing_scales_tensor_is_named_with_its_shape(broken, capsys):
    _edit_tensors(broken, lambda t: t.pop(SCALES))
    message = cli_error(capsys, [*GENERATE, "--model", str(broken)])
    assert message == f"{broken}: missing tensor '{SCALES}' (expected shape [2, 48, 2])"


def test_a_scales_tensor_of_the_wrong_shape_is_named_with_both_shapes(broken, capsys):
    _edit_tensors(broken, lambda t: t.update({SCALES: t[SCALES][:, :, :1].contiguous()}))
    message = cli_error(capsys, [*GENERATE, "--model", str(broken)])
    assert message == f"{broken / 'model.safetensors'}: tensor '{SCALES}' has shape [2, 48, 1], expected [2, 48, 2]"


def test_an_unknown_stored_format_name_is_named(broken, capsys):
    config = json.loads((broken / "config.json").read_text())
    config["quantization_config"]["expert_format"]["name"] = "int3"
    (broken / "config.json").write_text(json.dumps(config))
    message = cli_error(capsys, [*GENERATE, "--model", str(broken)])
    assert message.startswith(f"{broken / 'config.json'}: quantization_config.expert_format")
    assert "'int3'" in message


def test_asking_another_format_of_a_stored_one_is_refused(quantized, capsys):
    folder = quantized("mixtral")
    message = cli_error(capsys, [*GENERATE, "--model", str(folder), "--expert-format", "int8"])
    assert message.startswith(f"{folder / 'config.json'}: ")
    assert "re-encoding" in message and "not supported" in message and "'int8'" in message


def test_a_large_checkpoint_is_written_in_shards_with_an_index_and_loads_the_same(checkpoint_dir, tmp_path, monkeypatch):
    import moepic.checkpoint.quantize as quantize

    src = checkpoint_dir("qwen2_moe")
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    assert main(["quantize", "--model", str(src), "--group-size", "16", "--out", str(single)]) == 0
    monkeypatch.setattr(quantize, "SHARD_BYTES", 20_000)
    assert main(["quantize", "--model", str(src), "--group-size", "16", "--out", str(sharded)]) == 0
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    assert not list(sharded.glob("*.part"))
    a = generate(load_model(single, dtype=torch.float32), [1, 5, 9], max_new_tokens=4, eos_ids=(), keep_logits=True)
    b = generate(load_model(sharded, dtype=torch.float32), [1, 5, 9], max_new_tokens=4, eos_ids=(), keep_logits=True)
    assert a.token_ids == b.token_ids and all(torch.equal(x, y) for x, y in zip(a.logits, b.logits))
