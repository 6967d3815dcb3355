"""The canonical parameter tree: frozen records of tensors, one per layer part.

Pure data. Every routed expert is its own `SwiGLUWeights`, individually addressable as
`model.layers[l].ffn.experts[e]`, so the offloading runtime can move experts one by one.
Every matrix is neuron-major, so a range of whole neuron blocks of an expert is one contiguous
slice of each (what makes an expert splittable along F with contiguous segments, docs/design.md §2):
- gate and up are interleaved by neuron block: `gate_up_N2BD[n] = (gate rows, up rows)` of block
  n's B neurons. One matrix-vector product computes both (measured ~7 % faster fp32 decode on
  CPU than two), a block range stays one slice, and the SiLU·up step reads B contiguous values at a
  time (per-neuron interleaving made it ~6x slower in prefill);
- the down projection is stored transposed (F×D);
- a gate/up bias, where an expert has one (GPT-OSS), is per neuron like the rows it belongs to
  (`gate_up_bias_N2B`), so it travels with its neurons; the down bias is per expert, not per
  neuron, so it is no segment's: it lives with the layer (`MoEWeights.expert_down_bias_ED`) and is
  added once per expert (core/moe.py).
Shapes: N neuron blocks, B neurons per block, F = N·B.
"""

from __future__ import annotations

import attrs
import torch

from moepic.core.spec import SILU, GatedActivation

WIDEST_NEURON_BLOCK = 64


def neuron_block(ffn_size: int, widest: int = WIDEST_NEURON_BLOCK) -> int:
    """The largest power of two ≤ `widest` that divides ffn_size (64 for every real MoE expert)."""
    block = widest
    while ffn_size % block:
        block //= 2
    return block


