"""Shared fixtures: tiny random Hugging Face checkpoints saved with `save_pretrained`, and the hypothesis profile.

Before anything else is imported, every folder a library or moepic might read or write outside the
tests' own temporary folders (home, caches, config dirs) is pointed into one session folder, so a
leftover from an earlier run on this machine can never make a test pass that fails on a fresh one.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

_SESSION_HOME = tempfile.mkdtemp(prefix="moepic-tests-home-")
atexit.register(shutil.rmtree, _SESSION_HOME, ignore_errors=True)
os.environ["HOME"] = _SESSION_HOME
for _variable, _folder in {
    "MOEPIC_CACHE_DIR": "moepic-cache",
    "XDG_CACHE_HOME": ".cache",
    "XDG_CONFIG_HOME": ".config",
    "XDG_DATA_HOME": ".local/share",
    "HF_HOME": "huggingface",
    "MPLCONFIGDIR": "matplotlib",
    "WANDB_DIR": "wandb",
    "WANDB_CACHE_DIR": "wandb-cache",
    "WANDB_CONFIG_DIR": "wandb-config",
    "WANDB_DATA_DIR": "wandb-data",
    "RAY_TMPDIR": "ray",  # short enough for Ray's socket paths (< 108 bytes)
}.items():
    os.environ[_variable] = os.path.join(_SESSION_HOME, _folder)
    os.makedirs(os.environ[_variable], exist_ok=True)

import pytest  # noqa: E402 (after the environment above, on purpose)
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402
from hypothesis.database import DirectoryBasedExampleDatabase  # noqa: E402

# The example database lives in the session folder too, not in the checkout's .hypothesis/.
_examples = DirectoryBasedExampleDatabase(os.path.join(_SESSION_HOME, "hypothesis"))
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=30, print_blob=True, database=None)
settings.register_profile("dev", deadline=None, max_examples=60, database=_examples)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(min(2, torch.get_num_threads()))


def _common(**overrides):
    base = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.1,  # larger than HF's default so routing and logits are far from uniform
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return base | overrides


_MLA = dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, moe_intermediate_size=16, q_lora_rank=None)
_DEEPSEEK_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
                  "mscale": 0.707, "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1}
# GPT-OSS's YaRN (not truncated), scaled down to the tiny models' context.
# Tiny GPT-OSS: 4 experts, top-2, window 4 (its variants differ in SwiGLU limit, rope, experts' format).
_GPT_OSS_TINY = dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64, head_dim=8, sliding_window=4)
_GPT_OSS_YARN = {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "original_max_position_embeddings": 64,
                 "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False}

# name → (config class name, model class name, config kwargs, save kwargs)
CHECKPOINTS = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", _common(num_local_experts=4, num_experts_per_tok=2), {}),
    # Deeper and wider: a predictor several layers ahead names enough different experts to fill staging.
    "mixtral_deep": (
        "MixtralConfig", "MixtralForCausalLM", _common(num_local_experts=16, num_experts_per_tok=2, num_hidden_layers=6), {},
    ),
    "mixtral_sharded": (
        "MixtralConfig",
        "MixtralForCausalLM",
        _common(num_local_experts=4, num_experts_per_tok=2, num_key_value_heads=1),
        {"max_shard_size": "40KB"},
    ),
    "mixtral_bf16": ("MixtralConfig", "MixtralForCausalLM", _common(num_local_experts=4, num_experts_per_tok=2), {"bf16": True}),
    "mixtral_window": (
        "MixtralConfig",
        "MixtralForCausalLM",
        _common(num_local_experts=4, num_experts_per_tok=2, sliding_window=4),
        {},
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        _common(
            num_experts=6,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            decoder_sparse_step=1,
            mlp_only_layers=[1],
            norm_topk_prob=False,
        ),
        {},
    ),
    "qwen2_moe_step2_norm": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        _common(
            num_experts=6,
            num_experts_per_tok=3,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            decoder_sparse_step=2,
            norm_topk_prob=True,
            num_hidden_layers=4,
        ),
        {},
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        _common(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=16, norm_topk_prob=True),
        {},
    ),
    # Wide enough for GGUF's k-quant blocks (256 weights along each row, down's along the FFN).
    "qwen3_moe_256": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        _common(num_experts=4, num_experts_per_tok=2, hidden_size=256, moe_intermediate_size=256, head_dim=32,
                num_hidden_layers=2, norm_topk_prob=True),
        {},
    ),
    "qwen3_moe_yarn_tied": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        _common(
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            head_dim=8,
            norm_topk_prob=False,
            tie_word_embeddings=True,
            mlp_only_layers=[0],
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
        {},
    ),
    "olmoe_linear_rope": (
        "OlmoeConfig",
        "OlmoeForCausalLM",
        _common(
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0},
        ),
        {},
    ),
    "olmoe": (
        "OlmoeConfig",
        "OlmoeForCausalLM",
        _common(num_experts=8, num_experts_per_tok=3, norm_topk_prob=False, clip_qkv=0.5),
        {},
    ),
    # DeepSeek: latent attention (direct or low-rank queries), dense first layers, shared experts,
    # their three routers, interleaved or half-rotated rope, YaRN with its softmax mscale.
    "deepseek_v2_lite": (
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        _common(**_MLA | dict(n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=2, first_k_dense_replace=1,
                topk_method="greedy", num_key_value_heads=4)),
        {},
    ),
    "deepseek_v2_grouped_yarn": (
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        _common(**_MLA | dict(n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1, first_k_dense_replace=0,
                topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=2.0, q_lora_rank=12,
                num_key_value_heads=4, rope_parameters=_DEEPSEEK_YARN)),
        {},
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        _common(**_MLA | dict(n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5, q_lora_rank=12,
                num_key_value_heads=4)),
        {"random_buffers": "e_score_correction_bias"},
    ),
    "deepseek_v3_halves_yarn": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        _common(**_MLA | dict(n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1, first_k_dense_replace=0,
                n_group=4, topk_group=3, norm_topk_prob=False, routed_scaling_factor=1.5, rope_interleave=False,
                num_key_value_heads=4, rope_parameters=_DEEPSEEK_YARN)),
        {"random_buffers": "e_score_correction_bias"},
    ),
    # GLM-4.5: DeepSeek-V3's MoE under grouped-query attention with biases, half-rotated heads, q/k norm.
    "glm4_moe": (
        "Glm4MoeConfig",
        "Glm4MoeForCausalLM",
        _common(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
                first_k_dense_replace=1, n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.5,
                attention_bias=True, use_qk_norm=True, head_dim=16),
        {"random_buffers": "e_score_correction_bias"},
    ),
    # dots.llm1: Qwen3-MoE's attention with DeepSeek-V3's MoE.
    "dots1": (
        "Dots1Config",
        "Dots1ForCausalLM",
        _common(n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=16, n_shared_experts=2,
                first_k_dense_replace=1, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.0,
                head_dim=16),
        {"random_buffers": "e_score_correction_bias"},
    ),
    # dots.llm1 with its sliding-window layers (every other one, a window shorter than the prompt).
    "dots1_windows": (
        "Dots1Config",
        "Dots1ForCausalLM",
        _common(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
                first_k_dense_replace=0, n_group=1, topk_group=1, head_dim=16, num_hidden_layers=4, sliding_window=4,
                layer_types=["full_attention", "sliding_attention", "full_attention", "sliding_attention"]),
        {"random_buffers": "e_score_correction_bias"},
    ),
    "glm4_moe_grouped_full_head_norm_off": (
        "Glm4MoeConfig",
        "Glm4MoeForCausalLM",
        _common(n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=16, n_shared_experts=2,
                first_k_dense_replace=0, n_group=4, topk_group=2, norm_topk_prob=False, routed_scaling_factor=1.0,
                attention_bias=False, use_qk_norm=False, head_dim=8, partial_rotary_factor=1.0),
        {"random_buffers": "e_score_correction_bias"},
    ),
    # MiniMax-M2: a biased sigmoid router without groups, full-width q/k norm, half-rotated heads
    # (given as the released checkpoints give it, `rotary_dim`).
    "minimax_m2": (
        "MiniMaxM2Config",
        "MiniMaxM2ForCausalLM",
        _common(num_local_experts=8, num_experts_per_tok=2, intermediate_size=16, head_dim=16, rotary_dim=8),
        {"random_buffers": "e_score_correction_bias"},
    ),
    "minimax_m2_full_rotary": (
        "MiniMaxM2Config",
        "MiniMaxM2ForCausalLM",
        _common(num_local_experts=6, num_experts_per_tok=3, intermediate_size=16, head_dim=8, num_hidden_layers=4),
        {"random_buffers": "e_score_correction_bias"},
    ),
    # ERNIE-4.5: a biased softmax router, dense layers outside [start, end], interleaved rotary pairs.
    "ernie4_5_moe": (
        "Ernie4_5_MoeConfig",
        "Ernie4_5_MoeForCausalLM",
        _common(moe_num_experts=8, moe_k=3, moe_intermediate_size=16, moe_num_shared_experts=1, moe_layer_start_index=1,
                moe_layer_end_index=-1, moe_layer_interval=1, tie_word_embeddings=True),
        {"random_buffers": "e_score_correction_bias"},
    ),
    "ernie4_5_moe_every_other_layer": (
        "Ernie4_5_MoeConfig",
        "Ernie4_5_MoeForCausalLM",
        _common(moe_num_experts=6, moe_k=2, moe_intermediate_size=16, moe_num_shared_experts=0, moe_layer_start_index=0,
                moe_layer_end_index=-1, moe_layer_interval=2, num_hidden_layers=4),
        {"random_buffers": "e_score_correction_bias"},
    ),
    # Granite-MoE: experts fused on disk, and its four scalings.
    "granitemoe": (
        "GraniteMoeConfig",
        "GraniteMoeForCausalLM",
        _common(num_local_experts=4, num_experts_per_tok=2, intermediate_size=16, embedding_multiplier=3.0,
                residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=4.0, tie_word_embeddings=True),
        {},
    ),
    "granitemoe_top1_untied": (
        "GraniteMoeConfig",
        "GraniteMoeForCausalLM",
        _common(num_local_experts=6, num_experts_per_tok=1, intermediate_size=32, embedding_multiplier=12.0,
                residual_multiplier=0.22, attention_multiplier=0.015625, logits_scaling=6.0),
        {},
    ),
    "granitemoeshared_tied": (
        "GraniteMoeSharedConfig",
        "GraniteMoeSharedForCausalLM",
        _common(num_local_experts=4, num_experts_per_tok=2, intermediate_size=16, shared_intermediate_size=32,
                embedding_multiplier=1.5, residual_multiplier=1.2, attention_multiplier=0.3, logits_scaling=0.5,
                tie_word_embeddings=True),
        {},
    ),
    "granitemoeshared": (
        "GraniteMoeSharedConfig",
        "GraniteMoeSharedForCausalLM",
        _common(num_local_experts=6, num_experts_per_tok=2, intermediate_size=16, shared_intermediate_size=24,
                embedding_multiplier=2.0, residual_multiplier=0.7, attention_multiplier=0.1, logits_scaling=2.0),
        {},
    ),
    # GPT-OSS: attention sinks, q/k/v/o biases, alternating window-4 / full layers, a router with a
    # logit bias, biased experts fused on disk with the clamped SwiGLU (a low limit: the clamps bite).
    "gpt_oss": (
        "GptOssConfig",
        "GptOssForCausalLM",
        _common(**_GPT_OSS_TINY, swiglu_limit=0.6, rope_parameters=_GPT_OSS_YARN),
        {"random_buffers": ("sinks", "bias")},
    ),
    "gpt_oss_rope_default": (
        "GptOssConfig",
        "GptOssForCausalLM",
        _common(num_local_experts=6, num_experts_per_tok=3, intermediate_size=64, head_dim=16, num_key_value_heads=1,
                sliding_window=3, num_hidden_layers=4, swiglu_alpha=1.2, swiglu_limit=2.0,
                layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
                rope_parameters={"rope_type": "default", "rope_theta": 1000.0}),
        {"random_buffers": ("sinks", "bias")},
    ),
    # GPT-OSS as the released checkpoints ship experts: MXFP4 blocks and scales.
    "gpt_oss_mxfp4": (
        "GptOssConfig",
        "GptOssForCausalLM",
        _common(**_GPT_OSS_TINY, swiglu_limit=3.0, rope_parameters=_GPT_OSS_YARN),
        {"random_buffers": ("sinks", "bias"), "mxfp4": True},
    ),
    # GPT-OSS as llama.cpp runs it (what a GGUF file can say): its released alpha and limit, even
    # layers sliding; YaRN (MXFP4) with its correction range rounded, as llama.cpp always rounds it.
    "gpt_oss_llamacpp": (
        "GptOssConfig",
        "GptOssForCausalLM",
        _common(**_GPT_OSS_TINY, rope_parameters={"rope_type": "default", "rope_theta": 150000.0}),
        {"random_buffers": ("sinks", "bias")},
    ),
    "gpt_oss_llamacpp_mxfp4": (
        "GptOssConfig",
        "GptOssForCausalLM",
        _common(**_GPT_OSS_TINY, rope_parameters=_GPT_OSS_YARN | {"truncate": True}),
        {"random_buffers": ("sinks", "bias"), "mxfp4": True},
    ),
    # PhiMoE: LayerNorm with biases, q/k/v/o and lm_head biases, SparseMixer routing, LongRoPE whose
    # pretraining length (16) the test's decode crosses, so the long mscale takes over mid-run.
    "phimoe": (
        "PhimoeConfig",
        "PhimoeForCausalLM",
        _common(num_local_experts=4, num_experts_per_tok=2, attention_bias=True, lm_head_bias=True,
                rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0, 1.2, 1.5, 2.0],
                                 "long_factor": [2.0, 3.0, 4.0, 6.0], "short_mscale": 1.1, "long_mscale": 1.3,
                                 "original_max_position_embeddings": 16}),
        {"random_buffers": ("bias",)},
    ),
    "phimoe_default_rope": (
        "PhimoeConfig",
        "PhimoeForCausalLM",
        _common(num_local_experts=6, num_experts_per_tok=2, router_jitter_noise=0.1, head_dim=16,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
        {"random_buffers": ("layernorm.bias", "norm.bias")},
    ),
    # Llama-4: MoE every other layer, a NoPE layer every other layer (with the attention temperature,
    # whose floor scale 4 makes it change within the test's positions), chunks of 4 on rotating
    # layers, the weightless q/k norm, a top-1 router scaling the expert's input, a shared expert.
    "llama4_text": (
        "Llama4TextConfig",
        "Llama4ForCausalLM",
        _common(num_local_experts=4, intermediate_size=48, intermediate_size_mlp=64, head_dim=8, num_hidden_layers=4,
                interleave_moe_layer_step=2, no_rope_layer_interval=2, attention_chunk_size=4, floor_scale=4),
        {},
    ),
    "llama4_text_llama3_rope": (
        "Llama4TextConfig",
        "Llama4ForCausalLM",
        _common(num_local_experts=6, intermediate_size=16, intermediate_size_mlp=48, head_dim=8, moe_layers=[0, 2],
                no_rope_layers=[1, 1, 0], attention_chunk_size=None, use_qk_norm=False, attn_temperature_tuning=False,
                attention_bias=True, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
        {"random_buffers": ("bias",)},
    ),
    # Llama-4 as Scout and Maverick ship: a multimodal checkpoint whose text model moepic runs.
    "llama4": (
        "Llama4Config",
        "Llama4ForConditionalGeneration",
        dict(text_config=_common(num_local_experts=4, intermediate_size=16, intermediate_size_mlp=32, head_dim=8,
                                 attention_chunk_size=4, floor_scale=4),
             vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=32, patch_size=16, vision_output_dim=32, projector_input_dim=32,
                                projector_output_dim=32)),
        {},
    ),
    # Hunyuan-MoE: q/k norm after the rotation, q/k/v/o biases, a float32 router, a shared MLP,
    # NTK-alpha RoPE (HF's "dynamic" with a fixed alpha).
    "hunyuan_v1_moe": (
        "HunYuanMoEV1Config",
        "HunYuanMoEV1ForCausalLM",
        _common(num_experts=4, moe_topk=2, head_dim=8, attention_bias=True,
                rope_parameters={"rope_type": "dynamic", "alpha": 1000.0, "factor": 1.0, "rope_theta": 10000.0}),
        {"random_buffers": ("bias", "layernorm.weight")},
    ),
    "hunyuan_v1_moe_linear_rope": (
        "HunYuanMoEV1Config",
        "HunYuanMoEV1ForCausalLM",
        _common(num_experts=6, moe_topk=3, head_dim=16, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                          "rope_theta": 10000.0}),
        {"random_buffers": ("layernorm.weight",)},
    ),
    # FlexOlmo: OLMoE with its norms after each sublayer (the router reads the raw residual).
    "flex_olmo": (
        "FlexOlmoConfig",
        "FlexOlmoForCausalLM",
        _common(num_experts=4, num_experts_per_tok=2, norm_topk_prob=True),
        {"random_buffers": ("layernorm.weight",)},
    ),
    "flex_olmo_unnormalised": (
        "FlexOlmoConfig",
        "FlexOlmoForCausalLM",
        _common(num_experts=8, num_experts_per_tok=3, norm_topk_prob=False, num_hidden_layers=4),
        {},
    ),
}


def save_tiny_checkpoint(name: str, folder) -> None:
    import transformers

    config_cls, model_cls, config_kwargs, save = CHECKPOINTS[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**config_kwargs)
    model = getattr(transformers, model_cls)(config).eval()
    # A router's selection bias, which HF starts at zero (testing nothing): a buffer or a parameter.
    # GPT-OSS's biases and sinks too (HF starts its expert biases at zero).
    for name, tensor in (*model.named_buffers(), *model.named_parameters()):
        if save.get("random_buffers") and name.endswith(save["random_buffers"]):
            with torch.no_grad():
                tensor.normal_(0.0, 0.1)
    if save.get("bf16"):
        model = model.to(torch.bfloat16)
    kwargs = {"max_shard_size": save["max_shard_size"]} if "max_shard_size" in save else {}
    model.save_pretrained(folder, **kwargs)
    if save.get("mxfp4"):
        write_mxfp4_experts(folder)


def write_mxfp4_experts(folder) -> None:
    """Replace a saved GPT-OSS checkpoint's expert matrices by random MXFP4 blocks and scales, laid
    out as the released checkpoints lay them out, and say so in config.json."""
    import json

    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors, g = load_file(path), torch.Generator().manual_seed(0)
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        E, inner, outer = tensors.pop(name).shape  # HF's [E, in, out]; MXFP4 rows are out, blocks run along in
        tensors[f"{name}_blocks"] = torch.randint(0, 256, (E, outer, inner // 32, 16), dtype=torch.uint8, generator=g)
        tensors[f"{name}_scales"] = torch.randint(119, 125, (E, outer, inner // 32), dtype=torch.uint8, generator=g)
    save_file(tensors, path, metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                     "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (folder / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory):
    """checkpoint_dir(name) → a folder holding that tiny checkpoint, built once per session."""
    built = {}

    def get(name: str):
        if name not in built:
            folder = tmp_path_factory.mktemp(name)
            save_tiny_checkpoint(name, folder)
            built[name] = folder
        return built[name]

    return get
