"""Staging buffers: where loaded experts land before they run. Side effects: device allocation.

A fixed set of whole-expert buffers in the compute layout, handed out and taken back:

    acquire() ─▶ copy into it ─▶ wait ─▶ compute reads it ─▶ release(fence) ─▶ free again

A released buffer may still be read by queued compute (CUDA) or written by a copy whose result
nobody wanted (a wasted prefetch): `release` records what must finish first (a compute fence, a
ticket), and the next copy into the buffer waits for it. So no buffer is overwritten while in use.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Mapping

import attrs
import torch

from moepic.core.packing import flat_views, packed_bytes
from moepic.core.weights import SwiGLUWeights
from moepic.runtime.copy_protocol import Ticket


# A staging view's key for a layer's low-bit copies (`cache.miss_format`): (layer, MISS).
MISS = "miss"


@attrs.define(eq=False)
class Buffer:
    index: int
    flat: torch.Tensor
    # MoE layer → `flat` viewed as that layer's stored expert (quantized: QuantizedExpert); (layer, MISS) → as its low-bit copy
    views: dict[Hashable, SwiGLUWeights]
    fence: object = None  # CUDA event compute recorded when it let go (None on the CPU)
    pending: Ticket | None = None  # a copy into it that may still be running (a dropped prefetch)

    def expert(self, key: Hashable) -> SwiGLUWeights:
        """The buffer as an expert of layer `key` (layers may store experts in different formats),
        or as a low-bit copy of one (`(layer, MISS)`)."""
        return self.views[key]


class StagingPool:
    def __init__(self, count: int, likes: Mapping[Hashable, SwiGLUWeights], device: torch.device) -> None:
        """`count` buffers, each holding any one whole expert of the kinds in `likes` (a layer, or
        (layer, MISS) → an expert stored as those are: format, width, dtype, biases), sized for the largest."""
        self.buffers = []
        nbytes = max(packed_bytes(like, like.ffn_size) for like in likes.values())
        for i in range(count):
            flat = torch.empty(nbytes, dtype=torch.uint8, device=device)
            views = {layer: flat_views(flat, like.ffn_size, like) for layer, like in likes.items()}
            self.buffers.append(Buffer(i, flat, views))
        self._free: deque[Buffer] = deque(self.buffers)
        self.in_use = 0
        self.peak_in_use = 0

    @property
    def free(self) -> int:
        return len(self._free)

    def acquire(self, settle) -> Buffer:
        """A free buffer. If a dropped prefetch may still be writing into it, `settle(ticket)` makes
        it safe (CPU: waits for the copy; CUDA: returns the copy's event, the buffer's new fence)."""
        if not self._free:
            raise RuntimeError(f"all {len(self.buffers)} staging buffers are in use (a sizing bug in the engine)")
        buffer = self._free[0]
        if buffer.pending is not None:  # a wasted prefetch may still be landing here
            fence = settle(buffer.pending)  # if it raises, the buffer stays free (and pending)
            buffer.pending = None
            if fence is not None:
                buffer.fence = fence
        self._free.popleft()
        self.in_use += 1
        self.peak_in_use = max(self.peak_in_use, self.in_use)
        return buffer

    def release(self, buffer: Buffer, *, fence: object = None, pending: Ticket | None = None) -> None:
        if buffer in self._free:
            raise RuntimeError(f"staging buffer {buffer.index} released twice")
        buffer.fence, buffer.pending = fence, pending
        self.in_use -= 1
        self._free.append(buffer)
