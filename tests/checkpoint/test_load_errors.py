"""A broken model folder becomes one `moepic: error:` line naming the file, key or tensor, and exit code 2.

Every case copies a tiny checkpoint from the shared fixture and breaks the copy, then runs the CLI.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from moepic.checkpoint.load import load_model
from moepic.cli import main
from moepic.errors import CheckpointError
from tests_support import cli_error

ARGS = ["generate", "--json", "--greedy", "--prompt-ids", "1,2,3", "--max-new-tokens", "2"]


def _copy(checkpoint_dir, tmp_path, name="mixtral"):
    folder = tmp_path / name
    shutil.copytree(checkpoint_dir(name), folder)
    return folder


def _error(capsys, folder) -> str:
    """Run the CLI on `folder`; check the one-line contract and return the message."""
    return cli_error(capsys, [*ARGS, "--model", str(folder)])


def _edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is _DELETE:
            del config[key]
        else:
            config[key] = value
    path.write_text(json.dumps(config))


_DELETE = object()


def _edit_tensors(path, change):
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_the_unbroken_copy_loads(checkpoint_dir, tmp_path):
    # Guards every test below: a failure there comes from the one thing it broke.
    folder = _copy(checkpoint_dir, tmp_path)
    assert main([*ARGS, "--model", str(folder)]) == 0


# --- the folder and config.json ---------------------------------------------------------------------


def test_missing_model_folder_is_named(capsys, tmp_path):
    assert _error(capsys, tmp_path / "nowhere") == f"{tmp_path / 'nowhere'}: model folder not found"


def test_missing_model_folder_is_named_for_a_text_prompt_too(capsys, tmp_path):
    # A text prompt looks for tokenizer.json first; the missing folder is still what gets named.
    assert main(["generate", "--prompt", "hi", "--model", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err == f"moepic: error: {tmp_path / 'nowhere'}: model folder not found\n"


def test_folder_without_config_json_is_named(checkpoint_dir, capsys, tmp_path):
    folder = _copy(checkpoint_dir, tmp_path)
    (folder / "config.json").unlink()
    assert _error(capsys, folder).startswith(f"{folder / 'config.json'}: missing")


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe{}"], ids=["syntax", "not-utf8"])
def test_config_json_that_is_not_json_is_named(checkpoint_dir, capsys, tmp_path, content):
    folder = _copy(checkpoint_dir, tmp_path)
    (folder / "config.json").write_bytes(content)
    assert _error(capsys, folder).startswith(f"{folder / 'config.json'}: not valid JSON (")


@pytest.mark.parametrize(
    "content,expected",
    [("{broken", "not valid JSON ("), ('{"eos_token_id": "x"}', "key 'eos_token_id' should be a token id")],
)
def test_broken_generation_config_json_is_named(checkpoint_dir, capsys, tmp_path, content, expected):
    folder = _copy(checkpoint_dir, tmp_path)
    (folder / "generation_config.json").write_text(content)
    assert _error(capsys, folder).startswith(f"{folder / 'generation_config.json'}: {expected}")


def test_config_json_that_is_a_list_is_named(checkpoint_dir, capsys, tmp_path):
    folder = _copy(checkpoint_dir, tmp_path)
    (folder / "config.json").write_text("[1, 2]")
    assert _error(capsys, folder) == f"{folder / 'config.json'}: expected a JSON object at the top level"


def test_unknown_model_type_lists_the_supported_ones(checkpoint_dir, capsys, tmp_path):
    folder = _copy(checkpoint_dir, tmp_path)
    _edit_config(folder, model_type="llama")
    assert _error(capsys, folder) == (
        f"{folder / 'config.json'}: unsupported model_type 'llama'; supported: deepseek_v2, deepseek_v3, dots1, ernie4_5_moe, flex_olmo, glm4_moe, gpt_oss, granitemoe, granitemoeshared, hunyuan_v1_moe, llama4, llama4_text, minimax_m2, mixtral, olmoe, phimoe, qwen2_moe, qwen3_moe"
    )


@pytest.mark.parametrize("model_type,why", [
    ("qwen3_next", "its linear-attention (Gated DeltaNet) layers are not supported"),
    ("jamba", "its Mamba (state-space) layers are not supported"),
    ("lfm2_moe", "its short-convolution layers are not supported"),
])
def test_a_known_family_moepic_does_not_run_says_why(checkpoint_dir, capsys, tmp_path, model_type, why):
    folder = _copy(checkpoint_dir, tmp_path)
    _edit_config(folder, model_type=model_type)
    assert _error(capsys, folder).startswith(f"{folder / 'config.json'}: unsupported model_type {model_type!r}: {why}; supported: ")


def test_missing_config_key_is_named(checkpoint_dir, capsys, tmp_path):
    folder = _copy(checkpoint_dir, tmp_path)
    _edit_config(folder, num_experts_per_tok=_DELETE)
    assert _error(capsys, folder) == f"{folder / 'config.json'}: missing key 'num_experts_per_tok'"


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [("num_experts_per_tok", "two", "int"), ("rms_norm_eps", "small", "float"), ("tie_word_embeddings", "no", "bool")],
)
def test_wrong_typed_config_key_names_key_type_and_value(checkpoint_dir, capsys, tmp_path, key, value, expected):
    folder = _copy(checkpoint_dir, tmp_path)
    _edit_config(folder, **{key: value})
    assert _error(capsys, folder) == f"{folder / 'config.json'}: key {key!r} should be {expected}, got {value!r}"


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"num_experts_per_tok": 9}, "top_k (9) > num_experts (4)"),
        ({"num_local_experts": 0}, "key 'num_local_experts' must be in [1, 2147483647], got 0"),
        ({"intermediate_size": 0}, "key 'intermediate_size' must be in [1, 2147483647], got 0"),
        ({"num_attention_heads": 0}, "key 'num_attention_heads' must be in [1, 2147483647], got 0"),
        ({"num_key_value_heads": 3}, "num_heads (4) must be a multiple of num_kv_heads (3)"),
        ({"sliding_window": 0}, "key 'sliding_window' must be in [1, 2147483647], got 0"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
        ({"dtype": "int8"}, "unsupported dtype 'int8'"),
    ],
)
def test_inconsistent_config_values_are_named(checkpoint_dir, capsys, tmp_path, changes, named):
    folder = _copy(checkpoint_dir, tmp_path)
    _edit_config(folder, **changes)
    message = _error(capsys, folder)
    assert message.startswith(f"{folder / 'config.json'}: ")
    assert named in message


def test_unknown_rope_type_is_named_with_the_supported_ones(checkpoint_dir, capsys, tmp_path):
    folder = _copy(checkpoint_dir, tmp_path)
    _edit_config(folder, rope_parameters={"rope_type": "weird", "rope_theta": 1e6})
    assert _error(capsys, folder) == (
        f"{folder / 'config.json'}: unsupported RoPE type rope_parameters.rope_type='weird'; "
        "moepic supports default, linear, llama3, yarn, longrope"
    )


@pytest.mark.parametrize("value", ["x", 5, [1.5]], ids=["string", "int", "float-list"])
def test_qwen_mlp_only_layers_that_is_not_a_list_of_ints_is_named(checkpoint_dir, capsys, tmp_path, value):
    folder = _copy(checkpoint_dir, tmp_path, "qwen2_moe")
    _edit_config(folder, mlp_only_layers=value)
    assert _error(capsys, folder) == (
        f"{folder / 'config.json'}: mlp_only_layers should be a list of layer indices, got {value!r}"
    )


# --- safetensors files -------------------------------------------------------------------------------


def test_missing_model_safetensors_is_named(checkpoint_dir, capsys, tmp_path):
    folder = _copy(checkpoint_dir, tmp_path)
    (folder / "model.safetensors").unlink()
    assert _error(capsys, folder) == (
        f"{folder}: no model.safetensors or model.safetensors.index.json (only safetensors checkpoints are read)"
    )


def _overwrite_header_length(data: bytes) -> bytes:
    return b"\xff" * 8 + data[8:]


def _garbage_json_header(data: bytes) -> bytes:
    length = int.from_bytes(data[:8], "little")
    return data[:8] + b"x" * length + data[8 + length :]


@pytest.mark.parametrize(
    ("corrupt", "reason"),
    [
        (_overwrite_header_length, "header too large"),
        (_garbage_json_header, "invalid JSON in header"),
        (lambda data: data[: len(data) // 2], "incomplete metadata"),
        (lambda data: data[:-4], "incomplete metadata"),
        (lambda data: b"", "header too small"),
    ],
    ids=["header-length", "header-json", "truncated-half", "truncated-4-bytes", "empty"],
)
def test_corrupt_safetensors_file_is_named(checkpoint_dir, capsys, tmp_path, corrupt, reason):
    folder = _copy(checkpoint_dir, tmp_path)
    path = folder / "model.safetensors"
    path.write_bytes(corrupt(path.read_bytes()))
    message = _error(capsys, folder)
    assert message.startswith(f"{path}: corrupt or unreadable safetensors file (")
    assert reason in message


def test_tensor_with_the_wrong_shape_names_tensor_and_both_shapes(checkpoint_dir, capsys, tmp_path):
    folder = _copy(checkpoint_dir, tmp_path)
    name = "model.layers.1.self_attn.q_proj.weight"
    _edit_tensors(folder / "model.safetensors", lambda t: t.__setitem__(name, torch.zeros(32, 31)))
    assert _error(capsys, folder) == (
        f"{folder / 'model.safetensors'}: tensor {name!r} has shape [32, 31], expected [32, 32]"
    )


def test_vocab_size_that_disagrees_with_the_embedding_names_the_embedding(checkpoint_dir, capsys, tmp_path):
    folder = _copy(checkpoint_dir, tmp_path)
    _edit_config(folder, vocab_size=97)
    assert _error(capsys, folder) == (
        f"{folder / 'model.safetensors'}: tensor 'model.embed_tokens.weight' has shape [96, 32], expected [97, 32]"
    )


def test_missing_tensor_is_named(checkpoint_dir, capsys, tmp_path):
    folder = _copy(checkpoint_dir, tmp_path)
    name = "model.layers.2.block_sparse_moe.experts.3.w2.weight"
    _edit_tensors(folder / "model.safetensors", lambda t: t.pop(name))
    assert _error(capsys, folder) == f"{folder}: missing tensor {name!r} (expected shape [32, 48])"


def test_unexpected_tensor_is_named(checkpoint_dir, capsys, tmp_path):
    folder = _copy(checkpoint_dir, tmp_path)
    _edit_tensors(folder / "model.safetensors", lambda t: t.__setitem__("model.layers.0.extra.weight", torch.zeros(3)))
    assert _error(capsys, folder) == (
        f"{folder / 'model.safetensors'}: unexpected tensor(s) 'model.layers.0.extra.weight' "
        "for a mixtral model with this config"
    )


def test_exporter_rotary_buffers_are_not_unexpected(checkpoint_dir, tmp_path):
    folder = _copy(checkpoint_dir, tmp_path)
    name = "model.layers.0.self_attn.rotary_emb.inv_freq"
    _edit_tensors(folder / "model.safetensors", lambda t: t.__setitem__(name, torch.ones(4)))
    assert load_model(folder).spec.num_layers == 3


def test_integer_tensor_is_named_with_its_dtype(checkpoint_dir, capsys, tmp_path):
    folder = _copy(checkpoint_dir, tmp_path)
    name = "model.embed_tokens.weight"
    _edit_tensors(folder / "model.safetensors", lambda t: t.__setitem__(name, t[name].to(torch.int32)))
    assert _error(capsys, folder) == (
        f"{folder / 'model.safetensors'}: tensor {name!r} has dtype torch.int32, expected a float type"
    )


# --- sharded checkpoints -----------------------------------------------------------------------------


def _shard_names(folder) -> list[str]:
    return sorted(p.name for p in folder.glob("model-*.safetensors"))


def test_index_naming_a_missing_shard_is_named(checkpoint_dir, capsys, tmp_path):
    folder = _copy(checkpoint_dir, tmp_path, "mixtral_sharded")
    shard = _shard_names(folder)[2]
    (folder / shard).unlink()
    assert _error(capsys, folder) == (
        f"{folder / 'model.safetensors.index.json'}: lists shard {shard!r}, which is missing from {folder}"
    )


def test_index_placing_a_tensor_in_the_wrong_shard_is_named(checkpoint_dir, capsys, tmp_path):
    folder = _copy(checkpoint_dir, tmp_path, "mixtral_sharded")
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name, shard = "lm_head.weight", index["weight_map"]["lm_head.weight"]
    elsewhere = next(s for s in _shard_names(folder) if s != shard)
    index["weight_map"][name] = elsewhere
    index_path.write_text(json.dumps(index))
    assert _error(capsys, folder) == (
        f"{folder / elsewhere}: the index lists tensor {name!r} here, but the file lacks it"
    )


@pytest.mark.parametrize(
    ("content", "named"),
    [
        ("{", "not valid JSON"),
        ("[1]", "expected a JSON object at the top level"),
        ('{"metadata": {}}', "no 'weight_map' object"),
        ('{"weight_map": [1]}', "'weight_map' must map tensor names to shard files"),
        ('{"weight_map": {"lm_head.weight": 3}}', "'weight_map' must map tensor names to shard files"),
    ],
)
def test_broken_index_file_is_named(checkpoint_dir, capsys, tmp_path, content, named):
    folder = _copy(checkpoint_dir, tmp_path, "mixtral_sharded")
    (folder / "model.safetensors.index.json").write_text(content)
    assert _error(capsys, folder).startswith(f"{folder / 'model.safetensors.index.json'}: {named}")


def test_load_model_raises_checkpoint_error_not_a_bare_exception(checkpoint_dir, tmp_path):
    # Library callers get the same typed error the CLI turns into a line.
    folder = _copy(checkpoint_dir, tmp_path)
    _edit_config(folder, num_experts_per_tok=9)
    with pytest.raises(CheckpointError, match=r"top_k \(9\) > num_experts \(4\)"):
        load_model(folder)


# --- GPT-OSS: its quantization and MXFP4 tensors ------------------------------------------------------
GATE_UP = "model.layers.1.mlp.experts.gate_up_proj"


@pytest.mark.parametrize("quantization,shown", [({"quant_method": "gptq", "bits": 4}, "'gptq'"), ({}, "None")])
def test_a_gpt_oss_quantization_other_than_mxfp4_is_named(checkpoint_dir, capsys, tmp_path, quantization, shown):
    folder = _copy(checkpoint_dir, tmp_path, "gpt_oss_mxfp4")
    _edit_config(folder, quantization_config=quantization)
    assert _error(capsys, folder) == (f"{folder / 'config.json'}: quantization_config.quant_method {shown} is not supported "
                                      "for gpt_oss; supported: 'mxfp4', 'moepic' (`moepic quantize` writes it) or an unquantized checkpoint")


def test_a_quantized_checkpoint_of_a_family_read_unquantized_only_is_named(checkpoint_dir, capsys, tmp_path):
    folder = _copy(checkpoint_dir, tmp_path)
    _edit_config(folder, quantization_config={"quant_method": "awq"})
    assert _error(capsys, folder) == (f"{folder / 'config.json'}: quantization_config.quant_method 'awq' is not supported "
                                      "for mixtral; supported: 'moepic' (`moepic quantize` writes it) or an unquantized checkpoint")


def test_a_gpt_oss_quantization_config_that_is_not_an_object_is_named(checkpoint_dir, capsys, tmp_path):
    folder = _copy(checkpoint_dir, tmp_path, "gpt_oss_mxfp4")
    _edit_config(folder, quantization_config="mxfp4")
    assert _error(capsys, folder) == f"{folder / 'config.json'}: quantization_config should be an object, got 'mxfp4'"


def test_the_unbroken_mxfp4_copy_loads(checkpoint_dir, tmp_path):
    folder = _copy(checkpoint_dir, tmp_path, "gpt_oss_mxfp4")
    assert main([*ARGS, "--model", str(folder)]) == 0


def test_a_missing_mxfp4_scales_tensor_is_named_with_its_shape(checkpoint_dir, capsys, tmp_path):
    folder = _copy(checkpoint_dir, tmp_path, "gpt_oss_mxfp4")
    _edit_tensors(folder / "model.safetensors", lambda t: t.pop(f"{GATE_UP}_scales"))
    assert _error(capsys, folder) == f"{folder}: missing tensor '{GATE_UP}_scales' (expected shape [4, 128, 1])"


def test_mxfp4_blocks_of_the_wrong_shape_are_named_with_both_shapes(checkpoint_dir, capsys, tmp_path):
    folder = _copy(checkpoint_dir, tmp_path, "gpt_oss_mxfp4")
    _edit_tensors(folder / "model.safetensors", lambda t: t.update({f"{GATE_UP}_blocks": t[f"{GATE_UP}_blocks"][..., :8].contiguous()}))
    assert _error(capsys, folder) == (
        f"{folder / 'model.safetensors'}: tensor '{GATE_UP}_blocks' has shape [4, 128, 1, 8], expected [4, 128, 1, 16]"
    )


def test_mxfp4_blocks_stored_as_floats_are_named_with_the_dtype(checkpoint_dir, capsys, tmp_path):
    folder = _copy(checkpoint_dir, tmp_path, "gpt_oss_mxfp4")
    _edit_tensors(folder / "model.safetensors", lambda t: t.update({f"{GATE_UP}_blocks": t[f"{GATE_UP}_blocks"].float()}))
    assert _error(capsys, folder) == (
        f"{folder / 'model.safetensors'}: tensor '{GATE_UP}_blocks' has dtype torch.float32, expected torch.uint8"
    )
