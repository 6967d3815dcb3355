"""A routed expert packed in one flat buffer: the layout the host store keeps, the checkpoint loader
reads into and the device copies. Pure, but for the one side effect a caller asks for: pinning the
host memory it allocates (`pin_memory`).

    flat expert [F·(3·D + 2)] = [ gate_up_N2BD (2·F·D) | down_FD (F·D) | gate_up_bias_N2B (2·F) ]
                                                                          └ only where experts have biases

The tensors are views into the buffer in the core's compute layout, so a whole expert moves to the
device in one copy, straight into a buffer of the same layout, and runs unchanged. A neuron
segment [a, b) is one contiguous range of each tensor (`SwiGLUWeights.neurons`): θ can change per
layer at any time without repacking (a segment is a slice, never a repack).
"""

from __future__ import annotations

import torch

from moepic.core.weights import SwiGLUWeights


def neuron_numbers(hidden: int, biased: bool) -> int:
    """Numbers one neuron of an expert takes: its gate, up and down rows (and gate/up biases)."""
    return 3 * hidden + (2 if biased else 0)


def flat_views(flat: torch.Tensor, ffn_size: int, block: int, like: SwiGLUWeights) -> SwiGLUWeights:
    """The expert stored in `flat` ([F·neuron_numbers] for F = ffn_size: a whole expert, or the
    top F neurons of one), shaped like `like` (its width, biases and activation)."""
    hidden, biased = like.down_FD.shape[1], like.gate_up_bias_N2B is not None
    gate_up_end, down_end = 2 * ffn_size * hidden, 3 * ffn_size * hidden
    blocks = ffn_size // block
    return SwiGLUWeights(
        flat[:gate_up_end].view(blocks, 2, block, hidden),
        flat[gate_up_end:down_end].view(ffn_size, hidden),
        flat[down_end : down_end + 2 * ffn_size].view(blocks, 2, block) if biased else None,
        like.activation,
    )


def pack_expert(w: SwiGLUWeights, *, pin_memory: bool = False) -> SwiGLUWeights:
    """`w` copied into one flat host buffer (pinned if asked); its tensors are views into it."""
    F, D = w.down_FD.shape
    flat = torch.empty(F * neuron_numbers(D, w.gate_up_bias_N2B is not None), dtype=w.down_FD.dtype, pin_memory=pin_memory)
    packed = flat_views(flat, F, w.block, w)
    for dst, src in zip(packed.tensors, w.tensors, strict=True):
        dst.copy_(src)
    return packed


def flat_buffer(w: SwiGLUWeights) -> torch.Tensor | None:
    """The flat buffer behind a packed expert, or None if its tensors are not laid out that way."""
    tensors = w.tensors
    if not all(t.is_contiguous() and t.device == tensors[0].device for t in tensors):
        return None
    for before, after in zip(tensors, tensors[1:]):
        if after.data_ptr() != before.data_ptr() + before.numel() * before.element_size():
            return None
    return torch.as_strided(tensors[0], (sum(t.numel() for t in tensors),), (1,))

