"""GGUF files by name: which paths are GGUF files, and where each weight the adapters ask for by
its Hugging Face name lives in one. Pure (`is_gguf` looks at the path).

llama.cpp names a layer's tensors `blk.<l>.<what>` and stacks a MoE layer's routed experts in one
tensor per projection (`blk.<l>.ffn_gate_exps.weight`, [E, F, D]); the adapters read expert e alone
(`….experts.<e>.gate_proj.weight`), which is slice e of it.
"""

from __future__ import annotations

import re
from pathlib import Path

import attrs

def is_gguf(path: str | Path) -> bool:
    """Whether `path` names a GGUF file (what every command's --model accepts besides a folder)."""
    return str(path).endswith(".gguf") and Path(path).is_file()


_LAYER = r"model\.layers\.(?P<l>\d+)"
_MOE = rf"{_LAYER}\.(?:mlp|block_sparse_moe)"
_PROJECTION = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}

# HF name pattern → GGUF name template ({l}: layer; {p}: gate/up/down; {part}: weight or bias).
_TABLE = [
    (r"model\.embed_tokens\.weight", "token_embd.weight"),
    (r"model\.norm\.weight", "output_norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (rf"{_LAYER}\.input_layernorm\.weight", "blk.{l}.attn_norm.weight"),
    (rf"{_LAYER}\.post_attention_layernorm\.weight", "blk.{l}.ffn_norm.weight"),
    (rf"{_LAYER}\.self_attn\.(?P<a>[qkv])_proj\.(?P<part>weight|bias)", "blk.{l}.attn_{a}.{part}"),
    (rf"{_LAYER}\.self_attn\.o_proj\.(?P<part>weight|bias)", "blk.{l}.attn_output.{part}"),
    (rf"{_LAYER}\.self_attn\.(?P<a>[qk])_norm\.weight", "blk.{l}.attn_{a}_norm.weight"),
    (rf"{_MOE}\.gate\.weight", "blk.{l}.ffn_gate_inp.weight"),
    (rf"{_LAYER}\.mlp\.router\.(?P<part>weight|bias)", "blk.{l}.ffn_gate_inp.{part}"),  # GPT-OSS's router
    (rf"{_LAYER}\.self_attn\.sinks", "blk.{l}.attn_sinks.weight"),
    (rf"{_MOE}\.experts\.(?P<e>\d+)\.(?P<p>gate_proj|up_proj|down_proj|w1|w2|w3)\.weight", "blk.{l}.ffn_{p}_exps.weight"),
    (rf"{_MOE}\.shared_expert\.(?P<p>gate_proj|up_proj|down_proj)\.weight", "blk.{l}.ffn_{p}_shexp.weight"),
    (rf"{_MOE}\.shared_expert_gate\.weight", "blk.{l}.ffn_gate_inp_shexp.weight"),
    (rf"{_LAYER}\.mlp\.(?P<p>gate_proj|up_proj|down_proj)\.weight", "blk.{l}.ffn_{p}.weight"),
]
_COMPILED = [(re.compile(pattern), template) for pattern, template in _TABLE]
# Where an architecture names a tensor otherwise (GPT-OSS's norm before its MoE is a post-attention norm).
_ARCH_TABLE = {"gpt-oss": [(re.compile(rf"{_LAYER}\.post_attention_layernorm\.weight"), "blk.{l}.post_attention_norm.weight")]}


@attrs.frozen
class GGUFName:
    """Tensor `name` of the file; `expert`: only its slice [expert] (a routed expert of a stacked
    tensor); `rope_permuted`: a llama-arch query or key, whose rows llama.cpp reorders (`unpermute`)."""

    name: str
    expert: int | None = None
    rope_permuted: bool = False


def gguf_name(hf_name: str, *, llama_rope: bool, arch: str = "") -> GGUFName | None:
    """The GGUF tensor holding `hf_name`, or None where no GGUF name stands for it. `llama_rope`:
    the file is llama.cpp's `llama` architecture (Mixtral), whose q and k rows are permuted;
    `arch`: the file's architecture, for the names it has of its own."""
    for pattern, template in (*_ARCH_TABLE.get(arch, ()), *_COMPILED):
        match = pattern.fullmatch(hf_name)
        if match is None:
            continue
        fields = match.groupdict()
        if "p" in fields:
            fields["p"] = _PROJECTION[fields["p"]]
        expert = fields.pop("e", None)
        permuted = llama_rope and fields.get("a") in ("q", "k") and "_norm" not in template
        return GGUFName(template.format(**fields), None if expert is None else int(expert), permuted)
    return None


def unpermute(rows_RX, heads: int):
    """Undo llama.cpp's reordering of a llama-arch query or key projection (rows [heads·head_dim, …]):
    for its interleaved RoPE it stores each head's rows as pairs (row i of the first half, then row
    i of the second); Hugging Face's layout (and moepic's) keeps the halves apart."""
    R = rows_RX.shape[0]
    half = R // heads // 2
    return rows_RX.reshape(heads, half, 2, *rows_RX.shape[1:]).transpose(1, 2).reshape(rows_RX.shape)
