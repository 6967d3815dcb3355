"""LRU: keep the experts used most recently. Pure."""

from __future__ import annotations

from typing import final

import attrs
import numpy as np

from moepic.policies.base import LayerStep, PolicyConfig, last_used_after, last_used_series, register_policy


@attrs.frozen
class LRUConfig(PolicyConfig):
    offered_by_auto = True


@attrs.frozen(eq=False)
class LRUState:
    last_used_E: np.ndarray  # clock of each expert's latest step; -1 never


@final
@register_policy("lru", LRUConfig)
class LRUPolicy:
    def __init__(self, config: LRUConfig = LRUConfig()) -> None:
        self.config = config

    def init(self, layer: int, num_experts: int) -> LRUState:
        return LRUState(np.full(num_experts, -1, dtype=np.int64))

    def update(self, state: LRUState, step: LayerStep) -> LRUState:
        return LRUState(last_used_after(state.last_used_E, step))

    def priority(self, state: LRUState) -> np.ndarray:
        return state.last_used_E.astype(np.float64)

    def priority_series(self, layer, num_experts, counts_SE, clock_S, tokens_S, new_request_S) -> np.ndarray:
        return last_used_series(counts_SE, clock_S).astype(np.float64)