@attrs.frozen
class SwiGLUWeights:
    """y = (silu(x·gateᵀ) ⊙ x·upᵀ) · down_FD — an expert, a shared expert or a dense MLP; with a
    gate/up bias and another `activation` (spec.GatedActivation) where the model has them."""

    gate_up_N2BD: torch.Tensor  # [N, 2, B, D]: [:, 0] are gate rows, [:, 1] up rows
    down_FD: torch.Tensor
    gate_up_bias_N2B: torch.Tensor | None = None
    activation: GatedActivation = SILU

    @classmethod
    def from_projections(
        cls, gate_FD: torch.Tensor, up_FD: torch.Tensor, down_DF: torch.Tensor, *, block: int | None = None,
        gate_bias_F: torch.Tensor | None = None, up_bias_F: torch.Tensor | None = None,
        activation: GatedActivation = SILU,
    ) -> SwiGLUWeights:
        """From checkpoint-layout matrices (gate, up: F×D; down: D×F), in neuron blocks of `block`;
        gate and up biases [F] both or neither."""
        F, D = gate_FD.shape
        B = neuron_block(F) if block is None else block
        if B < 1 or F % B:
            raise ValueError(f"neuron block {B} does not divide the FFN width {F}")
        if (gate_bias_F is None) != (up_bias_F is None):
            raise ValueError("an expert has gate and up biases both or neither")
        gate_up = torch.stack((gate_FD.view(F // B, B, D), up_FD.view(F // B, B, D)), dim=1)
        bias = None if gate_bias_F is None else torch.stack((gate_bias_F.view(F // B, B), up_bias_F.view(F // B, B)), dim=1)
        return cls(gate_up, down_DF.t().contiguous(), bias, activation)

    @property
    def block(self) -> int:
        return self.gate_up_N2BD.shape[2]

    @property
    def ffn_size(self) -> int:
        return self.gate_up_N2BD.shape[0] * self.block

    @property
    def hidden(self) -> int:
        return self.down_FD.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.down_FD.dtype

    @property
    def biased(self) -> bool:
        return self.gate_up_bias_N2B is not None

    @property
    def gate_FD(self) -> torch.Tensor:
        """Gate rows in checkpoint order (a copy when blocks are interleaved; for inspection)."""
        return self.gate_up_N2BD[:, 0].reshape(self.ffn_size, -1)

    @property
    def up_FD(self) -> torch.Tensor:
        return self.gate_up_N2BD[:, 1].reshape(self.ffn_size, -1)

    def neurons(self, start: int, stop: int) -> SwiGLUWeights:
        """The segment holding neurons [start, stop), both multiples of the block: views, no copy."""
        B = self.block
        if start % B or stop % B or not 0 <= start <= stop <= self.ffn_size:
            raise ValueError(
                f"segment [{start}, {stop}) must lie in [0, {self.ffn_size}] on neuron-block boundaries (block {B})"
            )
        bias = None if self.gate_up_bias_N2B is None else self.gate_up_bias_N2B[start // B : stop // B]
        return SwiGLUWeights(self.gate_up_N2BD[start // B : stop // B], self.down_FD[start:stop], bias, self.activation)

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Its tensors in packing order (core/packing.py): what a copy of it moves, pair by pair."""
        if self.gate_up_bias_N2B is None:
            return self.gate_up_N2BD, self.down_FD
        return self.gate_up_N2BD, self.down_FD, self.gate_up_bias_N2B

    def with_tensors(self, tensors: tuple[torch.Tensor, ...]) -> SwiGLUWeights:
        """The same expert over other tensors, given in `tensors` order (views of a packed buffer, say)."""
        return SwiGLUWeights(*tensors, activation=self.activation)

    def dense(self) -> SwiGLUWeights:
        """What the kernels compute with: itself (a quantized expert decodes: moepic/quant/format.py)."""
        return self

    def fused_swiglu(self, x_TD: torch.Tensor) -> torch.Tensor | None:
        """None: dense weights have no fused path (a quantized expert may: moepic/quant/format.py)."""
        return None

    def to(self, device: torch.device | str) -> SwiGLUWeights:
        return attrs.evolve(self, gate_up_N2BD=self.gate_up_N2BD.to(device), down_FD=self.down_FD.to(device),
                            gate_up_bias_N2B=None if self.gate_up_bias_N2B is None else self.gate_up_bias_N2B.to(device))


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
    o_bias: torch.Tensor | None = None
    sinks_H: torch.Tensor | None = None  # a logit per query head (spec.attention_sinks)


@attrs.frozen
class MLAWeights:
    """Latent attention's projections (core/mla.py). H heads; L = kv_lora_rank; r = rotary width."""

    kv_a_CD: torch.Tensor  # C = L + r: the latent and the shared rotary key, from x
    kv_a_norm_L: torch.Tensor
    kv_b_ND: torch.Tensor  # [H·(nope + v), L]: each head's key (no rope) and value from the latent
    o_DV: torch.Tensor  # [D, H·v]
    q_QD: torch.Tensor | None = None  # [H·(nope + r), D]: direct queries (no q_lora_rank) …
    q_a_RD: torch.Tensor | None = None  # … or through a low-rank R = q_lora_rank
    q_a_norm_R: torch.Tensor | None = None
    q_b_QR: torch.Tensor | None = None


@attrs.frozen
class MoEWeights:
    router_ED: torch.Tensor
    experts: tuple[SwiGLUWeights, ...]
    shared_expert: SwiGLUWeights | None = None
    shared_expert_gate_1D: torch.Tensor | None = None
    # Added to the router's scores to choose experts, never to weigh them (DeepSeek-V3's
    # `e_score_correction_bias`); None: none.
    router_bias_E: torch.Tensor | None = None
    # Added to the router's logits (GPT-OSS's router bias): choice and weights both see it.
    router_logit_bias_E: torch.Tensor | None = None
    # Each routed expert's down-projection bias [E, D] (GPT-OSS), added once to the expert's output.
    expert_down_bias_ED: torch.Tensor | None = None


@attrs.frozen
class LayerWeights:
    """A block. Its first norm sits before attention, its second between attention and the FFN
    (pre-norm, spec.norm_placement "pre"); with post-norm they normalise the attention's and the
    FFN's outputs instead."""

    input_norm_D: torch.Tensor
    attention: AttentionWeights | MLAWeights
    post_attention_norm_D: torch.Tensor
    ffn: SwiGLUWeights | MoEWeights
    # LayerNorm's biases (spec.norm "layer"); None for RMSNorm.
    input_norm_bias_D: torch.Tensor | None = None
    post_attention_norm_bias_D: torch.Tensor | None = None


@attrs.frozen
class ModelWeights:
    embed_VD: torch.Tensor
    layers: tuple[LayerWeights, ...]
    final_norm_D: torch.Tensor
    lm_head_VD: torch.Tensor
    final_norm_bias_D: torch.Tensor | None = None
    lm_head_bias_V: torch.Tensor | None = None
