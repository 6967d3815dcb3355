"""Strategies and builders for latency-model and configurator tests: random monotone hit-rate curves,
random hardware, and model shapes."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from moepic.core.spec import ModelSpec, MoESpec, RopeSpec
from moepic.perfmodel.hardware import HardwareProfile
from moepic.perfmodel.latency import LatencyModel, binomial_JP, model_times
from moepic.perfmodel.workload import LayerWorkload, WorkloadProfile


def moe_spec(layers: int, experts: int, top_k: int, hidden: int, ffn: int, shared: int = 0) -> ModelSpec:
    return ModelSpec(
        model_type="test", vocab_size=1000, hidden_size=hidden, num_heads=4, num_kv_heads=2, head_dim=hidden // 4,
        norm_eps=1e-6, rope=RopeSpec(theta=1e4), layer_kinds=("moe",) * layers,
        moe=MoESpec(num_experts=experts, top_k=top_k, expert_ffn=ffn, shared_expert_ffn=shared),
    )


def binomial_hits(hit_rate_C: np.ndarray, k: int) -> np.ndarray:
    """[C, j]: each of k routed experts cached independently with probability h(C)."""
    return np.stack([binomial_JP(k, float(p))[k] for p in hit_rate_C])


def power_curve(experts: int, exponent: float) -> np.ndarray:
    """h(C) = 1 − (1 − C/E)^a: a = 1 is uniform routing, larger a more skewed (concave)."""
    return 1 - (1 - np.arange(experts + 1) / experts) ** exponent


def workload(curves: list[np.ndarray], k: int, recall: float, candidates: float) -> WorkloadProfile:
    layers = tuple(
        LayerWorkload(layer=l, hits_CJ=binomial_hits(h, k), recall=recall if l else 0.0, candidates=candidates if l else 0.0)
        for l, h in enumerate(curves)
    )
    return WorkloadProfile(num_experts=len(curves[0]) - 1, top_k=k, layers=layers)


@st.composite
def monotone_curves(draw, experts: int):
    """A random non-decreasing h with h(0) = 0 and h(E) = 1."""
    steps = draw(st.lists(st.floats(0.0, 1.0), min_size=experts, max_size=experts))
    steps = np.array(steps) + 1e-3
    return np.r_[0.0, np.cumsum(steps) / steps.sum()]


@st.composite
def hardware(draw):
    return HardwareProfile(
        name="random", source="hypothesis", device="cuda",
        link_gbps=draw(st.floats(0.5, 100)), link_latency_us=draw(st.floats(0, 50)),
        device_copy_gbps=draw(st.floats(10, 3000)), memory_gbps=draw(st.floats(5, 5000)),
        matmul_tflops=draw(st.floats(0.1, 1000)), expert_overhead_us=draw(st.floats(0, 500)),
        layer_overhead_us=draw(st.floats(0, 3000)),
    )


@st.composite
def latency_models(draw, max_layers: int = 6, max_experts: int = 12):
    """A latency model of a random small MoE shape, hardware, and monotone hit-rate curves."""
    L = draw(st.integers(1, max_layers))
    E = draw(st.integers(2, max_experts))
    k = draw(st.integers(1, min(4, E)))
    blocks = draw(st.integers(1, 12))
    hidden = draw(st.sampled_from([64, 256, 1024, 4096]))
    spec = moe_spec(L, E, k, hidden, 64 * blocks)
    curves = [draw(monotone_curves(E)) for _ in range(L)]
    predicting = draw(st.booleans())
    recall = draw(st.floats(0, 1)) if predicting else 0.0
    candidates = draw(st.integers(k, k + 2)) if predicting else 0
    hw = draw(hardware())
    times = model_times(hw, spec, dtype_bytes=2, predictor=predicting, context_tokens=draw(st.integers(1, 4096)))
    return LatencyModel(hw, times, workload(curves, k, recall, candidates))
