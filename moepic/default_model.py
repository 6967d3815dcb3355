"""The built-in default model: a small random Mixtral-shaped checkpoint, created once and cached.

A stand-in until a trained model ships with the package. Its weights are random, so its text is
noise, but it is a real Hugging Face folder (config.json, model.safetensors, tokenizer.json) read
through the normal loader. Side effects: writes to the cache folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

NAME = "random-mixtral-tiny-v1"
SPECIALS = ("<s>", "</s>")
CONFIG = {
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "vocab_size": 256 + len(SPECIALS),
    "rms_norm_eps": 1e-5,
    "rope_theta": 1e6,
    "max_position_embeddings": 4096,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "dtype": "float32",
}


def cache_root() -> Path:
    return Path(os.environ.get("MOEPIC_CACHE_DIR") or Path.home() / ".cache" / "moepic")


def byte_level_tokenizer() -> Tokenizer:
    """Byte-level BPE with no merges: every byte is a token, so any text round-trips."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIALS)} | {ch: i + len(SPECIALS) for i, ch in enumerate(alphabet)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIALS))
    return tokenizer


def random_mixtral_tensors(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Per-expert tensors under Mixtral's file names, N(0, 0.02) like HF's initialiser, norms at 1."""
    g = torch.Generator().manual_seed(seed)
    D, F, V = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = D // config["num_attention_heads"]
    Q, K = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    rand = lambda *shape: torch.randn(*shape, generator=g) * 0.02  # noqa: E731
    tensors = {"model.embed_tokens.weight": rand(V, D), "model.norm.weight": torch.ones(D), "lm_head.weight": rand(V, D)}
    for l in range(config["num_hidden_layers"]):
        p = f"model.layers.{l}"
        tensors |= {
            f"{p}.input_layernorm.weight": torch.ones(D),
            f"{p}.post_attention_layernorm.weight": torch.ones(D),
            f"{p}.self_attn.q_proj.weight": rand(Q, D),
            f"{p}.self_attn.k_proj.weight": rand(K, D),
            f"{p}.self_attn.v_proj.weight": rand(K, D),
            f"{p}.self_attn.o_proj.weight": rand(D, Q),
            f"{p}.block_sparse_moe.gate.weight": rand(config["num_local_experts"], D),
        }
        for e in range(config["num_local_experts"]):
            q = f"{p}.block_sparse_moe.experts.{e}"
            tensors |= {f"{q}.w1.weight": rand(F, D), f"{q}.w3.weight": rand(F, D), f"{q}.w2.weight": rand(D, F)}
    return tensors


def default_model_dir() -> Path:
    """The cached default model folder, created on first use (atomically, so a crash leaves no half folder)."""
    target = cache_root() / NAME
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{NAME}-", dir=target.parent))
    try:
        (staging / "config.json").write_text(json.dumps(CONFIG, indent=2))
        save_file(random_mixtral_tensors(CONFIG), str(staging / "model.safetensors"), metadata={"format": "pt"})
        byte_level_tokenizer().save(str(staging / "tokenizer.json"))
        try:
            staging.rename(target)
        except OSError:  # another process won the race; its folder is identical
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
