"""The offloading engine: an ExpertSource that keeps routed experts in host memory, a per-layer
device cache of their top segments, and copies the rest ahead of need. Side effects: device
allocation and copies (through the copy engine, the only owner of streams and threads).

    layer l routes ─▶ residency_step (pure planner + policy) ─▶ plan
        ├─ predictor ─▶ later layers' experts ─▶ prefetch (bottom if top cached, else whole) ─┐ copy engine,
        └─ plan's loads not prefetched ─▶ demand copies (urgent) ────────────────────────────┘ async
    per routed expert, in order:
        hit       slot holds the whole expert (θ = 1) ─────────────────────────▶ computed in place
        partial   wait bottom; top slot ─D2D─▶ staging ─────────────────────────▶ computed in staging
        miss      wait whole;  [admitted: staging top ─D2D─▶ slot] ─────────────▶ computed in staging
    with `hybrid` on, each demand load is first placed (cache/placement.py): copied as above, or
    computed on the host (runtime/host_compute.py) where its weights are, handed out last:
        host bottom   top computed in its slot; the bottom's output from the host ─▶ summed
        host whole    the expert's output from the host; [admitted: host top ─fill─▶ slot, not urgent]

Every expert is computed from one buffer in the compute layout, reassembled from its segments,
so the kernels see the same shapes and values as in the dense model: offloaded results equal the
dense model's bit for bit, whatever the policy, budget, θ, predictor or link. `overlap_top` trades
that for overlap (docs/design.md §2): a partial hit's cached top is computed while its bottom is
still in flight, and the two segments' outputs are summed (equal to the dense model up to
floating-point rounding, not bit for bit). So does hybrid execution: the host computes the same
expert from the same bytes, but its share of the sum is computed apart.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Sequence

import attrs
import numpy as np
import torch

from moepic.cache.layout import CacheLayout, LayerCacheLayout, plan_layout, staging_buffers
from moepic.cache.placement import Hybrid, Placement, check_mode, settle_fills
from moepic.cache.planner import FREE, ExpertPlan, LayerPlan, LayerResidency, initial_residency, residency_step
from moepic.cache.schedule import (
    PrefetchTarget, admission_candidates, admitted_top_copy, demand_loads, demand_reserve, plan_prefetches,
    prefetch_fates, prefetch_room,
)
from moepic.core.ffn import SegmentOutput
from moepic.core.model import Model
from moepic.core.weights import ModelWeights, MoEWeights, SwiGLUWeights
from moepic.perfmodel.host_costs import HostPricing, check_priceable
from moepic.policies.base import CachePolicy, PolicyConfig, build_policy
from moepic.predictors import PREDICTORS, PredictorConfig
from moepic.predictors.base import NoPredictor, Predictor
from moepic.quant import ExpertFormat, format_of
from moepic.quant.format import check_miss_format
from moepic.runtime.copy_engine import Link, copy_engine_for
from moepic.runtime.copy_protocol import CopyEngine
from moepic.runtime.cache_slots import CacheSlots
from moepic.runtime.engine_stats import EngineCounters
from moepic.runtime.host_compute import HostBatch
from moepic.runtime.host_share import HostShare
from moepic.runtime.host_store import HostExpertStore
from moepic.runtime.staged_loads import Load, StagedLoads
from moepic.runtime.staging import MISS, StagingPool


class OffloadedExperts:
    """Routed experts served from host memory through a device cache planned by a policy."""

    def __init__(
        self,
        weights: ModelWeights,
        layout: CacheLayout,
        policy: CachePolicy,
        *,
        device: str | torch.device,
        predictor: Predictor | None = None,
        link: Link | None = None,
        store: HostExpertStore | None = None,
        overlap_top: bool = False,
        hybrid: Hybrid = "off",
        pricing: HostPricing | None = None,
        host_threads: int | None = None,
        miss_format: ExpertFormat | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.layout, self.policy = layout, policy
        self.overlap_top = overlap_top
        check_mode(hybrid, pricing is not None)  # before anything is allocated
        if hybrid == "off" and host_threads is not None:
            raise ValueError("host threads have no effect with hybrid off: nothing is computed on the host")
        self.predictor = predictor or NoPredictor()
        _check_miss_format(layout, miss_format, hybrid)
        self.store = store if store is not None else HostExpertStore(
            weights, pin_memory=self.device.type == "cuda", miss_format=miss_format)
        # An expert of each MoE layer: a layer's experts share one shape and format (layers may differ).
        likes = {layer: experts[0] for layer, experts in self.store.experts.items()}
        self._layouts = {l.layer: l for l in layout.layers}
        for layer, like in likes.items():
            _check_planned(self._layouts[layer], like, layout.dtype_bytes)
        likes |= {(layer, MISS): experts[0] for layer, experts in self.store.miss_experts.items()}
        self.staging = StagingPool(layout.staging_experts, likes, self.device)
        self.copies: CopyEngine = copy_engine_for(self.device, link)
        self.slots = CacheSlots(layout.layers, likes, self.device, self.copies)
        self.pools = self.slots.pools
        self.counters = EngineCounters(layout)
        self.residency: dict[int, LayerResidency] = {l.layer: initial_residency(policy, l) for l in layout.layers}
        self.preload_bytes = 0  # before the run: layers with room for every whole expert start full
        for l in layout.layers:
            for s, e in enumerate(self.residency[l.layer].cache.slots_S):
                if e != FREE:
                    self.pools[l.layer].rows[s].copy_(self.store.flat[l.layer][e], non_blocking=True)
                    self.preload_bytes += l.expert_bytes
        self._clock = {l.layer: 0 for l in layout.layers}  # tokens each layer has routed
        self._step_clock = 0  # the clock of the step in progress
        self._predictor_state = self.predictor.init()
        self._prefetched: dict[int, dict[int, Load]] = {l.layer: {} for l in layout.layers}
        self._predicted: dict[int, set[int]] = {}  # what the predictor named for each later layer
        self._new_request: set[int] = set()
        self._demand_reserve = demand_reserve(layout.staging_experts, self.predictor)
        self.loads = StagedLoads(self.store, self.staging, self.copies, self.slots, self.counters, self._demand_reserve)
        # Last: it may set torch's thread count, which `close` restores.
        self.host = HostShare(self.device, self.store, hybrid, pricing, host_threads) if hybrid != "off" else None

    # -- ExpertSource ---------------------------------------------------------------------------

    def begin_request(self) -> None:
        """The next step of every layer starts a request (LCP counts μ within one)."""
        self._new_request = set(self.residency)

    def after_layer(self, layer: int, x_TD: torch.Tensor) -> None:
        if self.predictor.reads == "layer_output":
            self._prefetch_ahead(layer, x_TD, self._step_clock)

    def lookahead(self, layer: int, router_input_TD: torch.Tensor) -> torch.Tensor | None:
        """The predictor's device-side guess, read back with the routing (no sync of its own)."""
        if not self.predictor.horizon or self.predictor.reads != "router_input":
            return None
        start = time.perf_counter()
        guess = self.predictor.guess(layer, router_input_TD)
        self.counters.predictor_s += time.perf_counter() - start
        return guess

    def experts_for(
        self,
        layer: int,
        ids_per_token: Sequence[Sequence[int]],
        router_input_TD: torch.Tensor,
        lookahead_rows: list[list[int]] | None = None,
        *,
        decode: bool | None = None,
    ) -> Iterator[tuple[int, Sequence[SwiGLUWeights]]]:
        layout, tokens = self._layouts[layer], len(ids_per_token)
        decode = tokens == 1 if decode is None else decode  # a batch's decode step has several tokens
        self.copies.set_phase("decode" if decode else "prefill")
        routed = sorted({e for ids in ids_per_token for e in ids})
        prefetched = self._prefetched[layer]
        self._prefetched[layer] = {}
        predicted = self._predicted.pop(layer, None)
        if predicted is not None and decode:  # recall is a decode measure (a prompt's prefetch is capped)
            self.counters.add_prediction(layer, predicted, routed)
        clock, self._clock[layer] = self._clock[layer], self._clock[layer] + tokens
        self._step_clock = clock
        if hasattr(self.predictor, "check_routing"):  # an oracle's trace must be this run's routing
            self.predictor.check_routing(layer, clock, ids_per_token)
        if layout.fully_resident:
            # Slot e holds expert e forever, so there is nothing to plan: every routed expert is a
            # hit. Counting it directly saves ~25 µs a step (measured: 7 % of the bundled model's
            # decode); the planner would reach the same counts.
            self.counters.add_resident_step(layer, tokens, len(routed), decode)
            if self.predictor.reads == "router_input":
                self._prefetch_ahead(layer, router_input_TD, clock, lookahead_rows)
            slots = self.pools[layer].slots
            for e in routed:
                yield e, (slots[e],)
            return
        counts_E = np.zeros(layout.num_experts, dtype=np.int64)
        if tokens == 1:  # decode: a token's experts are distinct
            counts_E[ids_per_token[0]] = 1
        else:
            np.add.at(counts_E, np.asarray(ids_per_token).ravel(), 1)
        new_request = layer in self._new_request
        self._new_request.discard(layer)
        # A wrong prefetch that has landed whole may still be worth caching: the planner decides.
        parts = {e: load.part for e, load in prefetched.items()}
        landed = admission_candidates(parts, lambda e: self.copies.landed(prefetched[e].ticket))
        plan, self.residency[layer] = residency_step(
            self.policy, layout, self.residency[layer], counts_E, tokens=tokens, new_request=new_request, loaded=landed
        )
        for e, slot in plan.kept:
            load = prefetched.pop(e)
            if admitted_top_copy(layout) == "host_to_slot":  # it holds the low-bit copy; the cache keeps the expert
                self.loads.fill_top(layout, e, slot)
            else:
                self.loads.copy_on_device(self.slots.slot(layer, slot), load.buffer.expert(layer).neurons(0, layout.top_neurons))
            self.counters.kept_prefetches += 1
            self.counters.kept_prefetch_bytes += load.ticket.nbytes
            self.staging.release(load.buffer, fence=self.copies.fence())
        loads: dict[int, Load] = {}
        for e, fate in prefetch_fates(plan, parts).items():
            if fate == "keep":  # its top went to its slot above
                continue
            load = prefetched[e]
            if fate == "use":
                loads[e] = load
            elif self.copies.cancel(load.ticket):  # not started: it never uses the link
                self.counters.prefetch_bytes -= load.ticket.nbytes
                self.counters.cancelled_prefetches += 1
                self.staging.release(load.buffer)
            else:
                self.counters.wasted_prefetch_bytes += load.ticket.nbytes
                self.staging.release(load.buffer, pending=load.ticket)
        hosted = []
        if self.host is not None:
            plan, hosted, demand = self._place(layout, plan, loads, tokens)
        else:
            demand = demand_loads(plan, loads)
        self.counters.add_plan(plan, tokens, decode)
        # This layer's loads go first (they block compute), in plan order, as buffers allow; then
        # the host's share (it runs beside the device), the next layers' prefetches, which overlap
        # this layer's compute, and the fills, which only the cache's future needs.
        queue = deque(demand)
        self.loads.issue_demand(layout, queue, loads)
        batch = self.host.start(layout, hosted, ids_per_token, router_input_TD) if hosted else None
        if self.predictor.reads == "router_input":
            self._prefetch_ahead(layer, router_input_TD, clock, lookahead_rows)
        on_host = self._fill(layout, hosted) if hosted else ()
        for p in plan.experts:
            if p.load == "none":  # a hit: the slot holds the whole expert
                yield p.expert, (self.slots.slot(layer, p.slot),)
                continue
            if p.expert in on_host:  # handed out below, once the device has its own work
                continue
            if p.expert not in loads:  # its turn came before a buffer did: it heads the queue
                self.loads.issue_demand(layout, queue, loads, at_least_one=True)
            load = loads.pop(p.expert)
            if self.overlap_top and p.outcome == "partial":
                yield p.expert, self.loads.top_then_bottom(layout, p, load)
            else:
                yield p.expert, (self.loads.assemble(layout, p, load),)
            self.staging.release(load.buffer, fence=self.copies.fence())
            self.loads.issue_demand(layout, queue, loads)
        if batch is not None:
            # Those with a top first: it is device work that overlaps the host's.
            for pl in sorted(hosted, key=lambda pl: pl.plan.load != "bottom" and pl.place != "split"):
                yield pl.plan.expert, self._host_segments(layout, pl, batch)
            self.counters.add_host_s(layer, decode, batch.busy_s)

    # -- the host's share (hybrid) ----------------------------------------------------------------

    def _place(
        self, layout: LayerCacheLayout, plan: LayerPlan, loads: dict[int, Load], tokens: int
    ) -> tuple[LayerPlan, list[Placement], list[ExpertPlan]]:
        """The step's loads on link and host (cache/placement.py, the simulator's rule): its
        prefetches not yet started are withdrawn and placed with its demand loads, those under
        way keep the link busy first. (the plan with unfilled host admissions withdrawn, the
        host's placements, the demand copies)."""
        for e, load in list(loads.items()):
            if not self.copies.landed(load.ticket) and self.copies.cancel(load.ticket):
                self.counters.prefetch_bytes -= load.ticket.nbytes
                self.counters.cancelled_prefetches += 1
                self.staging.release(loads.pop(e).buffer)
        in_flight = [load.ticket.nbytes for load in loads.values() if not self.copies.landed(load.ticket)]
        placed = self.host.place(layout, demand_loads(plan, loads), in_flight, tokens)
        residency = self.residency[layout.layer]
        plan, cache = settle_fills(plan, residency.cache, placed)
        self.residency[layout.layer] = attrs.evolve(residency, cache=cache)
        hosted = [pl for pl in placed if pl.place != "copy"]
        self.counters.add_host(layout, hosted)
        return plan, hosted, [pl.plan for pl in placed if pl.place == "copy"]

    def _fill(self, layout: LayerCacheLayout, hosted: list[Placement]) -> set[int]:
        """Copy into its slot the top of each host-computed miss the planner admitted: a split
        miss's at once (urgent: the device computes it this step), a filled one's behind the step's
        other copies (nothing waits for it until the slot is next used). The hosted experts."""
        for pl in hosted:
            if pl.fill or pl.place == "split":
                top = self.store.experts[layout.layer][pl.plan.expert].neurons(0, layout.top_neurons)
                nbytes = self.slots.fill(layout.layer, pl.plan.slot, top, urgent=pl.place == "split")
                if pl.place == "split":
                    self.counters.demand_bytes += nbytes
        return {pl.plan.expert for pl in hosted}

    def _host_segments(self, layout: LayerCacheLayout, pl: Placement, batch: HostBatch) -> Iterator[SwiGLUWeights | SegmentOutput]:
        """A host-involved expert: its top computed here from its slot (a partial hit's cached one,
        or a split miss's once copied there), then what the host computed."""
        if pl.plan.load == "bottom" or pl.place == "split":
            yield self.slots.slot(layout.layer, pl.plan.slot)
        yield batch.output(pl.plan.expert)

    # -- prefetching ----------------------------------------------------------------------------

    def _prefetch_ahead(self, layer: int, hidden_TD: torch.Tensor, clock: int, guess_rows=None) -> None:
        if not self.predictor.horizon:
            return
        start = time.perf_counter()
        predictions, self._predictor_state = self.predictor.predict(
            self._predictor_state, layer, hidden_TD, clock, guess_rows
        )
        self.counters.predictor_s += time.perf_counter() - start
        predictions = {target: experts[: self.predictor.candidates] for target, experts in predictions.items()}
        for target, experts in predictions.items():  # recall counts what was named, copied or not
            self._predicted.setdefault(target, set()).update(experts)
        targets = (
            PrefetchTarget(
                target, self._layouts[target], self.residency[target].cache, experts, self._prefetched[target],
                self.host.prefetch_share(self._layouts[target]) if self.host is not None else 1.0,
            )
            for target, experts in predictions.items()
        )
        for p in plan_prefetches(targets, prefetch_room(self.staging.free, self._demand_reserve)):
            self._prefetched[p.key][p.expert] = self.loads.start(self._layouts[p.key], p.expert, p.part, urgent=False)

    # -- reporting ------------------------------------------------------------------------------

    @property
    def decode_stats(self):
        return self.counters.cache_stats(decode=True)

    @property
    def prefill_stats(self):
        return self.counters.cache_stats(decode=False)

    @property
    def host_to_device_bytes(self) -> int:
        c = self.counters
        return c.demand_bytes + c.prefetch_bytes + c.fill_bytes + c.miss_fill_bytes

    def report(self) -> dict[str, object]:
        """Counters of the run so far: cache, prediction, copies."""
        copies = self.copies.current_stats()
        return self.counters.report(
            exposed_copy_s=copies.exposed_s, decode_exposed_copy_s=copies.decode_exposed_s, copy_s=copies.busy_s,
            preload_bytes=self.preload_bytes,
        )

    def close(self) -> None:
        try:
            self.copies.close()
        finally:
            if self.host is not None:
                self.host.close()


