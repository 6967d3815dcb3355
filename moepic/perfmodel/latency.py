"""The latency model: expected decode time per token of a cache configuration {C_l, θ_l}. Pure.

Symbols, per MoE layer l (docs/design.md §5): k routed experts per token, S bytes per expert, a split
at θ (top θS cached, bottom (1−θ)S loaded), C cached tops, B the host link (GB/s) with τ per copy,
a the predictor's recall, k′ the experts it prefetches per step, W the compute that hides a prefetch.

    compute_l  = t_layer + k·t_expert + t_predictor + t_step + loads·t_load  (roofline, hardware.py;
                                             t_step, t_load: the engine's host work, when offloading)
    W_l        = k·t_expert + t_layer        the previous layer's experts and this layer's attention:
                                             a prediction is made as the previous layer routes
    per routed expert:  hit → its bottom, (1−θ)S in 1 copy (θ = 1: nothing);  miss → S in 1 copy
                        (with a miss format: its low-bit copy's bytes, computed at its kernel's time,
                        and each admitted miss's top θS filled behind, on the link the next copies need)
    prefetched = the predicted routed experts (each with probability a) + k′ − (their number) wrong
                 guesses, each a hit with probability h_l(C)
    exposed_l  = E[ max(0, copy(prefetched bytes) − W_l) ]      what the prefetch fails to hide
    demand_l   = E[ copy(bytes of the unpredicted routed experts) ]   after the router: all exposed
    assemble_l = E[partial hits] · θS / device copy rate       a cached top joins its bottom (engine)
    T_l        = compute_l + assemble_l + exposed_l + demand_l ;  token = Σ_l T_l + t_rest

The expectation runs over the measured joint distribution of hits per step (workload.py) and
a binomial split of hits and misses into predicted and not. Taking E[max(0, X − W)] rather than
max(0, E[X] − W) is the one place this departs from docs/design.md §5, and it is what makes the
latency U-shaped in θ: a larger top shrinks every hit's bottom until it hides behind W, but caches
fewer experts, and a miss's whole expert never hides. The rest of the model is §5's.
Not modelled: copies and compute of different layers running into each other (each layer starts
with an idle link), a deeper predictor horizon (it smooths bursts; the mean link load is the same).

Hybrid runs (moepic/cache/placement.py) replace exposed_l + demand_l + assemble_l by the step's
loads placed on the link and the host by the engine's own rule, for each number j of cached tops
among the k routed experts (k − j wholes, j bottoms):
    hybrid_l   = E_j[ loads_finish(j) ]     with the link a·W ahead (the prefetched share of what the
                                            predictor names arrives during the previous layer)
so θ now shares an expert's work between the device (its cached top) and the host or link (its
bottom). The fills of admitted host misses ride on an otherwise idle link and are not priced.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs
import numpy as np

from moepic.core.footprint import attention_params, expert_neuron_params, kv_cache_numbers_at, swiglu_params
from moepic.core.spec import ModelSpec
from moepic.core.weights import neuron_block
from moepic.cache.placement import check_mode, loads_finish_s
from moepic.perfmodel.hardware import HardwareProfile
from moepic.perfmodel.host_costs import host_pricing
from moepic.perfmodel.workload import LayerWorkload, WorkloadProfile
from moepic.quant import ExpertFormat, build_format


@attrs.frozen(kw_only=True)
class LayerChoice:
    """One MoE layer's cache: `slots` tops of `top_neurons` neurons each."""

    slots: int
    top_neurons: int


