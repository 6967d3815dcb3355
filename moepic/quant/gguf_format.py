"""The `gguf` expert format: experts kept as llama.cpp's blocks (quant/ggml.py: Q8_0, Q4_K, Q6_K),
as a GGUF file stores them, and dequantised right before their matmuls. Pure.

GGUF cuts every row of a weight into blocks along its input dimension. For gate and up that is the
hidden dimension, so each neuron's rows are whole blocks; for down it is the FFN dimension, so
`w` neurons share each block (32 for Q8_0, 256 for the k-quants): a segment is cut at multiples of
the down kind's block (`neuron_multiple`) and down is kept as [F/w, D, block bytes] (neuron-major
by blocks of w neurons, as mxfp4 keeps GPT-OSS's down). Per neuron of a hidden size D, with gate/up
blocks of (w₁ weights, b₁ bytes) and down's of (w₂, b₂): 2·D·b₁/w₁ + D·b₂/w₂ bytes. A Q4_K_M
file's Q4_K gate/up and Q6_K down: 4.5 and 6.56 bits a weight, 5.19 on average.

`encode` writes Q8_0 as llama.cpp does (bit for bit); the k-quants are read from files only
(llama.cpp's k-quant search is not reimplemented: quantize to int4 instead).
"""

from __future__ import annotations

import functools

import attrs
import torch

from moepic.core.weights import SwiGLUWeights
from moepic.quant.format import EXPERT_FORMATS, ExpertFormat, FormatConfig, PartShape, QuantizedExpert
from moepic.quant.ggml import BLOCKS, block_shape, dequantize_ggml, quantize_q8_0

ENCODED = ("Q8_0",)  # kinds `encode` writes


def _known_kind(instance, attribute, value) -> None:
    block_shape(value)  # raises, naming the kinds read


@attrs.frozen
class GGUFConfig(FormatConfig):
    gate_up: str = attrs.field(default="Q8_0", validator=_known_kind)  # gate's and up's block kind
    down: str = attrs.field(default="Q8_0", validator=_known_kind)


@EXPERT_FORMATS.register("gguf", GGUFConfig)
class GGUFFormat(ExpertFormat):
    config: GGUFConfig

    @property
    def neuron_multiple(self) -> int:  # type: ignore[override]  (per config, not per class)
        return BLOCKS[self.config.down][0]

    @staticmethod
    @functools.cache
    def of(gate_up: str, down: str) -> GGUFFormat:
        """The format of experts stored in these kinds (one instance each: a file reads thousands)."""
        return EXPERT_FORMATS.build(GGUFConfig(gate_up=gate_up, down=down))

    def check_shape(self, hidden: int, ffn_size: int, block: int) -> None:
        super().check_shape(hidden, ffn_size, block)
        weights = BLOCKS[self.config.gate_up][0]
        if hidden % weights:
            raise ValueError(f"{self.config.gate_up} blocks hold {weights} weights: the experts' hidden size {hidden} "
                             "is not a multiple")

    def parts(self, hidden: int, block: int, dtype: torch.dtype, biased: bool) -> tuple[PartShape, ...]:
        if biased:
            raise ValueError("gguf experts have no gate/up biases (GGUF's MoE files in moepic's families store none)")
        (w1, b1), (w2, b2) = BLOCKS[self.config.gate_up], BLOCKS[self.config.down]
        return (
            PartShape(name="gate_up", per_block=(2, block, hidden // w1 * b1), dtype=torch.uint8, paired=True),
            PartShape(name="down", per_block=(block // w2, hidden, b2), dtype=torch.uint8),
        )

    def encode(self, w: SwiGLUWeights) -> QuantizedExpert:
        unwritten = [k for k in (self.config.gate_up, self.config.down) if k not in ENCODED]
        if unwritten:
            raise ValueError(f"gguf experts in {unwritten[0]} are read from GGUF files, not encoded: moepic writes "
                             f"{', '.join(ENCODED)} blocks (or use the int4 format)")
        (N, _, B, D), F = w.gate_up_N2BD.shape, w.ffn_size
        self.check_shape(D, F, B)
        w1, w2 = BLOCKS[self.config.gate_up][0], BLOCKS[self.config.down][0]
        gate_up = quantize_q8_0(w.gate_up_N2BD.reshape(-1, w1)).view(N, 2, B, -1)
        down_DX = quantize_q8_0(w.down_FD.t().reshape(-1, w2)).view(D, -1)  # blocks along F, as GGUF stores down
        return self.from_rows(gate_up, down_DX, block=B, dtype=w.dtype, activation=w.activation)

    def from_rows(self, gate_up_N2BX: torch.Tensor, down_DX: torch.Tensor, *, block: int, dtype, activation) -> QuantizedExpert:
        """An expert from its rows of blocks as a GGUF file holds them: gate then up rows [N, 2, B, X]
        (blocks along D), down [D, F/w · bytes] (blocks along F)."""
        N, _, B, _ = gate_up_N2BX.shape
        D, F, (_, b2) = down_DX.shape[0], N * B, BLOCKS[self.config.down]
        down = down_DX.view(D, -1, b2).transpose(0, 1)  # [F/w, D, bytes]: neuron-major
        return self.assemble({"gate_up": gate_up_N2BX, "down": down}, hidden=D, ffn_size=F, block=block, dtype=dtype,
                             activation=activation)

    def decode(self, q: QuantizedExpert, dtype: torch.dtype) -> SwiGLUWeights:
        named = self.named_parts(q)
        gate_up, down = named["gate_up"], named["down"]
        N, B, D = gate_up.shape[0], q.block, q.hidden
        (_, b1), (w2, b2) = BLOCKS[self.config.gate_up], BLOCKS[self.config.down]
        gate_up_N2BD = dequantize_ggml(gate_up.reshape(-1, b1), self.config.gate_up).view(N, 2, B, D)
        down_NbDw = dequantize_ggml(down.reshape(-1, b2), self.config.down).view(N, B // w2, D, w2)
        down_FD = down_NbDw.transpose(2, 3).reshape(N * B, D)  # the last index was the neuron
        return SwiGLUWeights(gate_up_N2BD.to(dtype), down_FD.to(dtype), None, q.activation)
