"""Spec-derived parameter counts equal the tensors the loader actually builds."""

from __future__ import annotations

import pytest
import torch

from conftest import CHECKPOINTS
from moepic.checkpoint.load import load_model
from moepic.core.footprint import footprint
from moepic.core.weights import MoEWeights
from moepic.quant import build_format
from moepic.sim.published import DEEPSEEK_V2_LITE, DEEPSEEK_V3, GLM_45_AIR, GPT_OSS_20B, GPT_OSS_120B, LLAMA_4_SCOUT, PHI_35_MOE


def _numel(tree) -> int:
    import attrs

    if isinstance(tree, torch.Tensor):
        return tree.numel()
    if isinstance(tree, (tuple, list)):
        return sum(_numel(t) for t in tree)
    if attrs.has(type(tree)):
        return sum(_numel(getattr(tree, f.name)) for f in attrs.fields(type(tree)))
    return 0


@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_footprint_counts_every_loaded_parameter_once(checkpoint_dir, name):
    # dense: a checkpoint's own format (GPT-OSS's MXFP4) dequantised, so each weight is one number
    model = load_model(checkpoint_dir(name), dtype=torch.float32, expert_format=build_format("dense"))
    w, fp = model.weights, footprint(model.spec)
    routed = [e for layer in w.layers if isinstance(layer.ffn, MoEWeights) for e in layer.ffn.experts]
    assert fp.num_routed_experts == len(routed)
    assert {_numel(e) for e in routed} == {fp.routed_expert_params}
    tied = w.lm_head_VD is w.embed_VD
    assert fp.total_params == _numel(w) - (w.embed_VD.numel() if tied else 0)
    assert fp.routed_expert_bytes(4) == 4 * sum(_numel(e) for e in routed)


# Published configs and parameter counts of real checkpoints (config.json only: no weights needed; the
# DeepSeek and GLM configs are moepic/sim/published.py's, which the simulator's presets are read from).
MIXTRAL_8X7B = {
    "model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8,
    "num_experts_per_tok": 2, "rope_theta": 1e6, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}  # fmt: skip
QWEN15_MOE_A27B = {
    "model_type": "qwen2_moe", "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 5632,
    "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632, "num_hidden_layers": 24,
    "num_attention_heads": 16, "num_key_value_heads": 16, "num_experts": 60, "num_experts_per_tok": 4,
    "rope_theta": 1e6, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}  # fmt: skip


@pytest.mark.parametrize(
    "config,total,bytes_per_expert",
    [(MIXTRAL_8X7B, 46_702_792_704, 352_321_536), (QWEN15_MOE_A27B, 14_315_784_192, 17_301_504),
     (DEEPSEEK_V2_LITE, 15_706_484_224, 17_301_504), (DEEPSEEK_V3, 671_026_419_200, 88_080_384),
     (GLM_45_AIR, 106_852_251_264, 34_603_008),
     # Published 20.91 B and 116.83 B; an expert: 3·D·F weights and 2·F gate/up biases (its down bias is resident).
     (GPT_OSS_20B, 20_914_757_184, 2 * 2880 * (3 * 2880 + 2)), (GPT_OSS_120B, 116_829_156_672, 2 * 2880 * (3 * 2880 + 2)),
     (PHI_35_MOE, 41_873_153_344, 157_286_400),  # published 41.9 B
     # Published 109 B with its vision tower; the text model, which moepic runs, is 107.77 B.
     (LLAMA_4_SCOUT, 107_769_861_120, 251_658_240)],
    ids=["Mixtral-8x7B", "Qwen1.5-MoE-A2.7B", "DeepSeek-V2-Lite", "DeepSeek-V3", "GLM-4.5-Air", "GPT-OSS-20B", "GPT-OSS-120B", "Phi-3.5-MoE",
         "Llama-4-Scout"],
)
def test_inspect_reproduces_published_sizes_from_config_json_alone(capsys, tmp_path, config, total, bytes_per_expert):
    import json

    from moepic.cli import main

    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["inspect", "--model", str(tmp_path), "--json", "--format", "dense"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["total_params"] == total
    assert report["bytes_per_expert"] == bytes_per_expert  # bf16, the checkpoint's dtype
    assert main(["inspect", "--model", str(tmp_path)]) == 0
    assert "offloadable" in capsys.readouterr().out



@pytest.mark.parametrize("config", [GPT_OSS_20B, GPT_OSS_120B], ids=["GPT-OSS-20B", "GPT-OSS-120B"])
def test_inspect_counts_a_releases_own_format_by_default(capsys, tmp_path, config):
    """GPT-OSS ships MXFP4 experts, which load compressed: 51·D/32 bytes a neuron and 2 bf16 biases."""
    import json

    from moepic.cli import main

    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["inspect", "--model", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["expert_format"] == {"name": "mxfp4"}
    assert report["bytes_per_expert"] == 2880 * (51 * 2880 // 32 + 2 * 2)


@pytest.mark.parametrize("preset,kv_bytes,bounded", [
    ("mixtral-8x7b", 2 * 8 * 128 * 32 * 2, 0), ("deepseek-v3", (512 + 64) * 61 * 2, 0),
    # GPT-OSS-120B: 18 full layers grow; 18 window-128 layers keep 128 positions each.
    ("gpt-oss-120b", 2 * 8 * 64 * 18 * 2, 2 * 8 * 64 * 18 * 128 * 2),
])
def test_inspect_prices_the_kv_cache_of_each_attention_kind(capsys, preset, kv_bytes, bounded):
    """Grouped-query attention caches keys and values per KV head; latent attention its latent and
    one rotary key (DeepSeek-V3: 70,272 bytes a token in bf16, against Mixtral's 131,072); a
    windowed layer only its window."""
    import json

    from moepic.cli import main

    assert main(["inspect", "--model", preset, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["kv_cache_bytes_per_token"], report["kv_cache_bytes_bounded"]) == (kv_bytes, bounded)
    assert main(["inspect", "--model", preset]) == 0
    assert f"KV cache {kv_bytes / 1024:.1f} KiB per token" in capsys.readouterr().out


def test_the_kv_cache_at_a_context_counts_each_ring_up_to_its_span():
    from moepic.core.footprint import kv_cache_numbers, kv_cache_numbers_at
    from moepic.sim.shapes import model_shape

    spec = model_shape("gpt-oss-20b").spec  # 12 full layers, 12 window-128 layers
    per_layer = kv_cache_numbers(spec)
    assert kv_cache_numbers_at(spec, 100) == 24 * 100 * per_layer
    assert kv_cache_numbers_at(spec, 10_000) == (12 * 10_000 + 12 * 128) * per_layer
