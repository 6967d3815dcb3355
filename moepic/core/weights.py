"""The canonical parameter tree: frozen records of tensors, one per layer part.

Pure data. Every routed expert is its own `SwiGLUWeights`, individually addressable as
`model.layers[l].ffn.experts[e]`, so the offloading runtime can move experts one by one.
The down projection is stored transposed (F×D) everywhere: a neuron range [a, b) of an expert
is then rows a:b of all three matrices, which is what makes an expert splittable along F
(paper-brief §2) with contiguous segments.
"""

from __future__ import annotations

import attrs
import torch


@attrs.frozen
class SwiGLUWeights:
    """y = (silu(x·gate_FDᵀ) ⊙ x·up_FDᵀ) · down_FD — an expert, a shared expert or a dense MLP."""

    gate_FD: torch.Tensor
    up_FD: torch.Tensor
    down_FD: torch.Tensor

    @property
    def ffn_size(self) -> int:
        return self.gate_FD.shape[0]

    def neurons(self, start: int, stop: int) -> SwiGLUWeights:
        """The segment holding neurons [start, stop): views, no copy."""
        return SwiGLUWeights(self.gate_FD[start:stop], self.up_FD[start:stop], self.down_FD[start:stop])


@attrs.frozen
class AttentionWeights:
    q_QD: torch.Tensor  # Q = num_heads * head_dim
    k_KD: torch.Tensor  # K here = num_kv_heads * head_dim
    v_KD: torch.Tensor
    o_DQ: torch.Tensor
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None  # [head_dim] (per-head) or [Q] (full width)
    k_norm: torch.Tensor | None = None


@attrs.frozen
class MoEWeights:
    router_ED: torch.Tensor
    experts: tuple[SwiGLUWeights, ...]
    shared_expert: SwiGLUWeights | None = None
    shared_expert_gate_1D: torch.Tensor | None = None


@attrs.frozen
class LayerWeights:
    input_norm_D: torch.Tensor
    attention: AttentionWeights
    post_attention_norm_D: torch.Tensor
    ffn: SwiGLUWeights | MoEWeights


@attrs.frozen
class ModelWeights:
    embed_VD: torch.Tensor
    layers: tuple[LayerWeights, ...]
    final_norm_D: torch.Tensor
    lm_head_VD: torch.Tensor
