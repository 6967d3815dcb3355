"""Published config.json values of real MoE checkpoints, as their model folders ship them. Data.

The simulator's presets for these families are read from them by the same adapters that read a
checkpoint (moepic/checkpoint/adapters), so a preset is exactly the model moepic would load, MLA and
routers included; `moepic inspect` on a folder holding one of them reproduces the published total
parameter count (tests/core/test_footprint.py). Counts as published: DeepSeek-V2-Lite 15.7 B,
DeepSeek-V3 671 B (its multi-token-prediction layer, `num_nextn_predict_layers`, is not part of the
count, and HF transformers does not load it), GLM-4.5-Air 106 B, GPT-OSS-20B 20.91 B and GPT-OSS-120B
116.83 B (OpenAI's model card; the experts ship as MXFP4, the counts are of parameters, not bytes),
Phi-3.5-MoE 41.9 B, Llama-4-Scout 109 B (its text model, which is what moepic runs and counts,
is 107.77 B; the rest is the vision tower, whose `vision_config` the preset leaves out).
"""

from __future__ import annotations

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

GLM_45_AIR = {
    "model_type": "glm4_moe", "attention_bias": True, "first_k_dense_replace": 1, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 4096, "intermediate_size": 10944, "max_position_embeddings": 131072, "moe_intermediate_size": 1408,
    "n_group": 1, "n_routed_experts": 128, "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 96,
    "num_experts_per_tok": 8, "num_hidden_layers": 46, "num_key_value_heads": 8, "num_nextn_predict_layers": 1,
    "partial_rotary_factor": 0.5, "rms_norm_eps": 1e-05, "rope_theta": 1000000, "routed_scaling_factor": 1.0,
    "tie_word_embeddings": False, "topk_group": 1, "torch_dtype": "bfloat16", "use_qk_norm": False,
    "vocab_size": 151552, "bos_token_id": None, "eos_token_id": [151329, 151336, 151338],
}  # fmt: skip

GPT_OSS_20B = {
    "model_type": "gpt_oss", "attention_bias": True, "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64,
    "hidden_act": "silu", "hidden_size": 2880, "initial_context_length": 4096, "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 12, "max_position_embeddings": 131072,
    "num_attention_heads": 64, "num_experts_per_tok": 4, "num_hidden_layers": 24, "num_key_value_heads": 8,
    "num_local_experts": 32, "pad_token_id": 199999, "rms_norm_eps": 1e-05, "rope_theta": 150000,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                     "rope_type": "yarn", "truncate": False},
    "sliding_window": 128, "swiglu_limit": 7.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "vocab_size": 201088,
    "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]},
}  # fmt: skip

# GPT-OSS-120B: the 20B's config with 36 layers and 128 experts a layer.
GPT_OSS_120B = GPT_OSS_20B | {"num_hidden_layers": 36, "num_local_experts": 128,
                              "layer_types": ["sliding_attention", "full_attention"] * 18}

PHI_35_MOE = {
    "model_type": "phimoe", "attention_bias": True, "bos_token_id": 1, "eos_token_id": 32000, "hidden_act": "silu",
    "hidden_size": 4096, "input_jitter_noise": 0.01, "intermediate_size": 6400, "lm_head_bias": True,
    "max_position_embeddings": 131072, "num_attention_heads": 32, "num_experts_per_tok": 2, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "num_local_experts": 16, "original_max_position_embeddings": 4096, "rms_norm_eps": 1e-05,
    # The published long_factor / short_factor lists hold 64 measured values each; they change no size
    # or cost, so the preset keeps their length with 1.0 in place of each value.
    "rope_scaling": {"type": "longrope", "long_factor": [1.0] * 64, "short_factor": [1.0] * 64,
                     "long_mscale": 1.243163121016122, "short_mscale": 1.243163121016122,
                     "original_max_position_embeddings": 4096},
    "rope_theta": 10000.0, "router_jitter_noise": 0.01, "sliding_window": 131072, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "vocab_size": 32064,
}  # fmt: skip

LLAMA_4_SCOUT = {
    "model_type": "llama4", "torch_dtype": "bfloat16", "text_config": {
        "model_type": "llama4_text", "attention_bias": False, "attention_chunk_size": 8192, "attn_scale": 0.1,
        "attn_temperature_tuning": 4, "bos_token_id": 200000, "eos_token_id": [200001, 200007, 200008],
        "floor_scale": 8192, "head_dim": 128, "hidden_act": "silu", "hidden_size": 5120, "interleave_moe_layer_step": 1,
        "intermediate_size": 8192, "intermediate_size_mlp": 16384, "max_position_embeddings": 10485760,
        "no_rope_layers": [], "num_attention_heads": 40, "num_experts_per_tok": 1, "num_hidden_layers": 48,
        "num_key_value_heads": 8, "num_local_experts": 16, "pad_token_id": 200018, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 16.0, "high_freq_factor": 1.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "torch_dtype": "bfloat16", "use_qk_norm": True, "vocab_size": 202048,
    },
}  # fmt: skip

# preset name → (config.json values, total parameters as published)
PUBLISHED_CONFIGS = {
    "deepseek-v2-lite": (DEEPSEEK_V2_LITE, 15.7e9),
    "deepseek-v3": (DEEPSEEK_V3, 671e9),
    "glm-4.5-air": (GLM_45_AIR, 106e9),
    "gpt-oss-20b": (GPT_OSS_20B, 20.91e9),
    "gpt-oss-120b": (GPT_OSS_120B, 116.83e9),
    "phi-3.5-moe": (PHI_35_MOE, 41.9e9),
    "llama-4-scout": (LLAMA_4_SCOUT, 109e9),
}
