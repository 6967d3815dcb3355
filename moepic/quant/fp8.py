"""Block-scaled FP8 weights, as DeepSeek-V3 and Qwen3-FP8 checkpoints ship them: an e4m3 matrix
and one float32 scale per block of rows × columns (128 × 128), `weight_scale_inv`. Pure.

    weight [R, C] float8_e4m3fn ─┐
    scale_inv [⌈R/128⌉, ⌈C/128⌉] ─┴─▶ weight · scale_inv[r // 128, c // 128]  [R, C] in a dtype

Dequantised as HF transformers does (both cast to the target dtype, then multiplied in it), so the
weights are HF's bit for bit.
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
