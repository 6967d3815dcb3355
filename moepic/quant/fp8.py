"""The `fp8` expert format: e4m3 weights with a float32 scale per neuron row and 128 hidden columns,
kept compressed end to end. Pure.

DeepSeek-V3 and Qwen3-FP8 checkpoints scale blocks of 128 × 128 (quant/e4m3.py); a block's scale
is copied to each of its 128 rows here (`from_blocks`), so every neuron carries its own scales and a
segment cuts at any neuron block, as dense ones do. That costs 3 · ⌈D/128⌉ · 4 bytes a neuron
beside its 3·D codes (3 % at D = 7168), and decodes to exactly what HF's dequantisation gives
(both cast to the compute dtype, then multiplied). Encoding dense weights (`moepic quantize --format
fp8`) takes a scale per row and 128 columns: max|w| / 448.
"""

from __future__ import annotations

import functools

import attrs
import torch

from moepic.core.spec import GatedActivation
from moepic.core.weights import SwiGLUWeights
from moepic.quant.e4m3 import BLOCK, fp8_available, quantize_e4m3_rows
from moepic.quant.format import EXPERT_FORMATS, ExpertFormat, FormatConfig, PartShape, QuantizedExpert

GROUP = BLOCK[1]


@attrs.frozen
class FP8Config(FormatConfig):
    pass


@EXPERT_FORMATS.register("fp8", FP8Config)
class FP8Format(ExpertFormat):
    def check_shape(self, hidden: int, ffn_size: int, block: int) -> None:
        super().check_shape(hidden, ffn_size, block)
        if not fp8_available():
            raise ValueError(f"fp8 experts need a torch with float8 dtypes; this torch is {torch.__version__}")

    def parts(self, hidden: int, block: int, dtype: torch.dtype, biased: bool) -> tuple[PartShape, ...]:
        groups = -(-hidden // GROUP)
        parts = [PartShape(name="gate_up_scales", per_block=(2, block, groups), dtype=torch.float32, paired=True),
                 PartShape(name="down_scales", per_block=(block, groups), dtype=torch.float32)]
        if biased:
            parts.append(PartShape(name="gate_up_bias", per_block=(2, block), dtype=dtype, paired=True))
        parts += [PartShape(name="gate_up", per_block=(2, block, hidden), dtype=torch.float8_e4m3fn, paired=True),
                  PartShape(name="down", per_block=(block, hidden), dtype=torch.float8_e4m3fn)]
        return tuple(sorted(parts, key=lambda p: -p.dtype.itemsize))

    def encode(self, w: SwiGLUWeights) -> QuantizedExpert:
        (_, _, B, D), F = w.gate_up_N2BD.shape, w.ffn_size
        self.check_shape(D, F, B)
        gate_up, gate_up_scales = quantize_e4m3_rows(w.gate_up_N2BD.reshape(-1, D))
        down, down_scales = quantize_e4m3_rows(w.down_FD)
        named = {"gate_up": gate_up, "gate_up_scales": gate_up_scales, "down": down, "down_scales": down_scales,
                 "gate_up_bias": w.gate_up_bias_N2B}
        return self.assemble(named, hidden=D, ffn_size=F, block=B, dtype=w.dtype, activation=w.activation)

    def from_blocks(
        self, gate_FD: torch.Tensor, gate_scale_inv: torch.Tensor, up_FD: torch.Tensor, up_scale_inv: torch.Tensor,
        down_DF: torch.Tensor, down_scale_inv: torch.Tensor, *, block: int, dtype: torch.dtype, activation: GatedActivation,
    ) -> QuantizedExpert:
        """An expert from a checkpoint's block-scaled e4m3 matrices (gate, up [F, D]; down [D, F]) and
        their `weight_scale_inv` [⌈rows/128⌉, ⌈cols/128⌉]: each block's scale copied to its rows."""
        F, D = gate_FD.shape
        B = block

        def per_row(scale_inv: torch.Tensor, rows: int) -> torch.Tensor:
            return scale_inv.float().repeat_interleave(BLOCK[0], dim=0)[:rows]

        gate_up = torch.stack((gate_FD.view(F // B, B, D), up_FD.view(F // B, B, D)), dim=1)
        gate_up_scales = torch.stack((per_row(gate_scale_inv, F).view(F // B, B, -1), per_row(up_scale_inv, F).view(F // B, B, -1)), dim=1)
        down_FD = down_DF.view(torch.uint8).t().contiguous().view(torch.float8_e4m3fn)  # a byte transpose: no arithmetic
        named = {"gate_up": gate_up, "gate_up_scales": gate_up_scales, "down": down_FD, "down_scales": per_row(down_scale_inv.t(), F)}
        return self.assemble(named, hidden=D, ffn_size=F, block=B, dtype=dtype, activation=activation)

    def decode(self, q: QuantizedExpert, dtype: torch.dtype) -> SwiGLUWeights:
        named = self.named_parts(q)
        D = q.hidden

        def weights(name: str) -> torch.Tensor:  # as HF dequantises: both cast to the dtype, multiplied in it
            codes, scale = named[name], named[f"{name}_scales"].to(dtype)
            values = _code_values(dtype, codes.device).index_select(0, codes.view(torch.uint8).reshape(-1).int()).view(codes.shape)
            if D % GROUP == 0:  # a broadcast, not a copy of every scale
                return (values.view(*codes.shape[:-1], -1, GROUP) * scale.unsqueeze(-1)).view(codes.shape)
            return values * scale.repeat_interleave(GROUP, dim=-1)[..., :D]

        bias = named.get("gate_up_bias")
        return SwiGLUWeights(weights("gate_up"), weights("down").reshape(-1, D), None if bias is None else bias.to(dtype), q.activation)


@functools.lru_cache(maxsize=16)
def _code_values(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every e4m3 byte's value in `dtype` (what `.to(dtype)` gives, NaN codes included): a gather
    through it is 2.3× faster on a CPU than torch's float8 conversion, with the same numbers."""
    return torch.arange(256, dtype=torch.uint8, device=device).view(torch.float8_e4m3fn).to(dtype)
