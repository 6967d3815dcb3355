"""The `int4-fused` expert format: 4-bit codes that the host computes from as they are, through
torch's fused CPU int4 matmul (quant/int4_tiles.py), so a hybrid run streams 4.5 bits a weight
from host memory instead of decoding to float first. Pure.

Each row of the kernel's weight — gate's and up's per neuron, down's per hidden unit — is cut
into groups of g weights along the matmul's input (D for gate/up, F for down), each group with a
bfloat16 scale s and offset z: w = (code − 8)·s + z, codes in [0, 15] spanning the group's
[min, max] (as the kernel computes it, and llama.cpp's Q4_1 stores it). Down's groups run along
the neurons, so a segment is cut at multiples of g neurons (and of the kernel's 64-row tiles:
`neuron_multiple`). Kept per neuron block of B neurons, each part's bytes in the kernel's order
for those neurons (shapes as the format seam wants them, neuron-major):

    gate_up         [2, B, D/2]     uint8    the block's gate rows then up rows, in 64-row tiles
    gate_up_scales  [2, B, D/g, 2]  bfloat16 (s, z) per group, laid out [D/g, 2·B, 2]
    down            [B, D/2]        uint8    down's tiles for the block's neurons, [D/r, B, r/2]
    down_scales     [B/g, D, 2]     bfloat16 (s, z) per group of g neurons

so a segment of one block is the kernel's input as it is, and one of several gathers its blocks'
scales and down tiles in whole-block chunks (a few µs). Files keep every part neuron-major in
`CANONICAL` tiles (`part_to_file`), whatever the block and the machine.

Per neuron: 1.5·D bytes of codes + 12·D/g of scales (4.5 bits a weight at g 64). On the host
(CPU tensors, and a torch whose kernel reads this process's layout) `fused_swiglu` runs two
kernel calls on bfloat16 activations — the kernel's fast path; float32 ones take a path 30× slower.
Elsewhere (a GPU) the expert decodes before a matmul, as every format does; the two agree to
bfloat16 rounding, not bit for bit.
"""

from __future__ import annotations

import attrs
import torch

from moepic.core.ffn import gated
from moepic.core.weights import SwiGLUWeights
from moepic.quant.format import EXPERT_FORMATS, ExpertFormat, FormatConfig, PartShape, QuantizedExpert
from moepic.quant.groups import stored_scales
from moepic.quant.int4_tiles import CANONICAL, TileLayout, kernel_layout

SCALE_DTYPE = torch.bfloat16
KERNEL_GROUPS = (32, 64, 128, 256)  # the group sizes torch's kernel takes
TILE_ROWS = 64  # the widest tile any known layout uses (int4_tiles.KNOWN)


def _kernel_group(instance, attribute, value) -> None:
    if value not in KERNEL_GROUPS:
        raise ValueError(f"int4-fused groups are what torch's CPU int4 kernel takes: group_size one of "
                         f"{', '.join(map(str, KERNEL_GROUPS))}, got {value}")


@attrs.frozen
class Int4FusedConfig(FormatConfig):
    group_size: int = attrs.field(default=64, validator=_kernel_group)