def _check_miss_format(layout: CacheLayout, miss_format: ExpertFormat | None, hybrid: Hybrid) -> None:
    """A miss format needs a layout planned for it, and no host share."""
    if any(l.low_bit_misses != (miss_format is not None) for l in layout.layers):
        raise ValueError(f"the layout and the engine disagree on the miss format (the engine's: {miss_format!r})")
    if miss_format is not None:
        check_miss_format(miss_format, (), hybrid)


def _check_miss_format_fits(miss_format: ExpertFormat, formats: Sequence[ExpertFormat], expert) -> None:
    """A quantized miss format that can encode these (dense) experts, or one line naming the problem."""
    # (the hybrid mode: checked in the engine, which every caller builds)
    check_miss_format(miss_format, formats, shape=(expert.hidden, expert.ffn_size, expert.block))


def _check_planned(layout: LayerCacheLayout, like, dtype_bytes: int) -> None:
    """The layout was planned for experts like `like` (an expert of its layer): dtype and bytes per neuron."""
    if like.dtype.itemsize != dtype_bytes:
        raise ValueError(f"the layout was planned for {dtype_bytes}-byte weights, the experts compute in {like.dtype}")
    fmt = format_of(like)
    neuron_bytes = fmt.neuron_bytes(like.hidden, like.biased, like.dtype.itemsize)
    if layout.neuron_bytes != neuron_bytes:
        raise ValueError(f"the layout was planned for {layout.neuron_bytes} bytes per expert neuron in layer {layout.layer}, "
                         f"its experts take {neuron_bytes} ({fmt.name})")


