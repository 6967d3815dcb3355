"""Small builders shared by tests."""

from __future__ import annotations

import torch

from moepic.core.weights import SwiGLUWeights


def random_expert(D: int, F: int, seed: int, dtype=torch.float32) -> SwiGLUWeights:
    g = torch.Generator().manual_seed(seed)
    return SwiGLUWeights(
        gate_FD=torch.randn(F, D, generator=g, dtype=dtype),
        up_FD=torch.randn(F, D, generator=g, dtype=dtype),
        down_FD=torch.randn(F, D, generator=g, dtype=dtype) / F**0.5,
    )


def random_expert_set(E: int, D: int, F: int, seed: int) -> list[SwiGLUWeights]:
    return [random_expert(D, F, seed * 1000 + e) for e in range(E)]
