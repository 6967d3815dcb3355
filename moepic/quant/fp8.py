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
        (N, _, B, D), F = w.gate_up_N2BD.shape, w.ffn_size
        self.check_shape(D, F, B)
        gate_up, gate_up_scales = quantize_e4m3_rows(w.gate_up_N2BD.reshape(-1, D))
        down, down_scales = quantize_e4m3_rows(w.down_FD)
        return self._expert(gate_up.view(N, 2, B, D), gate_up_scales.view(N, 2, B, -1), down, down_scales,
                            w.gate_up_bias_N2B, dtype=w.dtype, activation=w.activation)

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
        return self._expert(gate_up, gate_up_scales, down_FD, per_row(down_scale_inv.t(), F), None, dtype=dtype, activation=activation)

    def _expert(self, gate_up_N2BD, gate_up_scales_N2BG, down_FD, down_scales_FG, bias_N2B, *, dtype, activation) -> QuantizedExpert:
        N, _, B, D = gate_up_N2BD.shape
        named = {"gate_up": gate_up_N2BD, "gate_up_scales": gate_up_scales_N2BG, "down": down_FD.view(N, B, D),
                 "down_scales": down_scales_FG.view(N, B, -1), "gate_up_bias": bias_N2B}
        parts = self.parts(D, B, dtype, bias_N2B is not None)
        return QuantizedExpert(self, tuple(named[p.name].contiguous() for p in parts), B, D, dtype, activation, bias_N2B is not None)

    def decode(self, q: QuantizedExpert, dtype: torch.dtype) -> SwiGLUWeights:
        named = {p.name: t for p, t in zip(self.parts(q.hidden, q.block, q.dtype, q.biased), q.parts, strict=True)}
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