@attrs.frozen(kw_only=True)
class ModelTimes:
    """What the hardware profile says one decode step's parts of this model cost."""

    expert_s: float  # one routed expert, one token
    layer_s: float  # a MoE layer's attention (with its KV cache), norms, router and shared expert
    predictor_s: float  # one prediction, per MoE layer (0 without a predictor)
    rest_s: float  # dense layers, embedding and lm_head: what no cache configuration changes
    ffn_size: int
    block: int  # neuron granularity of θ
    neuron_bytes: int  # one neuron's gate, up and down rows, in the experts' format (scales included)
    # With a miss format (`cache.miss_format`): a neuron of the low-bit copy a miss moves, and one
    # token through an expert computed from it. None: misses move and compute the expert itself.
    miss_neuron_bytes: int | None = None
    miss_expert_s: float | None = None
    # The format's host kernel and stored bytes per weight, which price computing an expert on the
    # host (perfmodel/host_costs.py; None: no host kernel, hybrid refused).
    host_kernel: str | None = "dense"
    weight_bytes: float | None = None
    # A decode step of B sequences (continuous batching) reads the weights once and each sequence's
    # KV cache: what one more sequence adds to a MoE layer's part and to the rest, and one more
    # token's matmul through an expert, which starts to count only once it outweighs reading the
    # expert (hundreds of tokens on a GPU). 0: priced as one token.
    layer_sequence_s: float = 0.0
    rest_sequence_s: float = 0.0
    expert_token_s: float = 0.0
    expert_launch_s: float = 0.0

    def expert_s_for(self, tokens: int, one_token_s: float | None = None) -> float:
        """An expert (`one_token_s` for one token: `expert_s`, or a miss format's) over `tokens` tokens:
        the roofline's larger side, reading its weights once or computing every token."""
        one_token_s = self.expert_s if one_token_s is None else one_token_s
        return one_token_s if tokens == 1 else max(one_token_s, self.expert_launch_s + tokens * self.expert_token_s)

    @property
    def expert_bytes(self) -> int:
        return self.ffn_size * self.neuron_bytes

    @property
    def whole_load_bytes(self) -> int:
        """What loading an expert whole moves: the expert, or its low-bit copy."""
        return self.ffn_size * (self.miss_neuron_bytes or self.neuron_bytes)


def model_times(
    hw: HardwareProfile, spec: ModelSpec, *, dtype_bytes: int, context_tokens: int = 512, predictor: bool = False,
    block: int | None = None, expert_format: ExpertFormat | None = None, miss_format: ExpertFormat | None = None,
) -> ModelTimes:
    """Roofline times of a decode step's parts at `context_tokens` of KV cache, routed experts stored
    in `expert_format` (default: dense): its bytes are what a miss moves, its kernel's what a step
    reads; with `miss_format`, a miss moves and computes its low-bit copy in that format instead."""
    fmt = expert_format or build_format("dense")
    moe, D = spec.moe, spec.hidden_size
    # weights + KV cache reads (core/footprint.py prices each attention kind; a layer's average,
    # where windowed or chunked layers read only their span)
    params = attention_params(spec)
    attention = (params + kv_cache_numbers_at(spec, context_tokens) / spec.num_layers) * dtype_bytes
    shared = swiglu_params(D, moe.shared_expert_ffn) * dtype_bytes
    router = moe.num_experts * D * dtype_bytes
    layer_s = hw.call_s(attention + router + shared, 2 * (params + moe.num_experts * D), hw.layer_overhead_us)
    if shared:
        layer_s += hw.call_s(0, 0, hw.expert_overhead_us)  # its own launches
    expert_params = expert_neuron_params(spec) * moe.expert_ffn

    def expert_s(f: ExpertFormat) -> float:
        return hw.call_s(f.kernel_bytes(D, moe.expert_bias, dtype_bytes) * moe.expert_ffn, 2 * expert_params, hw.expert_overhead_us)

    dense_layers = sum(kind == "dense" for kind in spec.layer_kinds)
    dense_s = hw.call_s(attention + swiglu_params(D, spec.dense_ffn) * dtype_bytes, 0, hw.layer_overhead_us + hw.expert_overhead_us)
    head = spec.vocab_size * D * dtype_bytes
    sequence_s = kv_cache_numbers_at(spec, context_tokens) / spec.num_layers * dtype_bytes / (hw.memory_gbps * 1e9)
    return ModelTimes(
        expert_s=expert_s(fmt),
        layer_s=layer_s,
        predictor_s=hw.call_s(router, 2 * moe.num_experts * D, hw.expert_overhead_us) if predictor else 0.0,
        rest_s=dense_layers * dense_s + hw.call_s(head, 2 * spec.vocab_size * D, hw.expert_overhead_us),
        ffn_size=moe.expert_ffn,
        block=block or neuron_block(moe.expert_ffn),
        neuron_bytes=fmt.spec_neuron_bytes(spec, dtype_bytes),
        miss_neuron_bytes=None if miss_format is None else miss_format.spec_neuron_bytes(spec, dtype_bytes),
        miss_expert_s=None if miss_format is None else expert_s(miss_format),
        host_kernel=fmt.host_kernel,
        weight_bytes=fmt.weight_bytes(dtype_bytes),
        layer_sequence_s=sequence_s,
        rest_sequence_s=dense_layers * sequence_s,
        expert_token_s=2 * expert_params / (hw.matmul_tflops * 1e12),
        expert_launch_s=hw.expert_overhead_us * 1e-6,
    )


