"""An offloading engine's loads through staging: whole experts and bottoms copied from the host
store into staging buffers, and reassembled there with a cached top. Side effects: copies (through
the copy engine), device-to-device copies.

    plan's load ─start─▶ staging buffer ◀── copy engine (urgent: demand; else a prefetch)
                              └─assemble─▶ one buffer in the compute layout: [top | bottom]
                                           (a partial hit's top from its slot; an admitted miss's
                                           top to its slot)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

import attrs

from moepic.cache.layout import LayerCacheLayout
from moepic.cache.planner import ExpertPlan
from moepic.cache.schedule import Part, demand_room, top_copy
from moepic.core.weights import SwiGLUWeights
from moepic.runtime.cache_slots import CacheSlots
from moepic.runtime.copy_protocol import CopyEngine, Ticket
from moepic.runtime.engine_stats import EngineCounters
from moepic.runtime.host_store import HostExpertStore
from moepic.runtime.staging import MISS, Buffer, StagingPool


@attrs.frozen
class Load:
    """An expert's copy in flight (or done) into a staging buffer."""

    buffer: Buffer
    ticket: Ticket
    part: Part


class StagedLoads:
    """Copies into staging and the reassembly of experts there, for one engine."""

    def __init__(
        self, store: HostExpertStore, staging: StagingPool, copies: CopyEngine, slots: CacheSlots, counters: EngineCounters,
        demand_reserve: int,
    ) -> None:
        self.store, self.staging, self.copies, self.slots, self.counters = store, staging, copies, slots, counters
        self.demand_reserve = demand_reserve

    def ranges(self, layout: LayerCacheLayout, expert: int, part: str, buffer: Buffer):
        if part == "whole":  # a miss: the expert, or its low-bit copy (`cache.miss_format`)
            flat = (self.store.miss_flat if layout.low_bit_misses else self.store.flat)[layout.layer][expert]
            return [(buffer.flat[: flat.numel()], flat)]
        top = layout.top_neurons
        src = self.store.experts[layout.layer][expert].neurons(top, layout.ffn_size)
        dst = buffer.expert(layout.layer).neurons(top, layout.ffn_size)
        return list(zip(dst.tensors, src.tensors, strict=True))

    def start(self, layout: LayerCacheLayout, expert: int, part: str, *, urgent: bool) -> Load:
        buffer = self.staging.acquire(self.copies.settle)
        ticket = self.copies.submit(self.ranges(layout, expert, part, buffer), urgent=urgent, after=buffer.fence)
        if urgent:
            self.counters.demand_bytes += ticket.nbytes
            self.counters.demand_copies += 1
        else:
            self.counters.prefetch_bytes += ticket.nbytes
        return Load(buffer, ticket, part)

    def issue_demand(
        self, layout: LayerCacheLayout, queue: deque[ExpertPlan], loads: dict[int, Load], *, at_least_one: bool = False
    ) -> None:
        """Demand copies from the head of `queue`, at most the demand reserve in flight, so that a
        prompt's many loads leave the prefetch buffers free and the next layer's copies start
        behind this layer's compute (prefill pipelining)."""
        while queue and (demand_room(len(loads), self.demand_reserve) > 0 or at_least_one) and self.staging.free:
            p = queue.popleft()
            loads[p.expert] = self.start(layout, p.expert, p.load, urgent=True)
            at_least_one = False

    def staged(self, layout: LayerCacheLayout, load: Load) -> SwiGLUWeights:
        """A load's staging buffer as the expert it holds: a whole load's low-bit copy where misses
        are served so (`cache.miss_format`), else the expert itself."""
        low_bit = load.part == "whole" and layout.low_bit_misses
        return load.buffer.expert((layout.layer, MISS) if low_bit else layout.layer)

    def assemble(self, layout: LayerCacheLayout, p: ExpertPlan, load: Load) -> SwiGLUWeights:
        """Wait for the expert's copy and complete it in its staging buffer; admit its top if planned."""
        self.copies.wait(load.ticket)
        staged, top = self.staged(layout, load), layout.top_neurons
        direction = top_copy(p, layout)
        if direction == "slot_to_staging":
            self.copy_on_device(staged.neurons(0, top), self.slots.slot(layout.layer, p.slot))
        elif direction == "staging_to_slot":
            self.copy_on_device(self.slots.slot(layout.layer, p.slot), staged.neurons(0, top))
        elif direction == "host_to_slot":
            self.fill_top(layout, p.expert, p.slot)
        return staged

    def fill_top(self, layout: LayerCacheLayout, expert: int, slot: int) -> None:
        """The expert's own top into its slot from the host, behind the step's copies: what the cache
        keeps of a miss served from its low-bit copy."""
        top = self.store.experts[layout.layer][expert].neurons(0, layout.top_neurons)
        self.counters.miss_fill_bytes += self.slots.fill(layout.layer, slot, top)

    def top_then_bottom(self, layout: LayerCacheLayout, p: ExpertPlan, load: Load) -> Iterator[SwiGLUWeights]:
        """A partial hit as two segments: the cached top at once (computed while the bottom is still
        in flight), then the bottom once it has landed. Not bit-exact: the sum of two segments
        rounds differently from one matmul over the whole expert (docs/design.md §2)."""
        yield self.slots.slot(layout.layer, p.slot)
        self.copies.wait(load.ticket)
        yield load.buffer.expert(layout.layer).neurons(layout.top_neurons, layout.ffn_size)

    def copy_on_device(self, dst: SwiGLUWeights, src: SwiGLUWeights) -> None:
        for d, s in zip(dst.tensors, src.tensors, strict=True):
            d.copy_(s, non_blocking=True)
            self.counters.device_copy_bytes += s.numel() * s.element_size()
