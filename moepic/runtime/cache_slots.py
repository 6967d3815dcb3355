"""The device cache's memory: one preallocated pool of top-segment slots per MoE layer, and the
fills still landing in them. Side effects: device allocation, copies (through the copy engine).

A fill is the top of a host-computed miss (hybrid execution) copied into the slot the planner
admitted it to, behind the step's other copies: nothing waits for it until that slot is next read
or written, which `slot` does first. Every access to a slot goes through `slot`, so none reads a
top still landing or overwrites one.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from moepic.cache.layout import LayerCacheLayout
from moepic.core.packing import aligned, flat_views, packed_bytes
from moepic.core.weights import SwiGLUWeights
from moepic.runtime.copy_protocol import CopyEngine, Ticket


class LayerPool:
    """One layer's preallocated cache: `slots` flat top segments on the device."""

    def __init__(self, layout: LayerCacheLayout, like: SwiGLUWeights, device: torch.device) -> None:
        """Slots for top segments stored like the expert `like` (its format, width, dtype, biases)."""
        self.top_bytes = packed_bytes(like, layout.top_neurons)
        # Rows padded so each slot starts aligned for its first part's dtype (core/packing.py).
        self.flat_SX = torch.empty(layout.slots, aligned(self.top_bytes), dtype=torch.uint8, device=device)
        # Views made once: building them on every hit costs more than a small expert's compute.
        self.rows = [self.flat_SX[s, : self.top_bytes] for s in range(layout.slots)]  # each slot's bytes
        self.slots = [flat_views(row, layout.top_neurons, like) for row in self.rows]


class CacheSlots:
    """Every layer's pool (`pools`), and the fills in flight into their slots."""

    def __init__(
        self, layouts: list[LayerCacheLayout], likes: Mapping[int, SwiGLUWeights], device: torch.device, copies: CopyEngine
    ) -> None:
        """Pools for `layouts`, each layer's slots stored like `likes[layer]` (an expert of it)."""
        self.pools = {l.layer: LayerPool(l, likes[l.layer], device) for l in layouts}
        self._copies = copies
        self._fills: dict[tuple[int, int], Ticket] = {}  # (layer, slot) → its fill, until waited for

    def slot(self, layer: int, slot: int) -> SwiGLUWeights:
        """A slot, once a fill still landing in it is done (before it is read or overwritten)."""
        fill = self._fills.pop((layer, slot), None)
        if fill is not None:
            self._copies.wait(fill)
        return self.pools[layer].slots[slot]

    def fill(self, layer: int, slot: int, top: SwiGLUWeights, *, urgent: bool = False) -> int:
        """Copy `top` (host memory) into a slot once the compute issued so far has let go of it: in
        the background, or `urgent` (a split miss's top, computed this step); the bytes it moves."""
        dst = self.slot(layer, slot)
        ranges = list(zip(dst.tensors, top.tensors, strict=True))
        ticket = self._copies.submit(ranges, urgent=urgent, after=self._copies.fence())
        self._fills[layer, slot] = ticket
        return ticket.nbytes

    def settle(self) -> None:
        """Wait for every fill still landing: the slots then hold what the planner says."""
        for layer, slot in list(self._fills):
            self.slot(layer, slot)
