"""Expert formats of integer groups (quant/groups.py): every row of gate, up and down cut into
groups of `group_size` weights along the hidden dimension, each with a float16 scale (and a zero
point, asymmetric). Pure. `int8` and `int4` (quant/int8.py, quant/int4.py) are this with 8 and 4 bits.

Groups run along the hidden dimension of each neuron's own rows (down is stored neuron-major,
core/weights.py), so no group spans two neurons: an expert splits at any neuron block, as dense
ones do. Per neuron of a hidden size D: 3·D·bits/8 bytes of codes + 3·D/g float16 scales
(+ 3·D/g zero bytes, asymmetric; + 2 biases in the compute dtype, GPT-OSS).
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch

from moepic.core.weights import SwiGLUWeights
from moepic.quant.format import ExpertFormat, FormatConfig, PartShape, QuantizedExpert
from moepic.quant.groups import QuantizedGroups, dequantize, quantize

SCALE_DTYPE = torch.float16


def _positive(instance, attribute, value) -> None:
    if value < 1:
        raise ValueError(f"{attribute.name} must be ≥ 1, got {value}")


@attrs.frozen
class GroupConfig(FormatConfig):
    group_size: int = attrs.field(default=64, validator=_positive)
    symmetric: bool = True


class GroupFormat(ExpertFormat):
    bits: ClassVar[int]
    config: GroupConfig

    def check_shape(self, hidden: int, ffn_size: int, block: int) -> None:
        super().check_shape(hidden, ffn_size, block)
        g = self.config.group_size
        if self.bits == 4 and g % 2:
            raise ValueError(f"{self.name} packs codes in pairs: group size {g} must be even")
        if hidden % g:
            raise ValueError(f"{self.name} group size {g} does not divide the experts' hidden size {hidden}")

    def parts(self, hidden: int, block: int, dtype: torch.dtype, biased: bool) -> tuple[PartShape, ...]:
        groups, codes = hidden // self.config.group_size, hidden * self.bits // 8
        code_dtype = torch.int8 if self.bits == 8 and self.config.symmetric else torch.uint8
        parts = [PartShape(name="gate_up_scales", per_block=(2, block, groups), dtype=SCALE_DTYPE, paired=True),
                 PartShape(name="down_scales", per_block=(block, groups), dtype=SCALE_DTYPE)]
        if biased:
            parts.append(PartShape(name="gate_up_bias", per_block=(2, block), dtype=dtype, paired=True))
        if not self.config.symmetric:
            parts += [PartShape(name="gate_up_zeros", per_block=(2, block, groups), dtype=torch.uint8, paired=True),
                      PartShape(name="down_zeros", per_block=(block, groups), dtype=torch.uint8)]
        parts += [PartShape(name="gate_up", per_block=(2, block, codes), dtype=code_dtype, paired=True),
                  PartShape(name="down", per_block=(block, codes), dtype=code_dtype)]
        return tuple(sorted(parts, key=lambda p: -p.dtype.itemsize))  # aligned when packed (format.py)

    def encode(self, w: SwiGLUWeights) -> QuantizedExpert:
        (_, _, B, D), dtype = w.gate_up_N2BD.shape, w.down_FD.dtype
        self.check_shape(D, w.ffn_size, B)
        named = {}
        for name, rows in (("gate_up", w.gate_up_N2BD.reshape(-1, D)), ("down", w.down_FD)):
            q = quantize(rows, bits=self.bits, group=self.config.group_size, symmetric=self.config.symmetric,
                         scale_dtype=SCALE_DTYPE)
            named[name], named[f"{name}_scales"] = q.values, q.scales
            if q.zeros is not None:
                named[f"{name}_zeros"] = q.zeros
        if w.gate_up_bias_N2B is not None:
            named["gate_up_bias"] = w.gate_up_bias_N2B
        return self.assemble(named, hidden=D, ffn_size=w.ffn_size, block=B, dtype=dtype, activation=w.activation)

    def decode(self, q: QuantizedExpert, dtype: torch.dtype) -> SwiGLUWeights:
        named = self.named_parts(q)
        N, D, g = q.parts[0].shape[0], q.hidden, self.config.group_size

        def rows(name: str) -> torch.Tensor:
            values, zeros = named[name], named.get(f"{name}_zeros")
            groups = QuantizedGroups(values.reshape(-1, values.shape[-1]), named[f"{name}_scales"].reshape(-1, D // g),
                                     None if zeros is None else zeros.reshape(-1, D // g), self.bits, g)
            return dequantize(groups, dtype)

        return SwiGLUWeights(rows("gate_up").view(N, 2, q.block, D), rows("down"), _cast(named.get("gate_up_bias"), dtype), q.activation)


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)
