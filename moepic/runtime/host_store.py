"""Routed experts in host memory, each packed in one flat buffer. Side effects: allocation, pinning.

    flat expert [3·F·D] = [ gate_up_N2BD (2·F·D) | down_FD (F·D) ]

The two matrices are views into the buffer in the core's compute layout, so a whole expert moves
to the device in one copy, straight into a buffer of the same layout, and runs unchanged. A neuron
segment [a, b) is two contiguous ranges, its gate/up blocks and its down rows: θ can change per
layer at any time without repacking (a segment is a slice, never a repack). On a CUDA machine the
buffers are pinned, which is what lets host→device copies run asynchronously at full bandwidth.
"""

from __future__ import annotations

import torch

from moepic.core.weights import ModelWeights, MoEWeights, SwiGLUWeights


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


class HostExpertStore:
    """Every routed expert of a model as a flat host buffer, addressed by (layer, expert)."""

    def __init__(self, weights: ModelWeights, *, pin_memory: bool = False) -> None:
        """Adopts experts that are already packed (see `pack_expert`; no copy); packs the others."""
        self.experts: dict[int, tuple[SwiGLUWeights, ...]] = {}
        self.flat: dict[int, tuple[torch.Tensor, ...]] = {}
        for layer, lw in enumerate(weights.layers):
            if not isinstance(lw.ffn, MoEWeights):
                continue
            packed = []
            for w in lw.ffn.experts:
                flat = flat_buffer(w)
                if flat is None or flat.device.type != "cpu" or (pin_memory and not flat.is_pinned()):
                    w = pack_expert(_to_cpu(w), pin_memory=pin_memory)
                    flat = flat_buffer(w)
                packed.append((w, flat))
            self.experts[layer] = tuple(w for w, _ in packed)
            self.flat[layer] = tuple(f for _, f in packed)

    @property
    def pinned(self) -> bool:
        return all(f.is_pinned() for layer in self.flat.values() for f in layer)


def _to_cpu(w: SwiGLUWeights) -> SwiGLUWeights:
    return SwiGLUWeights(w.gate_up_N2BD.cpu(), w.down_FD.cpu())
