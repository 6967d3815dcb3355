"""SwiGLU feed-forward, whole or as neuron segments. Pure.

A SwiGLU expert is a sum over its neurons, so cutting it along F into segments and adding the
segments' outputs computes the same function (docs/design.md §2):
    y = Σ_s down_s · (silu(gate_s·x) ⊙ up_s·x)
The split only reorders a sum, so results agree to floating-point rounding, not bit for bit.
A gate/up bias belongs to its neuron and splits with it; a down bias is added once per expert,
after the segments' sum (core/moe.py), never once per segment.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs
import torch
import torch.nn.functional as F

from moepic.core import rows
from moepic.core.spec import GatedActivation
from moepic.core.weights import SwiGLUWeights


def gated(gate: torch.Tensor, up: torch.Tensor, act: GatedActivation) -> torch.Tensor:
    """The activation of each neuron from its gate and up values (spec.GatedActivation)."""
    if act.is_silu:
        return F.silu(gate) * up
    if act.limit is not None:  # in GPT-OSS's order, so that its rounding is too
        gate = gate.clamp(max=act.limit)
        up = up.clamp(min=-act.limit, max=act.limit)
    return (up + act.up_offset) * (gate * torch.sigmoid(gate * act.alpha))


def swiglu(x_TD: torch.Tensor, w: SwiGLUWeights, *, rowwise: bool = False) -> torch.Tensor:
    """The FFN's output without any down bias (that is the expert's, not a segment's: core/moe.py).
    An expert stored quantized is decoded here, right before its matmuls (`dense`), unless its
    format computes from the stored bytes on this device (`fused_swiglu`). `rowwise`: each token
    computed as it would be alone (core/rows.py: tokens of different sequences)."""
    T = x_TD.shape[0]
    if rowwise and T > 1:
        first = w.fused_swiglu(x_TD[:1])
        if first is not None:  # a fused kernel promises nothing across rows: one row at a time
            return torch.cat([first, *(w.fused_swiglu(x_TD[t : t + 1]) for t in range(1, T))])
    else:
        fused = w.fused_swiglu(x_TD)
        if fused is not None:
            return fused
    w = w.dense()
    if w.dtype != x_TD.dtype:  # a quantized expert decoded for a faster kernel (quant/format.py kernel_dtype)
        return swiglu(x_TD.to(w.dtype), w, rowwise=rowwise).to(x_TD.dtype)
    N, _, B, D = w.gate_up_N2BD.shape
    bias = None if w.gate_up_bias_N2B is None else w.gate_up_bias_N2B.reshape(2 * N * B)
    gate_up_TN2B = rows.linear(x_TD, w.gate_up_N2BD.view(2 * N * B, D), bias, rowwise=rowwise).view(T, N, 2, B)
    h_TF = gated(gate_up_TN2B[:, :, 0], gate_up_TN2B[:, :, 1], w.activation).reshape(T, N * B)
    return rows.matmul(h_TF, w.down_FD, rowwise=rowwise)


@attrs.frozen(eq=False)
class SegmentOutput:
    """A segment of an expert computed elsewhere (on the host, say), handed back as its output:
    [T, D] for the T tokens the expert is computed for, in their order, unweighted."""

    y_TD: torch.Tensor


def swiglu_segments(
    x_TD: torch.Tensor, segments: Iterable[SwiGLUWeights | SegmentOutput], *, rowwise: bool = False
) -> torch.Tensor:
    """One expert given as neuron segments (e.g. a cached top and a freshly loaded bottom), each
    as weights to compute here or as an output computed elsewhere; their outputs are summed.

    Segments are taken one at a time, so a source may hand out the next one only when it is ready
    (the top is computed while the bottom is still being copied)."""
    y_TD = None
    for segment in segments:
        if isinstance(segment, SegmentOutput):
            if segment.y_TD.shape != x_TD.shape:  # metadata only: no device sync
                raise ValueError(f"a segment's output is {tuple(segment.y_TD.shape)}, its tokens' input {tuple(x_TD.shape)}")
            term = segment.y_TD
        elif segment.ffn_size == 0:
            continue
        else:
            term = swiglu(x_TD, segment, rowwise=rowwise)
        y_TD = term if y_TD is None else y_TD + term
    if y_TD is None:
        raise ValueError("an expert needs at least one non-empty neuron segment")
    return y_TD


def split_expert(expert: SwiGLUWeights, top_neurons: int) -> tuple[SwiGLUWeights, SwiGLUWeights]:
    """(top, bottom): neurons [0, top_neurons) and [top_neurons, F). Either may be empty.

    `top_neurons` must be a multiple of the expert's neuron block (see `top_neurons_for`).
    """
    return expert.neurons(0, top_neurons), expert.neurons(top_neurons, expert.ffn_size)


def top_neurons_for(theta: float, ffn_size: int, block: int = 1) -> int:
    """Neurons in the top segment for split ratio θ, rounded down to whole neuron blocks."""
    if not 0.0 <= theta <= 1.0:
        raise ValueError(f"split ratio theta must be in [0, 1], got {theta}")
    return min(ffn_size, int(theta * ffn_size) // block * block)
