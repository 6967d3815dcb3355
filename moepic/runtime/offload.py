"""The offloading engine: an ExpertSource that keeps routed experts in host memory and a per-layer
cache of their top segments on the device. Side effects: device allocation and copies.

    routing of layer l ─▶ residency_step (pure planner + policy) ─▶ plan ─▶ copies ─▶ whole experts
                                                                                    │
    hit       slot holds the whole expert (θ = 1) ──────────────────────────────────┤ computed in place
    partial   top: slot ─D2D─▶ staging   bottom: host ─H2D─▶ staging ────────────────┤
    miss      host ─H2D─▶ staging (one copy)  [admitted: staging top ─D2D─▶ slot] ───┘

Every expert is computed from one buffer in the compute layout, reassembled from its segments,
so the kernels see the same shapes and values as in the dense model: offloaded results equal the
dense model's bit for bit, whatever the policy, budget or θ. (Computing the cached top while the
bottom is in flight, paper-brief §2, trades that for a little overlap; the copy engine of the
prefetch issue decides where overlap pays.)

Copies are issued on the current stream, `non_blocking` from pinned memory on CUDA; on the CPU
they are plain memory copies through the same code. Staging buffers are reused round-robin: the
next copy into a buffer is queued after the compute that read it, on the same stream.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from moepic.cache.layout import CacheLayout, LayerCacheLayout, plan_layout
from moepic.cache.planner import FREE, ExpertPlan, LayerResidency, initial_residency, residency_step
from moepic.cache.stats import LayerCacheStats, summary
from moepic.core.model import Model
from moepic.core.weights import ModelWeights, MoEWeights, SwiGLUWeights
from moepic.policies.base import CachePolicy, PolicyConfig, build_policy
from moepic.runtime.host_store import HostExpertStore, flat_views


class _LayerPool:
    """One layer's preallocated cache: `slots` flat top segments on the device."""

    def __init__(self, layout: LayerCacheLayout, hidden: int, dtype: torch.dtype, device: torch.device) -> None:
        self.layout = layout
        self.flat_SX = torch.empty(layout.slots, 3 * layout.top_neurons * hidden, dtype=dtype, device=device)
        # Views made once: building them on every hit costs more than a small expert's compute.
        self.slots = [flat_views(self.flat_SX[s], layout.top_neurons, layout.block, hidden) for s in range(layout.slots)]


