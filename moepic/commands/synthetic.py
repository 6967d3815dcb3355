"""What `moepic fit-trace` and `moepic synth-trace` share: the ranges of their numbers, reading and
fitting a trace as one-line errors, the memory bound of a synthetic trace, and the hit-rate check.

    trace ─fit_synthetic─▶ params (JSON) ─for_shape (optional)─▶ generate_trace ─▶ .npz
      └─ replay (LRU, LFU) ─▶ hit rates, real vs synthetic ─▶ fit-quality table

Pure apart from reading the trace.
"""

from __future__ import annotations

import argparse

import numpy as np

from moepic.errors import ConfigError
from moepic.ranges import Range
from moepic.tracing.checks import MAX_EXPERTS, MAX_LAYER, MAX_POSITION

FIT_CHECK_POLICIES = ("lru", "lfu")  # the fit-quality check's policies
EXPERTS = Range(1, MAX_EXPERTS, whole=True)  # experts per layer, and top-k
LAYERS = Range(1, MAX_LAYER, whole=True)
TOKENS = Range(1, MAX_POSITION, whole=True)  # what a trace stores; memory bounds it further (below)
MAX_GENERATION_BYTES = 4 * 2**30  # a synthetic trace larger than this is a typo, not a workload


def cache_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated cache sizes (experts), got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"cache sizes must be at least 1, got {text!r}")
    return sizes


def load_trace(path: str):
    from moepic.tracing import TraceError, load_any_trace

    try:
        return load_any_trace(path)
    except TraceError as e:
        raise ConfigError(str(e)) from None


def fit(trace, path: str):
    from moepic.tracing.synthetic import fit_synthetic

    try:
        return fit_synthetic(trace)
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None


def check_memory(tokens: int, sequences: int, *, layers: int, top_k: int, experts: int) -> None:
    """Refuse, before any work, a synthetic trace too large to generate in memory (naming the shape)."""
    from moepic.tracing.synthetic import generation_bytes

    need = generation_bytes(tokens, sequences, layers=layers, top_k=top_k, experts=experts)
    if need > MAX_GENERATION_BYTES:
        raise ConfigError(
            f"--tokens: {tokens} tokens of {layers} MoE layers x {experts} experts, top-{top_k} would need about "
            f"{need / 2**30:.1f} GiB to generate; the limit is {MAX_GENERATION_BYTES / 2**30:.0f} GiB "
            f"(about {tokens * MAX_GENERATION_BYTES // need} tokens at this shape)"
        )


def hit_rates(trace, policy: str, sizes) -> np.ndarray:
    """[L, sizes]: the planner's hit rate of `policy` with caches of whole experts (one-neuron experts, θ = 1)."""
    from moepic.cache.layout import CacheLayout, slot_count_layout
    from moepic.cache.replay import replay_trace
    from moepic.policies import POLICIES
    from moepic.policies.base import build_policy

    build = POLICIES.structure_node({"name": policy}, "policy")
    out = np.zeros((len(trace.moe_layers), len(sizes)))
    for column, slots in enumerate(sizes):
        layers = tuple(slot_count_layout(l, trace.num_experts, slots) for l in trace.moe_layers)
        layout = CacheLayout(layers=layers, staging_experts=trace.top_k, dtype_bytes=1)
        out[:, column] = [stats.hit_rate for stats in replay_trace(trace, layout, build_policy(build))]
    return out
