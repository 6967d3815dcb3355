"""The weight layout of torch's fused CPU int4 matmul (`aten._weight_int4pack_mm_for_cpu`): how
the `int4-fused` format (quant/int4_fused.py) lays out its codes so the host computes from them
as they are. Pure, but for `kernel_layout`'s one probe of torch.

The kernel reads a weight of N rows (outputs) by K columns (inputs) of 4-bit codes as tiles of
`rows` rows, [N/rows, K, rows/2] bytes: byte j of tile t at column k holds two rows' codes, low
nibble first. Which two depends on the CPU capability torch dispatches to:

    AVX-512   rows 64, halves       (row t·64 + j, row t·64 + j + 32)
    AVX2      rows 32, halves       (row t·32 + j, row t·32 + j + 16)
    generic   rows 32, interleaved  (row t·32 + 2j, row t·32 + 2j + 1)

so one process probes which it is (`kernel_layout`), and files keep `CANONICAL` (AVX-512's), tiled
anew on load where the machine's differs.
"""

from __future__ import annotations

import functools

import attrs
import torch


@attrs.frozen
class TileLayout:
    rows: int
    interleaved: bool

    def tile(self, codes_NK: torch.Tensor) -> torch.Tensor:
        """Codes [..., N, K] (integers in [0, 15]) → the kernel's bytes, viewed [..., N, K/2] uint8."""
        *lead, N, K = codes_NK.shape
        self._check(N, K)
        tiles = codes_NK.to(torch.uint8).reshape(*lead, N // self.rows, self.rows, K).transpose(-1, -2)
        half = self.rows // 2
        low, high = (tiles[..., 0::2], tiles[..., 1::2]) if self.interleaved else (tiles[..., :half], tiles[..., half:])
        return (low | (high << 4)).reshape(*lead, N, K // 2)

    def untile(self, packed: torch.Tensor) -> torch.Tensor:
        """The inverse of `tile`: [..., N, K/2] uint8 → codes [..., N, K] uint8."""
        *lead, N, half_K = packed.shape
        K = 2 * half_K
        self._check(N, K)
        p = packed.reshape(*lead, N // self.rows, K, self.rows // 2)
        low, high = p & 0x0F, p >> 4
        rows = torch.stack((low, high), dim=-1).flatten(-2) if self.interleaved else torch.cat((low, high), dim=-1)
        return rows.transpose(-1, -2).reshape(*lead, N, K)

    def retile(self, packed: torch.Tensor, to: TileLayout) -> torch.Tensor:
        """Bytes in this layout → the same codes in layout `to` (a no-op when they agree)."""
        return packed if to == self else to.tile(self.untile(packed))

    def _check(self, N: int, K: int) -> None:
        if N % self.rows or K % 2:
            raise ValueError(f"int4 tiles of {self.rows} rows need a multiple of {self.rows} rows and an even number "
                             f"of columns, got [{N}, {K}]")


# What files keep: AVX-512's layout, the one most hosts that run experts (servers, recent desktops) use.
CANONICAL = TileLayout(64, interleaved=False)
KNOWN = (CANONICAL, TileLayout(32, interleaved=False), TileLayout(32, interleaved=True))


@functools.cache
def kernel_layout() -> TileLayout | None:
    """The layout this process's torch kernel reads, found by tiling probe codes as torch's own
    converter does; None where this torch has no such kernel or lays codes out otherwise (the
    format then decodes before a matmul, as the other formats do)."""
    convert = getattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", None)
    if convert is None or not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return None
    codes = torch.randint(0, 16, (128, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    try:
        theirs = convert(codes, 1)
    except RuntimeError:
        return None
    return next((layout for layout in KNOWN if torch.equal(layout.tile(codes), theirs)), None)
