"""RMSNorm, computed the way the reference checkpoints were trained with. Pure."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise over the last dim in float32, cast back, then scale (HF/Llama order of operations).

    torch's fused `rms_norm` does the float32 part in one kernel instead of five; keeping the cast
    before the scale preserves the reference rounding in bf16/fp16.
    """
    normed = F.rms_norm(x.float(), x.shape[-1:], eps=eps)
    return weight * normed.to(x.dtype)
