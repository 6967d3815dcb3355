"""The `dense` expert format: weights kept as they are, in the run's dtype (bf16, fp32, …). Pure.

Its stored form is `SwiGLUWeights` itself (core/packing.py lays it out), so every quantized
format is measured against it: bytes per neuron = 3·hidden numbers (+ 2 for gate/up biases).
"""

from __future__ import annotations

import attrs
import torch

from moepic.core.weights import SwiGLUWeights
from moepic.quant.format import EXPERT_FORMATS, ExpertFormat, FormatConfig, PartShape, QuantizedExpert


@attrs.frozen
class DenseConfig(FormatConfig):
    pass


@EXPERT_FORMATS.register("dense", DenseConfig)
class DenseFormat(ExpertFormat):
    host_kernel = "dense"  # a GEMV over the weights themselves

    def parts(self, hidden: int, block: int, dtype: torch.dtype, biased: bool) -> tuple[PartShape, ...]:
        parts = (PartShape(name="gate_up", per_block=(2, block, hidden), dtype=dtype, paired=True),
                 PartShape(name="down", per_block=(block, hidden), dtype=dtype))
        return parts + ((PartShape(name="gate_up_bias", per_block=(2, block), dtype=dtype, paired=True),) if biased else ())

    def encode(self, w: SwiGLUWeights) -> SwiGLUWeights:
        return w

    def decode(self, q: QuantizedExpert, dtype: torch.dtype) -> SwiGLUWeights:
        raise TypeError("a dense expert is stored as SwiGLUWeights; there is nothing to decode")
