"""A routed expert packed in one flat buffer: the layout the host store keeps, the checkpoint loader
reads into and the device copies. Pure, but for the one side effect a caller asks for: pinning the
host memory it allocates (`pin_memory`).

    flat expert [3·F·D] = [ gate_up_N2BD (2·F·D) | down_FD (F·D) ]

The two matrices are views into the buffer in the core's compute layout, so a whole expert moves
to the device in one copy, straight into a buffer of the same layout, and runs unchanged. A neuron
segment [a, b) is two contiguous ranges, its gate/up blocks and its down rows: θ can change per
layer at any time without repacking (a segment is a slice, never a repack).
"""

from __future__ import annotations

import torch

from moepic.core.weights import SwiGLUWeights


def flat_views(flat: torch.Tensor, ffn_size: int, block: int, hidden: int) -> SwiGLUWeights:
    """The expert stored in `flat` ([3·F·D] for F = ffn_size, or the top F neurons of one)."""
    split = 2 * ffn_size * hidden
    return SwiGLUWeights(
        flat[:split].view(ffn_size // block, 2, block, hidden), flat[split : 3 * ffn_size * hidden].view(ffn_size, hidden)
    )


def pack_expert(w: SwiGLUWeights, *, pin_memory: bool = False) -> SwiGLUWeights:
    """`w` copied into one flat host buffer (pinned if asked); its matrices are views into it."""
    F, D = w.down_FD.shape
    flat = torch.empty(3 * F * D, dtype=w.down_FD.dtype, pin_memory=pin_memory)
    packed = flat_views(flat, F, w.block, D)
    packed.gate_up_N2BD.copy_(w.gate_up_N2BD)
    packed.down_FD.copy_(w.down_FD)
    return packed


def flat_buffer(w: SwiGLUWeights) -> torch.Tensor | None:
    """The flat buffer behind a packed expert, or None if its matrices are not laid out that way."""
    gate_up, down = w.gate_up_N2BD, w.down_FD
    if not (gate_up.is_contiguous() and down.is_contiguous()) or gate_up.device != down.device:
        return None
    if down.data_ptr() != gate_up.data_ptr() + gate_up.numel() * gate_up.element_size():
        return None
    return torch.as_strided(gate_up, (gate_up.numel() + down.numel(),), (1,))
