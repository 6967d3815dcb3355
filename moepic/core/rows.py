"""Matmuls over tokens whose every row is what it would be alone. Pure.

A decode step over several sequences (core/model.py `decode_step`) must compute each sequence's
token exactly as its sequence alone would, bit for bit: a server's batch may not change anyone's
output. A matmul over T rows does not promise that: BLAS picks its kernel and blocking by T (on
this CPU F.linear over 8 rows rounds some of them differently from the same rows one at a time),
and neither does a batched matmul of one-row products, whose kernel choice depends on the batch
too. So each row runs through the very op a lone row runs through, one call per row: the same
kernel on the same shapes, whatever the hardware. Reductions along a row go the same way
(`per_row`): on this CPU a sum over a router's 3 weights rounds differently with 4 rows than with 1. (A faster batch-invariant kernel can replace
the loop here, and only here.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear(x_TK: torch.Tensor, w_NK: torch.Tensor, bias_N: torch.Tensor | None = None, *, rowwise: bool = False) -> torch.Tensor:
    """F.linear(x, w, bias); `rowwise`: each row computed as if alone."""
    if not rowwise or x_TK.shape[0] == 1:
        return F.linear(x_TK, w_NK, bias_N)
    return torch.cat([F.linear(row_1K, w_NK, bias_N) for row_1K in each(x_TK)])


def matmul(x_TK: torch.Tensor, w_KN: torch.Tensor, *, rowwise: bool = False) -> torch.Tensor:
    """x @ w; `rowwise`: each row computed as if alone."""
    if not rowwise or x_TK.shape[0] == 1:
        return x_TK @ w_KN
    return torch.cat([row_1K @ w_KN for row_1K in each(x_TK)])


def per_row(fn, x_TK: torch.Tensor, *, rowwise: bool = True) -> torch.Tensor:
    """fn(x) with, under `rowwise`, each row through `fn` alone: for reductions along a row (a norm,
    a router's weights over k experts), which a kernel may order by how many rows there are."""
    if not rowwise or x_TK.shape[0] == 1:
        return fn(x_TK)
    return torch.cat([fn(row_1K) for row_1K in each(x_TK)])


def each(x_TK: torch.Tensor) -> list[torch.Tensor]:
    """Each row as a tensor of its own: a fresh allocation, aligned as a lone row would be (a
    matmul may round an input off its usual alignment differently)."""
    return [x_TK[t : t + 1].clone() for t in range(x_TK.shape[0])]
