"""LFU: keep the experts used most often; ties go to the more recent. Pure."""

from __future__ import annotations

from typing import final

import attrs
import numpy as np

from moepic.policies.base import LayerStep, PolicyConfig, last_used_after, last_used_series, register_policy


@attrs.frozen
class LFUConfig(PolicyConfig):
    offered_by_auto = True


@attrs.frozen(eq=False)
class LFUState:
    counts_E: np.ndarray  # activations (tokens that chose the expert) since the cache started
    last_used_E: np.ndarray  # -1 never
    now: int  # clock of the latest step


@final
@register_policy("lfu", LFUConfig)
class LFUPolicy:
    def __init__(self, config: LFUConfig = LFUConfig()) -> None:
        self.config = config

    def init(self, layer: int, num_experts: int) -> LFUState:
        return LFUState(np.zeros(num_experts, dtype=np.int64), np.full(num_experts, -1, dtype=np.int64), 0)

    def update(self, state: LFUState, step: LayerStep) -> LFUState:
        return LFUState(state.counts_E + step.counts_E, last_used_after(state.last_used_E, step), step.clock)

    def priority(self, state: LFUState) -> np.ndarray:
        # The fraction is in [0, 1), so it orders equal counts by recency and never outweighs a count.
        return state.counts_E + (state.last_used_E + 1) / (state.now + 2)

    def priority_series(self, layer, num_experts, counts_SE, clock_S, tokens_S, new_request_S) -> np.ndarray:
        total_SE = np.cumsum(counts_SE, axis=0, dtype=np.int64)
        return total_SE + (last_used_series(counts_SE, clock_S) + 1) / (clock_S[:, None] + 2)