def layer_model_times(
    hw: HardwareProfile, spec: ModelSpec, *, expert_formats: Sequence[ExpertFormat], **kwargs
) -> tuple[ModelTimes, ...]:
    """`model_times` for each MoE layer's experts' format (a GGUF file's kinds vary by layer), each
    distinct format priced once; `kwargs` as `model_times` takes them."""
    priced: dict = {}
    for fmt in expert_formats:
        if fmt.config not in priced:
            priced[fmt.config] = model_times(hw, spec, expert_format=fmt, **kwargs)
    return tuple(priced[fmt.config] for fmt in expert_formats)


def binomial_JP(k: int, p: float) -> np.ndarray:
    """[j, i]: P(i of j independent events with probability p), for j = 0…k."""
    out = np.zeros((k + 1, k + 1))
    for j in range(k + 1):
        for i in range(j + 1):
            out[j, i] = math.comb(j, i) * p**i * (1 - p) ** (j - i)
    return out


def layer_total_s(parts: dict[str, np.ndarray]) -> np.ndarray:
    """T_l from `LatencyModel.parts`: the times add up (hit rate and bytes are not times)."""
    return parts["compute"] + parts["assemble"] + parts["exposed_prefetch"] + parts["demand"]


class LatencyModel:
    """T_l for any (C, θ) of any MoE layer, vectorised over configurations; see the module docstring."""

    def __init__(
        self, hw: HardwareProfile, times: ModelTimes | Sequence[ModelTimes], workload: WorkloadProfile, *, hybrid: str = "off",
        dtype_bytes: int = 2,
    ) -> None:
        """`times`: the model's, or one per MoE layer where layers store their experts in different
        formats (a GGUF file's kinds vary by layer; `layer_times`)."""
        layer_times = tuple(times) if isinstance(times, (list, tuple)) else (times,) * len(workload.layers)
        if len(layer_times) != len(workload.layers):
            raise ValueError(f"times for {len(layer_times)} MoE layers, a workload of {len(workload.layers)}")
        times = layer_times[0]
        if hybrid != "off" and (times.miss_neuron_bytes is not None or len(set(layer_times)) > 1):
            raise ValueError("hybrid is priced for one expert format and no miss format")
        self.hw, self.times, self.workload = hw, times, workload
        self.layer_times = layer_times
        self.pricing = host_pricing(hw, times, dtype_bytes) if hybrid != "off" else None  # no host: one line naming --host
        self.hybrid = check_mode(hybrid, self.pricing is not None or hybrid == "off")
        self._finish: dict[tuple[int, float], np.ndarray] = {}  # (top neurons, head start) → [j] loads_finish
        self.k, self.num_experts = workload.top_k, workload.num_experts
        # The compute that hides a prefetch: the previous layer's experts and this one's attention.
        self.window_s_L = [self.k * t.expert_s + t.layer_s for t in layer_times]
        self.window_s = self.window_s_L[0]
        self._joint = [self._predicted_split(l) for l in workload.layers]

    def times_for(self, column: int) -> ModelTimes:
        """The times of MoE layer `column` (its experts' format)."""
        return self.layer_times[column]

    @property
    def num_layers(self) -> int:
        return len(self.workload.layers)

    def _predicted_split(self, layer: LayerWorkload) -> np.ndarray:
        """[C, ph, pm]: P(ph predicted hits and pm predicted misses | C cached tops)."""
        k = self.k
        split_JP = binomial_JP(k, layer.recall)
        misses_JP = split_JP[::-1]  # row j: how many of the k − j misses were predicted
        return np.einsum("cj,jp,jm->cpm", layer.hits_CJ, split_JP, misses_JP)

    def parts(self, column: int, slots_X: np.ndarray, top_X: np.ndarray) -> dict[str, np.ndarray]:
        """Seconds per token of MoE layer `column`, per configuration X (C = slots_X, top neurons top_X)."""
        t, hw, k = self.times_for(column), self.hw, self.k
        window_s = self.window_s_L[column]
        layer = self.workload.layers[column]
        slots_X = np.asarray(slots_X, dtype=np.int64)
        top_X = np.asarray(top_X, dtype=np.int64)
        slots_X = np.where(top_X > 0, slots_X, 0)  # θ = 0: nothing cached
        S = float(t.whole_load_bytes)  # a miss: the expert, or its low-bit copy (`cache.miss_format`)
        whole = top_X == t.ffn_size
        hit_bytes_X = np.where(whole, 0.0, (t.ffn_size - top_X) * t.neuron_bytes)
        hit_copies_X = np.where(whole, 0.0, 1.0)
        h_X = layer.hit_rate_C[slots_X]
        link_Bps, tau = hw.link_gbps * 1e9, hw.link_latency_us * 1e-6
        # A guess's expected bytes and copies (wrong guesses are cached as often as routed experts).
        guess_bytes_X = h_X * hit_bytes_X + (1 - h_X) * S
        guess_copies_X = h_X * hit_copies_X + (1 - h_X)

        a, kp = layer.recall, layer.candidates
        if kp > 0:
            joint_XPM = self._joint[column][slots_X]
            ph = np.arange(k + 1)[None, :, None]
            pm = np.arange(k + 1)[None, None, :]
            wrong = np.maximum(0.0, kp - ph - pm)
            bytes_XPM = ph * hit_bytes_X[:, None, None] + pm * S + wrong * guess_bytes_X[:, None, None]
            copies_XPM = ph * hit_copies_X[:, None, None] + pm + wrong * guess_copies_X[:, None, None]
            copy_XPM = bytes_XPM / link_Bps + copies_XPM * tau
            exposed_X = (joint_XPM * np.maximum(0.0, copy_XPM - window_s)).sum((1, 2))
        else:
            a, exposed_X = 0.0, np.zeros(len(slots_X))
        unpredicted = k * (1 - a)
        demand_X = unpredicted * (guess_bytes_X / link_Bps + guess_copies_X * tau)
        fill_X = self._fill_s(column, slots_X, top_X)
        if kp > 0:  # behind the step's copies, the fills hold the link the next prefetch needs
            exposed_X = exposed_X + (joint_XPM * (np.maximum(0.0, copy_XPM + fill_X[:, None, None] - window_s)
                                                 - np.maximum(0.0, copy_XPM - window_s))).sum((1, 2))
        else:  # …or the next demand copies
            demand_X = demand_X + fill_X
        partial_X = np.where(whole, 0.0, k * h_X)
        assemble_X = partial_X * top_X * t.neuron_bytes / (hw.device_copy_gbps * 1e9)
        if self.pricing is not None:  # the loads on link and host, by the engine's placement rule
            head_start = a * window_s if kp > 0 else 0.0
            hits_XJ = layer.hits_CJ[slots_X]
            finish_XJ = np.stack([self._loads_finish_J(int(top), head_start) for top in top_X])
            exposed_X = (hits_XJ * finish_XJ).sum(1)
            demand_X = np.zeros(len(slots_X))
            assemble_X = np.zeros(len(slots_X))
        experts_s = k * t.expert_s
        if t.miss_expert_s is not None:  # a miss served from its low-bit copy computes from it (its own kernel)
            experts_s = k * (h_X * t.expert_s + (1 - h_X) * t.miss_expert_s)
        compute = t.layer_s + experts_s + (t.predictor_s if kp > 0 else 0.0)
        # The engine's host work: a planned step, and each loaded expert (a miss, or a partial hit).
        loads_X = k * (1 - h_X) + partial_X
        resident_X = (slots_X == self.num_experts) & whole
        engine_X = np.where(resident_X, 0.0, hw.offload_step_us * 1e-6 + loads_X * hw.load_us * 1e-6)
        return {
            "compute": compute + engine_X,
            "assemble": assemble_X,
            "exposed_prefetch": exposed_X,
            "demand": demand_X,
            "hit_rate": h_X,
            "bytes": k * guess_bytes_X,
        }

    def _fill_s(self, column: int, slots_X: np.ndarray, top_X: np.ndarray) -> np.ndarray:
        """Link seconds a step's fills take: with a miss format, each admitted miss's top is copied
        from the host (`admissions_C`, measured on the trace); none otherwise."""
        t, hw, layer = self.times_for(column), self.hw, self.workload.layers[column]
        if t.miss_neuron_bytes is None or layer.admissions_C is None:
            return np.zeros(len(slots_X))
        admitted_X = layer.admissions_C[slots_X]
        return admitted_X * (top_X * t.neuron_bytes / (hw.link_gbps * 1e9) + hw.link_latency_us * 1e-6)

    def _loads_finish_J(self, top_neurons: int, head_start_s: float) -> np.ndarray:
        """[j]: when a hybrid step's loads are done with j of its k routed experts' tops cached."""
        key = (top_neurons, head_start_s)
        if key not in self._finish:
            t, k = self.times, self.k
            costs = self.pricing.costs_for(t.expert_bytes, top_neurons * t.neuron_bytes, 1)
            bottom = [] if top_neurons == t.ffn_size else ["bottom"]
            self._finish[key] = np.array([
                max(0.0, loads_finish_s(["whole"] * (k - j) + bottom * j, self.hybrid, costs, link_busy_s=-head_start_s,
                                        admitted=top_neurons > 0))
                for j in range(k + 1)
            ])
        return self._finish[key]

    def layer_s(self, column: int, slots_X: np.ndarray, top_X: np.ndarray) -> np.ndarray:
        return layer_total_s(self.parts(column, slots_X, top_X))

    def token_s(self, choices: Sequence[LayerChoice]) -> float:
        """Predicted seconds per decode token of a whole configuration."""
        if len(choices) != self.num_layers:
            raise ValueError(f"expected a choice per MoE layer ({self.num_layers}), got {len(choices)}")
        return self.times.rest_s + sum(
            float(self.layer_s(c, np.array([ch.slots]), np.array([ch.top_neurons]))[0]) for c, ch in enumerate(choices)
        )

    def breakdown(self, choices: Sequence[LayerChoice]) -> list[dict[str, float]]:
        """Per MoE layer: each part of T_l (seconds), its hit rate and bytes loaded per token."""
        out = []
        for c, ch in enumerate(choices):
            parts = self.parts(c, np.array([ch.slots]), np.array([ch.top_neurons]))
            out.append({name: float(v[0]) for name, v in parts.items()})
        return out
