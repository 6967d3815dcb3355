"""Block-scaled FP8 weights, as DeepSeek-V3 and Qwen3-FP8 checkpoints ship them: an e4m3 matrix
and one float32 scale per block of rows × columns (128 × 128), `weight_scale_inv`. Pure.

    weight [R, C] float8_e4m3fn ─┐
    scale_inv [⌈R/128⌉, ⌈C/128⌉] ─┴─▶ weight · scale_inv[r // 128, c // 128]  [R, C] in a dtype

Dequantised as HF transformers does (both cast to the target dtype, then multiplied in it), so the
weights are HF's bit for bit. The `fp8` expert format (quant/fp8.py) keeps routed experts so.
"""

from __future__ import annotations

import torch

BLOCK = (128, 128)


def fp8_available() -> bool:
    return hasattr(torch, "float8_e4m3fn")


def dequantize_fp8_blocks(
    weight_RC: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.bfloat16, block: tuple[int, int] = BLOCK
) -> torch.Tensor:
    if not fp8_available():
        raise ValueError(f"FP8 weights need a torch with float8 dtypes; this torch is {torch.__version__}")
    if weight_RC.dtype != torch.float8_e4m3fn:
        raise ValueError(f"FP8 weights must be float8_e4m3fn, got {weight_RC.dtype}")
    R, C = weight_RC.shape
    expected = (-(-R // block[0]), -(-C // block[1]))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"FP8 scales {list(scale_inv.shape)} do not match weights {[R, C]} in {block[0]}×{block[1]} "
                         f"blocks: expected {list(expected)}")
    scale_RC = scale_inv.to(dtype).repeat_interleave(block[0], dim=0)[:R].repeat_interleave(block[1], dim=1)[:, :C]
    return weight_RC.to(dtype) * scale_RC


E4M3_MAX = 448.0


def quantize_e4m3_rows(w_RC: torch.Tensor, group: int = BLOCK[1]) -> tuple[torch.Tensor, torch.Tensor]:
    """`w_RC` as e4m3 values and a float32 scale per row and `group` columns (the last group may be
    shorter): scale = max|w| / 448, values w / scale rounded to nearest e4m3 (a zero group: scale 1)."""
    R, C = w_RC.shape
    groups = -(-C // group)
    padded = torch.nn.functional.pad(w_RC.float(), (0, groups * group - C)).view(R, groups, group)
    scales_RG = padded.abs().amax(dim=-1) / E4M3_MAX
    scales_RG = torch.where(scales_RG > 0, scales_RG, torch.ones_like(scales_RG))
    # clamped: a value rounding a hair past 448 would become NaN (e4m3fn has no infinity)
    values = (padded / scales_RG[..., None]).clamp(-E4M3_MAX, E4M3_MAX).view(R, groups * group)[:, :C]
    return values.to(torch.float8_e4m3fn), scales_RG
