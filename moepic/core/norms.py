"""The block norms: RMSNorm, or LayerNorm with a bias (PhiMoE), computed the way the reference
checkpoints were trained with. Pure."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise over the last dim in float32, cast back, then scale (HF/Llama order of operations).

    torch's fused `rms_norm` does the float32 part in one kernel instead of five; keeping the cast
    before the scale preserves the reference rounding in bf16/fp16.
    """
    return weight * rms_normalize(x, eps)


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm without a weight (Llama-4's q/k "L2" norm): normalised in float32, cast back."""
    return F.rms_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)


def block_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, kind: str, eps: float) -> torch.Tensor:
    """A block's (or the final) norm of the model's `kind` (spec.ModelSpec.norm): RMSNorm, or
    LayerNorm with its bias, in the activations' dtype as HF's nn.LayerNorm runs it."""
    if kind == "rms":
        return rms_norm(x, weight, eps)
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)
