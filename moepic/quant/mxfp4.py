"""The `mxfp4` expert format: blocks of 32 four-bit floats sharing a power-of-two scale, as GPT-OSS
checkpoints ship their experts (quant/mx.py), kept compressed end to end. Pure.

Gate and up rows are blocked along the hidden dimension, as on disk. Down's blocks run along the
FFN dimension (GPT-OSS stores down as [D, F] with blocks along F), so 32 neurons share each of its
scales: a segment is cut at multiples of 32 neurons (`neuron_multiple`), and down is kept as
[F/32, D, 16] bytes (neuron-major by groups of 32). Per 32 neurons of a hidden size D:
gate/up codes 32·D bytes + scales 2·D, down codes 16·D + scales D: 51·D/32 bytes a neuron (4.25
bits a weight), + 2 biases in the compute dtype (GPT-OSS).

Decoding is HF's dequantisation (quant/mx.py), exact in any float dtype: the weights equal the ones
a dequantise-on-load run computes with.
"""

from __future__ import annotations

import attrs
import torch

from moepic.core.spec import GatedActivation
from moepic.core.weights import SwiGLUWeights
from moepic.quant.format import EXPERT_FORMATS, ExpertFormat, FormatConfig, PartShape, QuantizedExpert
from moepic.quant.mx import BLOCK_BYTES, VALUES_PER_BLOCK, dequantize_mxfp4, quantize_mxfp4

G = VALUES_PER_BLOCK


@attrs.frozen
class MXFP4Config(FormatConfig):
    pass


@EXPERT_FORMATS.register("mxfp4", MXFP4Config)
class MXFP4Format(ExpertFormat):
    neuron_multiple = G

    def check_shape(self, hidden: int, ffn_size: int, block: int) -> None:
        super().check_shape(hidden, ffn_size, block)
        if hidden % G:
            raise ValueError(f"mxfp4 blocks hold {G} weights: the experts' hidden size {hidden} is not a multiple")

    def parts(self, hidden: int, block: int, dtype: torch.dtype, biased: bool) -> tuple[PartShape, ...]:
        D = hidden
        bias = (PartShape(name="gate_up_bias", per_block=(2, block), dtype=dtype, paired=True),) if biased else ()
        return bias + (
            PartShape(name="gate_up", per_block=(2, block, D // 2), dtype=torch.uint8, paired=True),
            PartShape(name="gate_up_scales", per_block=(2, block, D // G), dtype=torch.uint8, paired=True),
            PartShape(name="down", per_block=(block // G, D, BLOCK_BYTES), dtype=torch.uint8),
            PartShape(name="down_scales", per_block=(block // G, D), dtype=torch.uint8),
        )

    def encode(self, w: SwiGLUWeights) -> QuantizedExpert:
        (N, _, B, D), F = w.gate_up_N2BD.shape, w.ffn_size
        self.check_shape(D, F, B)
        gate_up, gate_up_scales = quantize_mxfp4(w.gate_up_N2BD)  # [N, 2, B, D/32, 16], [N, 2, B, D/32]
        down_DG16, down_scales_DG = quantize_mxfp4(w.down_FD.t())  # blocks along F, as GPT-OSS stores down
        return self.from_blocks(
            gate_up.reshape(N, 2, B, D // 2), gate_up_scales, down_DG16, down_scales_DG, w.gate_up_bias_N2B,
            dtype=w.dtype, activation=w.activation,
        )

    def from_blocks(
        self, gate_up_N2BX: torch.Tensor, gate_up_scales_N2BG: torch.Tensor, down_DG16: torch.Tensor, down_scales_DG: torch.Tensor,
        bias_N2B: torch.Tensor | None, *, dtype: torch.dtype, activation: GatedActivation,
    ) -> QuantizedExpert:
        """An expert from blocks as a checkpoint holds them: gate/up rows [N, 2, B, D/2] (blocks
        along D) with their scales, down [D, F/32, 16] and its scales [D, F/32] (blocks along F)."""
        N, _, B, X = gate_up_N2BX.shape
        named = {"gate_up": gate_up_N2BX, "gate_up_scales": gate_up_scales_N2BG, "gate_up_bias": bias_N2B,
                 "down": down_DG16.transpose(0, 1), "down_scales": down_scales_DG.t()}  # [F/32, D, …]: neuron-major
        return self.assemble(named, hidden=2 * X, ffn_size=N * B, block=B, dtype=dtype, activation=activation)

    def decode(self, q: QuantizedExpert, dtype: torch.dtype) -> SwiGLUWeights:
        named = self.named_parts(q)
        gate_up, gate_up_scales, down, down_scales = (named[k] for k in ("gate_up", "gate_up_scales", "down", "down_scales"))
        bias = named.get("gate_up_bias")
        N, B, D = gate_up.shape[0], q.block, q.hidden
        gate_up_N2BD = dequantize_mxfp4(gate_up.view(N, 2, B, D // G, BLOCK_BYTES), gate_up_scales, dtype)
        down_NbDg = dequantize_mxfp4(down, down_scales, dtype).view(N, B // G, D, G)  # the last index is the neuron
        down_FD = down_NbDg.transpose(2, 3).reshape(N * B, D)
        return SwiGLUWeights(gate_up_N2BD, down_FD, None if bias is None else bias.to(dtype), q.activation)