def expert_formats(model: Model) -> tuple[ExpertFormat, ...]:
    """The format of each MoE layer's routed experts, in model order."""
    return tuple(format_of(lw.ffn.experts[0]) for lw in model.weights.layers if isinstance(lw.ffn, MoEWeights))


def offloaded_experts(
    model: Model,
    budget,
    theta,
    policy_config: PolicyConfig | None = None,
    predictor_config: PredictorConfig | None = None,
    *,
    link: Link | None = None,
    policy: CachePolicy | None = None,
    predictor: Predictor | None = None,
    overlap_top: bool = False,
    hybrid: Hybrid = "off",
    pricing: HostPricing | None = None,
    host_threads: int | None = None,
    miss_format: ExpertFormat | None = None,
) -> OffloadedExperts:
    """The engine for `model` (its routed experts in host memory) under a budget, θ, policy and predictor,
    given as configs (built here) or as built strategies; `hybrid` places loads on the host too
    (`auto` prices them with `pricing`), on `host_threads` threads. `miss_format` (HOBBIT-style,
    changes numbers): an expert loaded whole is copied and computed as its low-bit copy in this
    format, while the cache keeps the expert itself."""
    expert = next(lw.ffn.experts[0] for lw in model.weights.layers if isinstance(lw.ffn, MoEWeights))
    formats = expert_formats(model)
    if miss_format is not None:
        _check_miss_format_fits(miss_format, formats, expert)
    if hybrid == "auto":
        for fmt in formats:
            check_priceable(fmt, "--hybrid auto")
    if predictor is None:
        predictor = PREDICTORS.build(predictor_config, model) if predictor_config is not None else NoPredictor()
    layout = plan_layout(
        model.spec, dtype_bytes=model.dtype.itemsize, budget=budget, theta=theta, widest_neuron_block=expert.block,
        staging_experts=staging_buffers(model.spec.moe.top_k, predictor), expert_format=formats, miss_format=miss_format,
    )
    if policy is None:
        policy = build_policy(policy_config)
    return OffloadedExperts(
        model.weights, layout, policy, device=model.device, predictor=predictor, link=link, overlap_top=overlap_top,
        hybrid=hybrid, pricing=pricing, host_threads=host_threads, miss_format=miss_format,
    )
