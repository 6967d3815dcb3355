"""A GGUF file's metadata as the config.json the adapters read: llama.cpp's keys → Hugging Face's.
Side effects: reads the file's header.

Read: `qwen3moe` (Qwen3-MoE), `qwen2moe` (Qwen2-MoE, its shared expert), `olmoe` (OLMoE: q/k
norms over the full width, its clamp on q, k and v), `gpt-oss` (GPT-OSS: sinks, biases, sliding
layers, its MXFP4 experts kept as the `mxfp4` format) and `llama` with experts (Mixtral). Where
llama.cpp fixes a behaviour by architecture instead of a key (Qwen3-MoE renormalises its top-k
weights, Qwen2-MoE and OLMoE do not), the value here is llama.cpp's, since it is what the file was
made to run as.

Routed experts in Q8_0, Q4_K or Q6_K blocks load as the `gguf` expert format (quant/gguf_format.py)
of their kinds, which may vary by layer; the config says so as `quantization_config: {quant_method:
gguf, expert_formats: [{name: gguf, gate_up: Q4_K, down: Q6_K}, …]}` (one per MoE layer).
"""

from __future__ import annotations

from pathlib import Path

from moepic.checkpoint.gguf_file import GGUFFile
from moepic.checkpoint.hf_config import HFConfig
from moepic.errors import CheckpointError
from moepic.quant.ggml import BLOCKS

QUANT_METHOD = "gguf"
FLOAT_KINDS = ("F32", "F16", "BF16")

# GGUF architecture → (Hugging Face model_type, whether the top-k weights are renormalised).
ARCHITECTURES = {"qwen3moe": ("qwen3_moe", True), "qwen2moe": ("qwen2_moe", False), "olmoe": ("olmoe", False),
                 "gpt-oss": ("gpt_oss", True), "llama": ("mixtral", True)}


def gguf_config(path: Path) -> HFConfig:
    """The HF config a GGUF file stands for (its source names the file)."""
    with GGUFFile(path) as f:
        return HFConfig(config_dict(f), str(path))


