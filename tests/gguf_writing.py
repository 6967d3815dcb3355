"""Tiny GGUF files for the tests, written with the `gguf` package's writer as llama.cpp's converter
names and orders things: from a tiny Hugging Face checkpoint's tensors (float or Q8_0, quantized by
the `gguf` package's own reference), or with routed experts as random Q4_K / Q6_K blocks (no
Python k-quant encoder exists; any block with finite scales is one llama.cpp could have written)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import load_file

from moepic.quant.ggml import BLOCKS

ARCH = {"qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe", "olmoe": "olmoe", "mixtral": "llama"}
_EXPERT = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}


def random_blocks(kind: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """[rows, cols/w · bytes] random blocks of `kind` whose float16 scales are small and finite."""
    weights, nbytes = BLOCKS.get(kind) or {"Q5_K": (256, 176)}[kind]  # Q5_K: a kind moepic does not keep
    blocks = rng.integers(0, 256, size=(rows * cols // weights, nbytes), dtype=np.uint8)
    scales = {"Q8_0": [0], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}[kind]  # byte offsets of float16 d (and dmin)
    for at in scales:
        blocks[:, at : at + 2] = rng.uniform(0, 2e-3, size=(len(blocks), 1)).astype(np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order for the llama architecture (interleaved RoPE pairs)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tensor_name(hf: str) -> tuple[str, int | None, str | None]:
    """(GGUF name, expert index, projection) for an HF tensor name of the families written here."""
    parts = hf.split(".")
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight", None, None
    if hf == "model.norm.weight":
        return "output_norm.weight", None, None
    if hf == "lm_head.weight":
        return "output.weight", None, None
    l, rest = parts[2], parts[3:]
    blk = f"blk.{l}"
    if rest[0] in ("input_layernorm", "post_attention_layernorm"):
        return f"{blk}.{'attn_norm' if rest[0] == 'input_layernorm' else 'ffn_norm'}.weight", None, None
    if rest[0] == "self_attn":
        what = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                "q_norm": "attn_q_norm", "k_norm": "attn_k_norm"}[rest[1]]
        return f"{blk}.{what}.{rest[2]}", None, None
    if rest[1] == "experts":
        p = _EXPERT[rest[3]]
        return f"{blk}.ffn_{p}_exps.weight", int(rest[2]), p
    if rest[1] == "gate":
        return f"{blk}.ffn_gate_inp.weight", None, None
    if rest[1] == "shared_expert_gate":
        return f"{blk}.ffn_gate_inp_shexp.weight", None, None
    if rest[1] == "shared_expert":
        return f"{blk}.ffn_{rest[2].removesuffix('_proj')}_shexp.weight", None, None
    return f"{blk}.ffn_{rest[1].removesuffix('_proj')}.weight", None, None  # a dense layer's MLP


def write_gguf(
    folder: Path, path: Path, *, experts: str | tuple[str, str] = "F32", resident: str = "F32", seed: int = 0,
    drop: tuple[str, ...] = (), tokenizer: dict | None = None,
) -> Path:
    """`folder`'s model as a GGUF file at `path`. `experts`: the routed experts' kind ("F32", "Q8_0"
    from the checkpoint's weights) or (gate/up kind, down kind) of random blocks; `resident`: every
    other 2-D weight's ("F32", "F16", "BF16", "Q8_0"). `drop`: GGUF tensor names left out;
    `tokenizer`: `tokenizer_metadata`'s arguments, to carry one."""
    config = json.loads((folder / "config.json").read_text())
    model_type = config["model_type"]
    arch, rng = ARCH[model_type], np.random.default_rng(seed)
    tensors = load_file(folder / "model.safetensors")
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    out: dict[str, np.ndarray | list] = {}
    for hf, t in tensors.items():
        name, expert, projection = _gguf_tensor_name(hf)
        w = t.float().numpy()
        if arch == "llama" and name.split(".")[-2] in ("attn_q", "attn_k"):
            w = _permute(w, heads if ".attn_q." in name else kv_heads)
        if name.endswith("ffn_gate_inp_shexp.weight"):
            w = w.reshape(-1)
        if expert is None:
            out[name] = w
        else:
            out.setdefault(name, {})[expert] = (w, projection)
    writer = gguf.GGUFWriter(str(path), arch)
    _metadata(writer, config, model_type)
    if tokenizer is not None:
        tokenizer_metadata(writer, **tokenizer)
    for name, value in out.items():
        if isinstance(value, dict):
            _add_experts(writer, name, value, experts, rng)
        elif name in drop:
            continue
        elif value.ndim == 2 and resident != "F32" and not name.endswith("ffn_gate_inp.weight"):
            _add(writer, name, value, resident)
        else:
            writer.add_tensor(name, value)
    return _written(writer, path)


def _add(writer: gguf.GGUFWriter, name: str, w: np.ndarray, kind: str) -> None:
    qtype = gguf.GGMLQuantizationType[kind]
    if kind in ("F16",):
        writer.add_tensor(name, w.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)


def _add_experts(writer, name: str, by_expert: dict, experts, rng) -> None:
    stacked = np.stack([by_expert[e][0] for e in sorted(by_expert)])  # [E, rows, cols]
    projection = next(iter(by_expert.values()))[1]
    if isinstance(experts, tuple):
        kind = experts[1] if projection == "down" else experts[0]
        E, rows, cols = stacked.shape
        blocks = np.stack([random_blocks(kind, rows, cols, rng) for _ in range(E)])
        writer.add_tensor(name, blocks, raw_dtype=gguf.GGMLQuantizationType[kind])
    elif experts == "F32":
        writer.add_tensor(name, stacked)
    else:
        _add(writer, name, stacked, experts)


def _written(writer: gguf.GGUFWriter, path: Path) -> Path:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _header(writer: gguf.GGUFWriter, config: dict) -> None:
    """What every family's file says alike: sizes, heads, norm, rope, BOS and EOS."""
    writer.add_vocab_size(config["vocab_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    rope = config.get("rope_parameters") or {}
    writer.add_rope_freq_base(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    if rope.get("rope_type", "default") != "default":
        writer.add_rope_scaling_type(gguf.RopeScalingType(rope["rope_type"]))
        writer.add_rope_scaling_factor(rope["factor"])
        if "original_max_position_embeddings" in rope:
            writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])


def _metadata(writer: gguf.GGUFWriter, config: dict, model_type: str) -> None:
    _header(writer, config)
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    experts = config.get("num_local_experts") or config["num_experts"]
    writer.add_expert_count(experts)
    if model_type == "mixtral":
        writer.add_feed_forward_length(config["intermediate_size"])
        writer.add_rope_dimension_count(head_dim)
    elif model_type == "olmoe":  # as llama.cpp's converter: the experts' width is the feed-forward length
        writer.add_feed_forward_length(config["intermediate_size"])
        writer.add_rope_dimension_count(head_dim)
        if config.get("clip_qkv") is not None:
            writer.add_clamp_kqv(config["clip_qkv"])
    else:
        writer.add_feed_forward_length(config["intermediate_size"])
        writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if model_type == "qwen2_moe":
        writer.add_expert_shared_feed_forward_length(config["shared_expert_intermediate_size"])
    writer.add_expert_used_count(config["num_experts_per_tok"])
    if "norm_topk_prob" in config:  # llama.cpp fixes it per architecture; a file may still say
        writer.add_expert_weights_norm(config["norm_topk_prob"])


def gguf_reference_model(path: Path, **config):
    """transformers' own reading of a GGUF file (it dequantises with the `gguf` package), float32.
    `config`: what its metadata mapping misses (it reads no expert_feed_forward_length)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32, **config).eval()


def tokenizer_gguf(path: Path, tokenizer, *, kind: str, pre: str | None = None, add_bos: bool | None = None) -> Path:
    """A GGUF file holding only a tokenizer's metadata (`tokenizer_metadata`), `<s>` and `</s>` its BOS and EOS."""
    writer = gguf.GGUFWriter(str(path), "qwen3moe")
    tokenizer_metadata(writer, tokenizer, kind=kind, pre=pre, add_bos=add_bos)
    for token, add in (("<s>", writer.add_bos_token_id), ("</s>", writer.add_eos_token_id)):
        if tokenizer.token_to_id(token) is not None:
            add(tokenizer.token_to_id(token))
    return _written(writer, path)


def tokenizer_metadata(writer, tokenizer, *, kind: str, pre: str | None = None, add_bos: bool | None = None,
                       chat_template: str | None = None) -> None:
    """A tokenizer's metadata as llama.cpp's converter writes it: `kind` "gpt2" (byte-level BPE:
    its vocabulary and merges, `pre` naming the split) or "llama" (SentencePiece: its vocabulary
    with scores falling in id order, no merges). `tokenizer`: a `tokenizers.Tokenizer` of that
    kind; its special added tokens are written as control tokens. `chat_template`: the file's
    `tokenizer.chat_template`."""
    state = json.loads(tokenizer.to_str())
    vocab = state["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda item: item[1])]
    special = {t["content"] for t in state["added_tokens"] if t["special"]}
    writer.add_tokenizer_model(kind)
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    if kind == "gpt2":
        writer.add_tokenizer_pre(pre)
        writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in state["model"]["merges"]])
    else:
        writer.add_token_scores([-float(i) for i in range(len(tokens))])
    if "<unk>" in vocab:
        writer.add_unk_token_id(vocab["<unk>"])
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    if chat_template is not None:
        writer.add_chat_template(chat_template)


def _ggml_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """OCP / HF MXFP4 (codes [..., G, 16]: byte j holds values 2j and 2j+1; scales [..., G]) → GGUF's
    rows [..., G·17]: the scale byte, then bytes whose low nibbles are values 0–15, high 16–31."""
    codes = np.stack((blocks & 0x0F, blocks >> 4), axis=-1).reshape(*blocks.shape[:-1], 32)
    qs = codes[..., :16] | (codes[..., 16:] << 4)
    return np.concatenate((scales[..., None], qs), axis=-1).astype(np.uint8).reshape(*scales.shape[:-1], -1)


def write_gpt_oss_gguf(folder: Path, path: Path, *, experts: str = "F32", drop: tuple[str, ...] = ()) -> Path:
    """A GPT-OSS checkpoint (float experts, or MXFP4 as its releases ship them) as llama.cpp's
    converter writes it: gate, up and down stacked apart ([E, F, D] / [E, D, F], MXFP4 rows as GGUF's
    17-byte blocks), their biases apart, the sinks, the router, `post_attention_norm`. `experts`:
    float experts' kind in the file (F32, or Q8_0 quantized by the `gguf` package)."""
    config = json.loads((folder / "config.json").read_text())
    tensors = {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in load_file(folder / "model.safetensors").items()}
    out: dict[str, tuple[np.ndarray, object]] = {}
    simple = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
    for hf, w in tensors.items():
        if hf in simple:
            out[simple[hf]] = (w, None)
            continue
        l, rest = hf.split(".")[2], ".".join(hf.split(".")[3:])
        blk = f"blk.{l}"
        layer = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "post_attention_norm.weight",
                 "self_attn.sinks": "attn_sinks.weight", "mlp.router.weight": "ffn_gate_inp.weight",
                 "mlp.router.bias": "ffn_gate_inp.bias", "mlp.experts.down_proj_bias": "ffn_down_exps.bias"}
        for a, g in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"), ("o_proj", "attn_output")):
            layer |= {f"self_attn.{a}.weight": f"{g}.weight", f"self_attn.{a}.bias": f"{g}.bias"}
        if rest in layer:
            out[f"{blk}.{layer[rest]}"] = (w, None)
        elif rest == "mlp.experts.gate_up_proj":  # [E, D, 2F], gate and up interleaved by neuron
            out[f"{blk}.ffn_gate_exps.weight"] = (w[:, :, 0::2].transpose(0, 2, 1).copy(), None)
            out[f"{blk}.ffn_up_exps.weight"] = (w[:, :, 1::2].transpose(0, 2, 1).copy(), None)
        elif rest == "mlp.experts.gate_up_proj_bias":
            out[f"{blk}.ffn_gate_exps.bias"], out[f"{blk}.ffn_up_exps.bias"] = (w[:, 0::2].copy(), None), (w[:, 1::2].copy(), None)
        elif rest == "mlp.experts.down_proj":  # HF's [E, F, D] → llama.cpp's [E, D, F]
            out[f"{blk}.ffn_down_exps.weight"] = (w.transpose(0, 2, 1).copy(), None)
        elif rest == "mlp.experts.gate_up_proj_blocks":
            scales = tensors[hf.replace("_blocks", "_scales")]
            out[f"{blk}.ffn_gate_exps.weight"] = (_ggml_mxfp4(w[:, 0::2], scales[:, 0::2]), gguf.GGMLQuantizationType.MXFP4)
            out[f"{blk}.ffn_up_exps.weight"] = (_ggml_mxfp4(w[:, 1::2], scales[:, 1::2]), gguf.GGMLQuantizationType.MXFP4)
        elif rest == "mlp.experts.down_proj_blocks":
            out[f"{blk}.ffn_down_exps.weight"] = (_ggml_mxfp4(w, tensors[hf.replace("_blocks", "_scales")]),
                                                  gguf.GGMLQuantizationType.MXFP4)
        elif not rest.endswith("_scales"):
            raise ValueError(f"no GGUF name for {hf}")
    writer = gguf.GGUFWriter(str(path), "gpt-oss")
    _header(writer, config)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_expert_feed_forward_length(config["intermediate_size"])
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    writer.add_expert_count(config["num_local_experts"])
    writer.add_expert_used_count(config["num_experts_per_tok"])
    writer.add_sliding_window(config["sliding_window"])
    for name, (w, raw) in out.items():
        if name in drop:
            continue
        if experts != "F32" and raw is None and name.endswith("_exps.weight"):
            _add(writer, name, w, experts)
        else:
            writer.add_tensor(name, w, raw_dtype=raw)
    return _written(writer, path)
