"""LCP, MoEpic's policy: P = μ·ρ^(ν/ω), a blend of LFU (μ) and LRU (ν). Pure.

μ counts an expert's activations within the current request (prefill routing included), ν the
tokens since its last activation, and ρ^(1/ω) is the per-token decay (docs/design.md §3: ρ = 0.25,
ω = 128, so an expert unused for 128 tokens keeps a quarter of its weight).
"""

from __future__ import annotations

from typing import final

import attrs
import numpy as np

from moepic.policies.base import LayerStep, PolicyConfig, last_used_after, last_used_series, recency_E, register_policy
from moepic.ranges import Range


@attrs.frozen(kw_only=True)
class LCPConfig(PolicyConfig):
    rho: float = attrs.field(default=0.25, validator=Range(0, 1, low_open=True))
    # ω, in tokens; 2**24 is beyond any model's context.
    window: float = attrs.field(default=128.0, validator=Range(0, 2**24, low_open=True))

    offered_by_auto = True


@attrs.frozen(eq=False)
class LCPState:
    mu_E: np.ndarray  # activations in this request
    last_used_E: np.ndarray  # -1 never
    now: int


@final
@register_policy("lcp", LCPConfig)
class LCPPolicy:
    def __init__(self, config: LCPConfig = LCPConfig()) -> None:
        self.config = config

    def init(self, layer: int, num_experts: int) -> LCPState:
        return LCPState(np.zeros(num_experts, dtype=np.int64), np.full(num_experts, -1, dtype=np.int64), 0)

    def update(self, state: LCPState, step: LayerStep) -> LCPState:
        mu_E = (np.zeros_like(state.mu_E) if step.new_request else state.mu_E) + step.counts_E
        return LCPState(mu_E, last_used_after(state.last_used_E, step), step.clock)

    def priority(self, state: LCPState) -> np.ndarray:
        nu_E = recency_E(state.last_used_E, state.now)  # ∞ for never-used experts, whose μ is 0: P = 0
        return state.mu_E * self.config.rho ** (nu_E / self.config.window)

    def priority_series(self, layer, num_experts, counts_SE, clock_S, tokens_S, new_request_S) -> np.ndarray:
        total_SE = np.cumsum(counts_SE, axis=0, dtype=np.int64)
        # μ restarts with each request: subtract the running total before the request's first step.
        first_S = np.maximum.accumulate(np.where(new_request_S, np.arange(len(clock_S)), 0))
        before_SE = np.vstack([np.zeros((1, num_experts), dtype=np.int64), total_SE[:-1]])[first_S]
        last_SE = last_used_series(counts_SE, clock_S)
        nu_SE = np.where(last_SE >= 0, clock_S[:, None] - last_SE, np.inf)
        return (total_SE - before_SE) * self.config.rho ** (nu_SE / self.config.window)
