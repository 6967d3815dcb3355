"""GPT-OSS's experts as its adapter reads them — fused per layer — assembled from a GGUF file's
per-projection stacks. Pure.

    GGUF (llama.cpp)                                      what the GPT-OSS adapter asks for
    blk.l.ffn_gate_exps / ffn_up_exps.weight [E, F, D] ─▶ mlp.experts.gate_up_proj [E, D, 2F]
                                                          (gate and up interleaved by neuron)
    blk.l.ffn_down_exps.weight               [E, D, F] ─▶ mlp.experts.down_proj [E, F, D]
    blk.l.ffn_{gate,up}_exps.bias            [E, F]    ─▶ mlp.experts.gate_up_proj_bias [E, 2F]
    blk.l.ffn_down_exps.bias                 [E, D]    ─▶ mlp.experts.down_proj_bias [E, D]
    MXFP4 weights                                      ─▶ …_blocks [E, rows, G, 16] and …_scales [E, rows, G]

An MXFP4 weight becomes the OCP / Hugging Face layout the `mxfp4` expert format keeps
(quant/ggml.py `mxfp4_as_mx`: the same values and scales, nibbles reordered), so GPT-OSS's experts
stay 4.25 bits a weight from a GGUF file as from its safetensors release.
"""

from __future__ import annotations

import re

import attrs
import torch

from moepic.quant.ggml import mxfp4_as_mx

_FUSED = re.compile(r"model\.layers\.(?P<l>\d+)\.mlp\.experts\.(?P<what>gate_up|down)_proj(?P<suffix>_bias|_blocks|_scales)?")


@attrs.frozen
class FusedExperts:
    """A fused GPT-OSS expert tensor and the GGUF tensors it is made of (gate then up, or down)."""

    sources: tuple[str, ...]
    what: str  # "gate_up" or "down"
    suffix: str  # "" (weights), "_bias", "_blocks" or "_scales" (MXFP4)

    @property
    def mxfp4(self) -> bool:
        return self.suffix in ("_blocks", "_scales")


def fused_experts(hf_name: str) -> FusedExperts | None:
    """The GGUF tensors GPT-OSS's fused expert tensor `hf_name` is assembled from, or None."""
    match = _FUSED.fullmatch(hf_name)
    if match is None:
        return None
    l, what, suffix = match["l"], match["what"], match["suffix"] or ""
    part = "bias" if suffix == "_bias" else "weight"
    projections = ("gate", "up") if what == "gate_up" else ("down",)
    return FusedExperts(tuple(f"blk.{l}.ffn_{p}_exps.{part}" for p in projections), what, suffix)


def assemble(fused: FusedExperts, parts: list[torch.Tensor]) -> torch.Tensor:
    """The fused tensor from its sources' values (one expert's, or stacked: any leading dims), as
    GGUF holds them in torch's order; MXFP4 sources as their raw blocks [..., rows, G·17] uint8."""
    if fused.mxfp4:
        blocks, scales = zip(*(mxfp4_as_mx(p) for p in parts))
        parts = list(blocks if fused.suffix == "_blocks" else scales)
        if fused.what == "down":
            return parts[0]
        pair_dim = -3 if fused.suffix == "_blocks" else -2  # parts [..., F, G, 16] / [..., F, G]
        gate_up = torch.stack(parts, dim=pair_dim)  # [..., F, 2, …]: neuron i's gate row, then its up row
        return gate_up.flatten(pair_dim - 1, pair_dim)
    if fused.suffix == "_bias":
        return parts[0] if fused.what == "down" else torch.stack(parts, dim=-1).flatten(-2)
    if fused.what == "down":
        return parts[0].transpose(-1, -2)  # [.., D, F] → HF's [.., F, D] (input rows)
    return torch.stack(parts, dim=-2).flatten(-3, -2).transpose(-1, -2)  # [.., F, 2, D] → [.., D, 2F]
