"""The canonical parameter tree: frozen records of tensors, one per layer part.

Pure data. Every routed expert is its own `SwiGLUWeights`, individually addressable as
`model.layers[l].ffn.experts[e]`, so the offloading runtime can move experts one by one.
Every matrix is neuron-major, so a neuron range [a, b) of an expert is a contiguous row block of
each (what makes an expert splittable along F with contiguous segments, paper-brief §2):
- gate and up are interleaved per neuron, `gate_up_F2D[n] = (gate row n, up row n)`: one
  matrix-vector product computes both (measured ~7 % faster fp32 decode on CPU than two), and a
  neuron range stays one block;
- the down projection is stored transposed (F×D).
"""

from __future__ import annotations

import attrs
import torch


@attrs.frozen
class SwiGLUWeights:
    """y = (silu(x·gateᵀ) ⊙ x·upᵀ) · down_FD — an expert, a shared expert or a dense MLP."""

    gate_up_F2D: torch.Tensor  # [F, 2, D]: gate_up_F2D[:, 0] is gate, [:, 1] is up
    down_FD: torch.Tensor

    @classmethod
    def from_projections(cls, gate_FD: torch.Tensor, up_FD: torch.Tensor, down_DF: torch.Tensor) -> SwiGLUWeights:
        """From checkpoint-layout matrices (gate, up: F×D; down: D×F)."""
        return cls(torch.stack((gate_FD, up_FD), dim=1), down_DF.t().contiguous())

    @property
    def ffn_size(self) -> int:
        return self.gate_up_F2D.shape[0]

    @property
    def gate_FD(self) -> torch.Tensor:
        return self.gate_up_F2D[:, 0]

    @property
    def up_FD(self) -> torch.Tensor:
        return self.gate_up_F2D[:, 1]

    def neurons(self, start: int, stop: int) -> SwiGLUWeights:
        """The segment holding neurons [start, stop): views, no copy."""
        return SwiGLUWeights(self.gate_up_F2D[start:stop], self.down_FD[start:stop])


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