def quantize_offset(w_RC: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [R, C] uint8 in [0, 15], (s, z) [R, C/group, 2] bfloat16) with w ≈ (code − 8)·s + z.
    s is the group's span / 15 rounded up to bfloat16 (so the span fits), z = min + 8·s rounded to
    nearest: |w − w'| ≤ s/2 + |z − (min + 8·s)|. A constant group keeps s = 1, z = its value."""
    R, C = w_RC.shape
    w_RGg = w_RC.float().reshape(R, C // group, group)
    low_RG, high_RG = w_RGg.amin(dim=-1), w_RGg.amax(dim=-1)
    span_RG = high_RG - low_RG
    s_RG = stored_scales(span_RG / 15, SCALE_DTYPE)
    z_RG = torch.where(span_RG > 0, low_RG + 8 * s_RG.float(), low_RG).to(SCALE_DTYPE)
    codes = torch.round((w_RGg - z_RG.float()[..., None]) / s_RG.float()[..., None] + 8).clamp(0, 15)
    return codes.reshape(R, C).to(torch.uint8), torch.stack((s_RG, z_RG), dim=-1)


def dequantize_offset(codes_RC: torch.Tensor, sz_RG2: torch.Tensor) -> torch.Tensor:
    """[R, C] float32: (code − 8)·s + z, computed in float32."""
    R, C = codes_RC.shape
    G = sz_RG2.shape[1]
    w_RGg = codes_RC.view(R, G, C // G).to(torch.float32).sub_(8)
    sz = sz_RG2.float()
    return w_RGg.mul_(sz[..., 0:1]).add_(sz[..., 1:2]).view(R, C)


@EXPERT_FORMATS.register("int4-fused", Int4FusedConfig)
class Int4FusedFormat(ExpertFormat):
    config: Int4FusedConfig
    host_kernel = "int4"  # host profiles' int4_expert_gbps

    def __init__(self, config: Int4FusedConfig) -> None:
        super().__init__(config)
        # The layout this process keeps codes in: its kernel's, so the host computes from them as stored.
        self.tiles: TileLayout = kernel_layout() or CANONICAL

    @property
    def neuron_multiple(self) -> int:  # type: ignore[override]  (per config, not per class)
        return max(TILE_ROWS, self.config.group_size)

    def check_shape(self, hidden: int, ffn_size: int, block: int) -> None:
        super().check_shape(hidden, ffn_size, block)
        g = self.config.group_size
        if hidden % g or hidden % TILE_ROWS:
            raise ValueError(f"int4-fused cuts the experts' hidden size {hidden} into groups of {g} and tiles of "
                             f"{TILE_ROWS} rows: it is not a multiple of both")

    def parts(self, hidden: int, block: int, dtype: torch.dtype, biased: bool) -> tuple[PartShape, ...]:
        g = self.config.group_size
        parts = [
            PartShape(name="gate_up_scales", per_block=(2, block, hidden // g, 2), dtype=SCALE_DTYPE, paired=True),
            PartShape(name="down_scales", per_block=(block // g, hidden, 2), dtype=SCALE_DTYPE),
            PartShape(name="gate_up", per_block=(2, block, hidden // 2), dtype=torch.uint8, paired=True),
            PartShape(name="down", per_block=(block, hidden // 2), dtype=torch.uint8),
        ]
        if biased:
            parts.append(PartShape(name="gate_up_bias", per_block=(2, block), dtype=dtype, paired=True))
        return tuple(sorted(parts, key=lambda p: -p.dtype.itemsize))  # aligned when packed (format.py)

    def encode(self, w: SwiGLUWeights) -> QuantizedExpert:
        (N, _, B, D), F, g = w.gate_up_N2BD.shape, w.ffn_size, self.config.group_size
        self.check_shape(D, F, B)
        codes, gate_up_sz = quantize_offset(w.gate_up_N2BD.reshape(-1, D), g)
        down_codes_DF, down_sz_DG2 = quantize_offset(w.down_FD.t(), g)
        named = {
            "gate_up": self.tiles.tile(codes).view(N, 2, B, D // 2),
            "gate_up_scales": gate_up_sz.view(N, 2, B, D // g, 2).permute(0, 3, 1, 2, 4),  # kernel order per block
            "down": _down_blocks(self.tiles.tile(down_codes_DF), B, self.tiles.rows),
            "down_scales": down_sz_DG2.transpose(0, 1),
        }
        if w.gate_up_bias_N2B is not None:
            named["gate_up_bias"] = w.gate_up_bias_N2B
        return self.assemble(named, hidden=D, ffn_size=F, block=B, dtype=w.dtype, activation=w.activation)

    def decode(self, q: QuantizedExpert, dtype: torch.dtype) -> SwiGLUWeights:
        named, (N, B, D) = self.named_parts(q), (q.parts[0].shape[0], q.block, q.hidden)
        G = D // self.config.group_size
        rows = self.tiles.untile(named["gate_up"].reshape(N * 2 * B, D // 2))
        gate_up_sz = named["gate_up_scales"].reshape(N, G, 2, B, 2).permute(0, 2, 3, 1, 4).reshape(N * 2 * B, G, 2)
        gate_up_N2BD = dequantize_offset(rows, gate_up_sz).view(N, 2, B, D)
        down_codes_DF = self.tiles.untile(_down_kernel(named["down"], D, self.tiles.rows))
        down_FD = dequantize_offset(down_codes_DF, named["down_scales"].reshape(-1, D, 2).transpose(0, 1)).t()
        bias = named.get("gate_up_bias")
        return SwiGLUWeights(gate_up_N2BD.to(dtype), down_FD.to(dtype), None if bias is None else bias.to(dtype),
                             q.activation)

    def fused_swiglu(self, x_TD: torch.Tensor, q: QuantizedExpert) -> torch.Tensor | None:
        if x_TD.device.type != "cpu" or kernel_layout() != self.tiles:
            return None
        named, (N, B, D), g = self.named_parts(q), (q.parts[0].shape[0], q.block, q.hidden), self.config.group_size
        T, dtype = x_TD.shape[0], (torch.float16 if x_TD.dtype == torch.float16 else torch.bfloat16)
        kernel = torch.ops.aten._weight_int4pack_mm_for_cpu
        # A segment of several blocks gathers its scales (and down's tiles) into one call's order:
        # chunks of whole blocks, a few µs; a segment of one block is a view.
        gate_up_sz = named["gate_up_scales"].reshape(N, D // g, 2 * B, 2).transpose(0, 1).reshape(D // g, N * 2 * B, 2)
        gate_up = kernel(x_TD.to(dtype).contiguous(), named["gate_up"].reshape(N * 2 * B, D // 2), g, gate_up_sz.to(dtype))
        gate_up_TN2B = gate_up.view(T, N, 2, B)
        if "gate_up_bias" in named:
            gate_up_TN2B = gate_up_TN2B + named["gate_up_bias"].to(dtype)
        h_TF = gated(gate_up_TN2B[:, :, 0], gate_up_TN2B[:, :, 1], q.activation).reshape(T, N * B)
        down_sz = named["down_scales"].reshape(-1, D, 2).to(dtype)
        y_TD = kernel(h_TF.contiguous(), _down_kernel(named["down"], D, self.tiles.rows), g, down_sz)
        return y_TD.to(x_TD.dtype)

    def part_to_file(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """Files keep every part neuron-major (the kernel's order within a block depends on the
        block) and codes in `CANONICAL` tiles."""
        if name == "gate_up_scales":
            N, _, B, G, _ = t.shape
            return t.reshape(N, G, 2, B, 2).permute(0, 2, 3, 1, 4).reshape(t.shape)
        if name == "down":
            N, B, half_D = t.shape
            kernel_DK = self.tiles.retile(_down_kernel(t, 2 * half_D, self.tiles.rows), CANONICAL)
            return _down_blocks(kernel_DK, 1, CANONICAL.rows).view(t.shape)
        return self.tiles.retile(t, CANONICAL) if name == "gate_up" else t

    def part_from_file(self, name: str, t: torch.Tensor) -> torch.Tensor:
        if name == "gate_up_scales":
            return t.permute(0, 3, 1, 2, 4).reshape(t.shape)
        if name == "down":
            N, B, half_D = t.shape
            kernel_DK = CANONICAL.retile(_down_kernel(t.reshape(N * B, 1, half_D), 2 * half_D, CANONICAL.rows), self.tiles)
            return _down_blocks(kernel_DK, B, self.tiles.rows).view(t.shape)
        return CANONICAL.retile(t, self.tiles) if name == "gate_up" else t


def _down_kernel(down: torch.Tensor, hidden: int, rows: int) -> torch.Tensor:
    """Down's blocks [N, B, D/2] (each block's bytes in the kernel's order: [D/r, B, r/2]) → the
    kernel's weight for their N·B neurons, [D, N·B/2] (tiles [D/r, N·B, r/2]): a view for one block."""
    N, B = down.shape[0], down.shape[1]
    return down.reshape(N, hidden // rows, B, rows // 2).transpose(0, 1).reshape(hidden, N * B // 2)


def _down_blocks(kernel_DK: torch.Tensor, block: int, rows: int) -> torch.Tensor:
    """The inverse of `_down_kernel`: the kernel's weight [D, F/2] → blocks of `block` neurons [F/block, block, D/2]."""
    D, F = kernel_DK.shape[0], kernel_DK.shape[1] * 2
    return kernel_DK.reshape(D // rows, F // block, block, rows // 2).transpose(0, 1).reshape(F // block, block, D // 2)