class OffloadedExperts:
    """Routed experts served from host memory through a device cache planned by a policy."""

    def __init__(
        self,
        weights: ModelWeights,
        layout: CacheLayout,
        policy: CachePolicy,
        *,
        device: str | torch.device,
        store: HostExpertStore | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.layout = layout
        self.policy = policy
        self.store = store if store is not None else HostExpertStore(weights, pin_memory=self.device.type == "cuda")
        any_expert = next(iter(self.store.experts.values()))[0]
        dtype, hidden = any_expert.down_FD.dtype, any_expert.down_FD.shape[1]
        if dtype.itemsize != layout.dtype_bytes:
            raise ValueError(f"the layout was planned for {layout.dtype_bytes}-byte weights, the experts are {dtype}")
        self.pools = {l.layer: _LayerPool(l, hidden, dtype, self.device) for l in layout.layers}
        self._layer_layouts = {l.layer: l for l in layout.layers}
        widest = max(layout.layers, key=lambda l: l.expert_bytes)
        self._staging = [
            torch.empty(3 * widest.ffn_size * hidden, dtype=dtype, device=self.device) for _ in range(layout.staging_experts)
        ]
        self._next_staging = 0
        # Every MoE layer of a model has the same expert shape, so one set of staging views serves all.
        self._staged = [flat_views(b, widest.ffn_size, widest.block, hidden) for b in self._staging]
        self.residency: dict[int, LayerResidency] = {l.layer: initial_residency(policy, l) for l in layout.layers}
        self.preload_bytes = 0  # before the run: layers with room for every whole expert start full
        for l in layout.layers:
            for s, e in enumerate(self.residency[l.layer].cache.slots_S):
                if e != FREE:
                    self.pools[l.layer].flat_SX[s].copy_(self.store.flat[l.layer][e], non_blocking=True)
                    self.preload_bytes += l.expert_bytes
        self._decode_stats = {l.layer: LayerCacheStats(layer=l.layer) for l in layout.layers}
        self._prefill_stats = dict(self._decode_stats)
        # decode? → layer → [steps, tokens, activations] of fully resident layers (all hits).
        self._resident_counts = {decode: {l: [0, 0, 0] for l in self.pools} for decode in (False, True)}
        self._new_request: set[int] = set()
        # Bytes actually copied (the planner's `bytes_loaded` must equal the first).
        self.host_to_device_bytes = 0
        self.device_copy_bytes = 0

    # -- ExpertSource ---------------------------------------------------------------------------

    def begin_request(self) -> None:
        """The next step of every layer starts a request (LCP counts μ within one)."""
        self._new_request = set(self.residency)

    def experts_for(self, layer: int, ids_per_token: Sequence[Sequence[int]]) -> Iterator[tuple[int, Sequence[SwiGLUWeights]]]:
        layout = self._layer_layouts[layer]
        tokens = len(ids_per_token)
        if layout.fully_resident:
            # Slot e holds expert e forever, so there is nothing to plan: every routed expert is a
            # hit. Counting it directly saves ~25 µs a step (measured: 7 % of the bundled model's
            # decode); the planner would reach the same counts.
            routed = sorted({e for ids in ids_per_token for e in ids})
            counts = self._resident_counts[tokens == 1][layer]
            counts[0], counts[1], counts[2] = counts[0] + 1, counts[1] + tokens, counts[2] + len(routed)
            slots = self.pools[layer].slots
            for e in routed:
                yield e, (slots[e],)
            return
        counts_E = np.zeros(layout.num_experts, dtype=np.int64)
        if len(ids_per_token) == 1:  # decode: a token's experts are distinct
            counts_E[ids_per_token[0]] = 1
        else:
            np.add.at(counts_E, np.asarray(ids_per_token).ravel(), 1)
        new_request = layer in self._new_request
        self._new_request.discard(layer)
        plan, self.residency[layer] = residency_step(
            self.policy, layout, self.residency[layer], counts_E, tokens=tokens, new_request=new_request
        )
        stats = self._decode_stats if tokens == 1 else self._prefill_stats
        stats[layer] = stats[layer].add(plan, tokens)
        for expert_plan in plan.experts:
            yield expert_plan.expert, (self._materialize(layout, expert_plan),)

    # -- copies ---------------------------------------------------------------------------------

    def _next_staging_buffer(self) -> tuple[torch.Tensor, SwiGLUWeights]:
        """The next staging buffer, flat and as a whole expert."""
        i = self._next_staging
        self._next_staging = (i + 1) % len(self._staging)
        return self._staging[i], self._staged[i]

    def _materialize(self, layout: LayerCacheLayout, p: ExpertPlan) -> SwiGLUWeights:
        """The expert as one compute-layout buffer on the device, after the copies the plan asks for."""
        host = self.store.experts[layout.layer][p.expert]
        pool = self.pools[layout.layer]
        top = layout.top_neurons
        if p.load == "none":  # a hit: the slot holds the whole expert
            return pool.slots[p.slot]
        if layout.top_neurons == layout.ffn_size and p.admitted:  # whole experts are cached: load into the slot
            self._load(pool.flat_SX[p.slot], self.store.flat[layout.layer][p.expert])
            return pool.slots[p.slot]
        buffer, staged = self._next_staging_buffer()
        if p.load == "whole":
            flat = self.store.flat[layout.layer][p.expert]
            self._load(buffer[: flat.numel()], flat)
            if p.admitted:
                self._copy_on_device(pool.slots[p.slot], staged.neurons(0, top))
        else:  # partial hit: cached top from the slot, bottom from the host
            self._copy_on_device(staged.neurons(0, top), pool.slots[p.slot])
            bottom = host.neurons(top, layout.ffn_size)
            self._load(staged.neurons(top, layout.ffn_size).gate_up_N2BD, bottom.gate_up_N2BD)
            self._load(staged.neurons(top, layout.ffn_size).down_FD, bottom.down_FD)
        return staged

    def _load(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Host → device: one contiguous range, asynchronous from pinned memory."""
        dst.copy_(src, non_blocking=True)
        self.host_to_device_bytes += src.numel() * src.element_size()

    def _copy_on_device(self, dst: SwiGLUWeights, src: SwiGLUWeights) -> None:
        for d, s in ((dst.gate_up_N2BD, src.gate_up_N2BD), (dst.down_FD, src.down_FD)):
            d.copy_(s, non_blocking=True)
            self.device_copy_bytes += s.numel() * s.element_size()

    # -- reporting ------------------------------------------------------------------------------

    @property
    def decode_stats(self) -> dict[int, LayerCacheStats]:
        """Per MoE layer: counters of the one-token steps."""
        return self._with_resident_hits(self._decode_stats, self._resident_counts[True])

    @property
    def prefill_stats(self) -> dict[int, LayerCacheStats]:
        """Per MoE layer: counters of the multi-token steps (prompts)."""
        return self._with_resident_hits(self._prefill_stats, self._resident_counts[False])

    @staticmethod
    def _with_resident_hits(stats, resident_counts) -> dict[int, LayerCacheStats]:
        out = {}
        for layer, s in stats.items():
            steps, tokens, activations = resident_counts[layer]
            hits = LayerCacheStats(layer=layer, steps=steps, tokens=tokens, activations=activations, hits=activations)
            out[layer] = s.plus(hits)
        return out

    def report(self) -> dict[str, object]:
        """Cache counters of the run so far: whole run, and the decode steps alone."""
        layers = self.layout.layers
        decode = tuple(self.decode_stats.values())
        everything = tuple(a.plus(b) for a, b in zip(self.prefill_stats.values(), decode))
        # Every MoE layer sees every token, so any layer's token count is the run's.
        decode_summary = summary(decode, decode[0].tokens)
        return summary(everything, everything[0].tokens) | {
            "decode_expert_hit_rate": decode_summary["expert_hit_rate"],
            "decode_bytes_loaded_per_token": decode_summary["bytes_loaded_per_token"],
            "device_copy_bytes": self.device_copy_bytes,
            "preload_bytes": self.preload_bytes,
            "cache_bytes": self.layout.cache_bytes,
            "staging_bytes": self.layout.staging_bytes,
            "theta": [l.theta for l in layers],
            "slots": [l.slots for l in layers],
        }


def offloaded_experts(model: Model, budget, theta, policy_config: PolicyConfig) -> OffloadedExperts:
    """The engine for `model` (its routed experts in host memory) under a budget, θ and policy config."""
    expert = next(lw.ffn.experts[0] for lw in model.weights.layers if isinstance(lw.ffn, MoEWeights))
    layout = plan_layout(
        model.spec, dtype_bytes=model.dtype.itemsize, budget=budget, theta=theta, widest_neuron_block=expert.block
    )
    return OffloadedExperts(model.weights, layout, build_policy(policy_config), device=model.device)