def config_dict(f: GGUFFile) -> dict:
    arch = f.field("general.architecture", str)
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{f.path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    model_type, renormalize = ARCHITECTURES[arch]

    def key(name: str, kind: type = int, default=None):
        return f.field(f"{arch}.{name}", kind, default)

    experts = key("expert_count", default=0)
    if not experts:
        raise CheckpointError(f"{f.path}: {arch}.expert_count is missing or 0: moepic runs mixture-of-experts models")
    heads = key("attention.head_count")
    vocab = f.tensor_shape("token_embd.weight")[0]
    hidden = key("embedding_length")
    layers = key("block_count")
    config = {
        "model_type": model_type,
        "dtype": "float32",  # the blocks dequantise to float32 (llama.cpp computes in it); --dtype narrows
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv", default=heads),
        "head_dim": key("attention.key_length", default=None) or key("rope.dimension_count", default=None) or hidden // heads,
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon", float),
        "rope_parameters": _rope(f, arch),
        "max_position_embeddings": key("context_length", default=4096),
        "num_experts_per_tok": key("expert_used_count"),
        "norm_topk_prob": key("expert_weights_norm", bool, renormalize),
        "tie_word_embeddings": not f.has("output.weight"),
        "bos_token_id": f.field("tokenizer.ggml.bos_token_id", int, None),
        "eos_token_id": f.field("tokenizer.ggml.eos_token_id", int, None),
    }
    expert_ffn = key("expert_feed_forward_length", default=None)
    if model_type == "mixtral":
        config |= {"num_local_experts": experts, "intermediate_size": expert_ffn or key("feed_forward_length")}
    elif model_type == "olmoe":  # every layer MoE; its intermediate_size is the experts'
        config |= {"num_experts": experts, "intermediate_size": expert_ffn or key("feed_forward_length"),
                   "attention_bias": f.has("blk.0.attn_q.bias"), "clip_qkv": key("attention.clamp_kqv", float, None)}
    elif model_type == "gpt_oss":  # even layers slide (llama.cpp's pattern, HF's default), the rest are full
        config |= {"num_local_experts": experts, "intermediate_size": expert_ffn or key("feed_forward_length"),
                   "sliding_window": key("attention.sliding_window"), "attention_bias": f.has("blk.0.attn_q.bias")}
        return config | _gpt_oss_quantization(f, layers)
    else:
        dense_layers = [l for l in range(layers) if not f.has(f"blk.{l}.ffn_gate_inp.weight")]
        config |= {"num_experts": experts, "moe_intermediate_size": expert_ffn or key("feed_forward_length"),
                   "intermediate_size": key("feed_forward_length", default=0), "mlp_only_layers": dense_layers,
                   "decoder_sparse_step": 1}
    if model_type == "qwen2_moe":
        config |= {"shared_expert_intermediate_size": key("expert_shared_feed_forward_length", default=0),
                   "qkv_bias": f.has("blk.0.attn_q.bias")}
    if model_type == "qwen3_moe":
        config["attention_bias"] = f.has("blk.0.attn_q.bias")
    quantization = expert_quantization(f, layers)
    if quantization is not None:
        config["quantization_config"] = quantization
    return config


def _gpt_oss_quantization(f: GGUFFile, layers: int) -> dict:
    """GPT-OSS's experts: MXFP4 ones kept as the `mxfp4` format (its adapter reads them fused:
    checkpoint/gguf_fused.py), float ones dense; other kinds cannot stay blocks (the `gguf` format
    carries no expert biases)."""
    kinds = {f.kind(f"blk.{l}.ffn_{p}_exps.weight") for l in range(layers) for p in ("gate", "up", "down")
             if f.has(f"blk.{l}.ffn_{p}_exps.weight")}
    if kinds <= set(FLOAT_KINDS):
        return {}
    if kinds == {"MXFP4"}:
        return {"quantization_config": {"quant_method": "mxfp4"}}
    return {"quantization_config": {"quant_method": QUANT_METHOD, "unkept": f"GPT-OSS's routed experts stay blocks in "
                                    f"MXFP4 only; these are {', '.join(sorted(kinds))}"}}


def _rope(f: GGUFFile, arch: str) -> dict:
    theta = f.field(f"{arch}.rope.freq_base", float, 10_000.0 if arch == "llama" else 1_000_000.0)
    scaling = f.field(f"{arch}.rope.scaling.type", str, "none")
    if scaling == "none":
        return {"rope_type": "default", "rope_theta": theta}
    factor = f.field(f"{arch}.rope.scaling.factor", float)
    if scaling == "linear":
        return {"rope_type": "linear", "rope_theta": theta, "factor": factor}
    if scaling == "yarn":
        betas = {k: f.field(f"{arch}.rope.scaling.yarn_{k}", float, None) for k in ("beta_fast", "beta_slow")}
        return {"rope_type": "yarn", "rope_theta": theta, "factor": factor,
                "original_max_position_embeddings": f.field(f"{arch}.rope.scaling.original_context_length", int)} | {k: v for k, v in betas.items() if v is not None}
    raise CheckpointError(f"{f.path}: {arch}.rope.scaling.type {scaling!r} is not supported; supported: none, linear, yarn")


def expert_quantization(f: GGUFFile, layers: int) -> dict | None:
    """How the routed experts are stored: None for float tensors (read as dense experts), else a
    quantization_config naming the `gguf` format each MoE layer's experts load in (llama.cpp varies
    the kinds by layer: a Q4_K_M file's down is Q6_K in some, Q4_K in others), or why they cannot
    stay blocks."""
    kinds = {l: tuple(f.kind(f"blk.{l}.ffn_{p}_exps.weight") for p in ("gate", "up", "down"))
             for l in range(layers) if f.has(f"blk.{l}.ffn_gate_exps.weight")}
    if {k for per_layer in kinds.values() for k in per_layer} <= set(FLOAT_KINDS):
        return None
    config = {"quant_method": QUANT_METHOD}
    formats = []
    for l, (gate, up, down) in kinds.items():
        unread = [k for k in (gate, up, down) if k not in BLOCKS]
        if gate != up or unread:
            why = f"gate is {gate}, up {up}" if gate != up else f"{unread[0]} blocks are not kept (kept: {', '.join(BLOCKS)})"
            return config | {"unkept": f"blk.{l}'s routed experts cannot stay blocks: {why}"}
        formats.append({"name": "gguf", "gate_up": gate, "down": down})
    return config | {"expert_formats": formats}
