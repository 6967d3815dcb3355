"""A routed expert packed in one flat byte buffer: the layout the host store keeps, the checkpoint
loader reads into, the device cache's slots and the staging buffers hold, and copies move. Pure,
but for the one side effect a caller asks for: pinning the host memory it allocates (`pin_memory`).

    flat expert [bytes] = [ part 0 | part 1 | … ]    the stored expert's tensors (`.tensors`), in order
    dense:     [ gate_up_N2BD (2·F·D) | down_FD (F·D) | gate_up_bias_N2B (2·F) ]   (biases: GPT-OSS)
    quantized: the parts its format lists (moepic/quant/format.py): scales, codes, …

Every tensor is a view into the buffer in the layout the expert is computed from, so a whole
expert moves to the device in one copy, straight into a buffer of the same layout, and runs
unchanged. Each tensor's leading dimension counts neurons (or neuron blocks), so a neuron segment
[a, b) is one contiguous range of each (`.neurons`): θ can change per layer at any time without
repacking (a segment is a slice, never a repack). A format orders its parts by falling itemsize,
so every part starts aligned for its dtype once the buffer's start is (`ALIGN`).
"""

from __future__ import annotations

from math import prod

import torch

# Bytes a packed expert's start is aligned to where several share one allocation (cache slots).
ALIGN = 16


def segment_shapes(like, ffn_size: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of each tensor of `ffn_size` neurons of an expert stored like `like`."""
    F = like.ffn_size
    return [((t.shape[0] * ffn_size // F, *t.shape[1:]), t.dtype) for t in like.tensors]


def packed_bytes(like, ffn_size: int) -> int:
    """Bytes `ffn_size` neurons of an expert stored like `like` take packed (a whole expert, or its top)."""
    return sum(prod(shape) * dtype.itemsize for shape, dtype in segment_shapes(like, ffn_size))


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def flat_views(flat: torch.Tensor, ffn_size: int, like):
    """The expert stored in the byte buffer `flat` (`ffn_size` neurons: a whole expert, or the top
    of one), stored like `like` (its format, width, dtype, biases and activation)."""
    if flat.dtype != torch.uint8:
        raise TypeError(f"a packed expert is a byte buffer, got {flat.dtype}")
    views, offset = [], 0
    for shape, dtype in segment_shapes(like, ffn_size):
        nbytes = prod(shape) * dtype.itemsize
        views.append(flat[offset : offset + nbytes].view(dtype).view(shape))
        offset += nbytes
    return like.with_tensors(tuple(views))


def pack_expert(w, *, pin_memory: bool = False):
    """`w` copied into one flat host byte buffer (pinned if asked); its tensors are views into it."""
    flat = torch.empty(packed_bytes(w, w.ffn_size), dtype=torch.uint8, pin_memory=pin_memory)
    packed = flat_views(flat, w.ffn_size, w)
    for dst, src in zip(packed.tensors, w.tensors, strict=True):
        dst.copy_(src)
    return packed


def flat_buffer(w) -> torch.Tensor | None:
    """The flat byte buffer behind a packed expert, or None if its tensors are not laid out that way."""
    tensors = w.tensors
    if not all(t.is_contiguous() and t.device == tensors[0].device for t in tensors):
        return None
    for before, after in zip(tensors, tensors[1:]):
        if after.data_ptr() != before.data_ptr() + before.numel() * before.element_size():
            return None
    first = tensors[0].reshape(-1).view(torch.uint8)
    return torch.as_strided(first, (sum(t.numel() * t.element_size() for t in tensors),), (1,))

