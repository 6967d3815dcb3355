"""Spec-derived parameter counts equal the tensors the loader actually builds."""

from __future__ import annotations

import pytest
import torch

from conftest import CHECKPOINTS
from moepic.checkpoint.load import load_model
from moepic.core.footprint import footprint
from moepic.core.weights import MoEWeights


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
    model = load_model(checkpoint_dir(name), dtype=torch.float32)
    w, fp = model.weights, footprint(model.spec)
    routed = [e for layer in w.layers if isinstance(layer.ffn, MoEWeights) for e in layer.ffn.experts]
    assert fp.num_routed_experts == len(routed)
    assert {_numel(e) for e in routed} == {fp.routed_expert_params}
    tied = w.lm_head_VD is w.embed_VD
    assert fp.total_params == _numel(w) - (w.embed_VD.numel() if tied else 0)
    assert fp.routed_expert_bytes(4) == 4 * sum(_numel(e) for e in routed)


# Published configs and parameter counts of two real checkpoints (config.json only: no weights needed).
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

# DeepSeek publishes 15.7 B parameters for V2-Lite and 671 B for V3 (its multi-token-prediction
# module, `num_nextn_predict_layers`, is not part of that count, and HF does not load it either).
DEEPSEEK_V2_LITE = {
    "model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
    "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16,
    "n_shared_experts": 2, "n_routed_experts": 64, "routed_scaling_factor": 1.0, "kv_lora_rank": 512,
    "q_lora_rank": None, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "greedy",
    "n_group": 1, "topk_group": 1, "num_experts_per_tok": 6, "moe_layer_freq": 1, "first_k_dense_replace": 1,
    "norm_topk_prob": False, "scoring_func": "softmax", "max_position_embeddings": 163840, "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rms_norm_eps": 1e-06, "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False,
    "torch_dtype": "bfloat16", "bos_token_id": 100000, "eos_token_id": 100001,
}  # fmt: skip
DEEPSEEK_V3 = {
    "model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_nextn_predict_layers": 1, "num_attention_heads": 128,
    "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256, "routed_scaling_factor": 2.5,
    "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
    "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8, "moe_layer_freq": 1,
    "first_k_dense_replace": 3, "norm_topk_prob": True, "scoring_func": "sigmoid", "max_position_embeddings": 163840,
    "rope_theta": 10000, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                                          "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"},
    "rms_norm_eps": 1e-06, "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False,
    "torch_dtype": "bfloat16", "bos_token_id": 0, "eos_token_id": 1,
}  # fmt: skip


@pytest.mark.parametrize(
    "config,total,bytes_per_expert",
    [(MIXTRAL_8X7B, 46_702_792_704, 352_321_536), (QWEN15_MOE_A27B, 14_315_784_192, 17_301_504),
     (DEEPSEEK_V2_LITE, 15_706_484_224, 17_301_504), (DEEPSEEK_V3, 671_026_419_200, 88_080_384)],
    ids=["Mixtral-8x7B", "Qwen1.5-MoE-A2.7B", "DeepSeek-V2-Lite", "DeepSeek-V3"],
)
def test_inspect_reproduces_published_sizes_from_config_json_alone(capsys, tmp_path, config, total, bytes_per_expert):
    import json

    from moepic.cli import main

    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["inspect", "--model", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["total_params"] == total
    assert report["bytes_per_expert"] == bytes_per_expert  # bf16, the checkpoint's dtype
    assert main(["inspect", "--model", str(tmp_path)]) == 0
    assert "offloadable" in capsys.readouterr().out
