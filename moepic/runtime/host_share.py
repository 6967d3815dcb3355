"""The host's share of an offloading engine's layer step (hybrid execution): which demand loads
run on the host CPU, and the host jobs that compute them. Side effects: through its worker pool
(runtime/host_compute.py); the decision itself is the pure `place_loads` (cache/placement.py).

    demand loads ─place─▶ copy: the engine's demand queue, as without hybrid
                     └──▶ host: one job each, started at once: the expert's tokens (in token
                          order) through its whole expert, or its bottom, read in place from the
                          host store
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from moepic.cache.layout import LayerCacheLayout
from moepic.cache.placement import Hybrid, Placement, check_mode, place_loads, prefetch_share
from moepic.cache.planner import ExpertPlan
from moepic.perfmodel.host_costs import HostPricing
from moepic.runtime.host_compute import HostBatch, HostCompute
from moepic.runtime.host_store import HostExpertStore


class HostShare:
    """Places a step's demand loads and computes the host's on `threads` worker threads (CUDA;
    see HostCompute). `auto` needs `pricing`; `off` needs no HostShare at all."""

    def __init__(
        self, device: torch.device, store: HostExpertStore, mode: Hybrid, pricing: HostPricing | None, threads: int | None
    ) -> None:
        self.mode = check_mode(mode, pricing is not None)
        if self.mode == "off":
            raise ValueError("hybrid off computes nothing on the host: the engine needs no host share")
        self.store, self.pricing = store, pricing
        self.pool = HostCompute(device, threads)

    def place(
        self, layout: LayerCacheLayout, demand: list[ExpertPlan], in_flight_bytes: Iterable[int], tokens: int
    ) -> list[Placement]:
        """Each demand load on the link or the host, in plan order, priced with the link time
        still held by the step's prefetches under way (`in_flight_bytes`: those not landed)."""
        costs, busy_s = None, 0.0
        if self.pricing is not None:
            costs = self.pricing.load_costs(layout, tokens)
            busy_s = self.pricing.busy_s(in_flight_bytes)
        return place_loads(demand, self.mode, costs, link_busy_s=busy_s)

    def prefetch_share(self, layout: LayerCacheLayout) -> float:
        """The share of a layer's named loads to prefetch (placement.prefetch_share)."""
        return prefetch_share(self.mode, self.pricing.load_costs(layout, 1) if self.pricing is not None else None)

    def start(
        self, layout: LayerCacheLayout, hosted: Sequence[Placement], ids_per_token: Sequence[Sequence[int]], x_TD: torch.Tensor
    ) -> HostBatch:
        """The host jobs of a step, started: its input goes to the host once, each expert reads
        its own tokens' rows."""
        x = self.pool.stage(x_TD)
        rows_of: dict[int, list[int]] | None = None
        if len(ids_per_token) > 1:  # a prompt: each expert runs on the tokens routed to it
            rows_of = {}
            for t, ids in enumerate(ids_per_token):
                for e in ids:
                    rows_of.setdefault(e, []).append(t)
        jobs = []
        for pl in hosted:
            p = pl.plan
            w = self.store.experts[layout.layer][p.expert]
            part = "bottom" if p.load == "bottom" or pl.place == "split" else "whole"  # what the host computes
            if part == "bottom":
                w = w.neurons(layout.top_neurons, layout.ffn_size)
            rows = None if rows_of is None else rows_of[p.expert]
            jobs.append(self.pool.submit(layout.layer, p.expert, part, w, x, rows))
        return self.pool.batch(jobs)

    def close(self) -> None:
        self.pool.close()
