"""Random replacement: every miss is admitted over a random victim. Seeded, so runs repeat. Pure."""

from __future__ import annotations

from typing import final

import attrs
import numpy as np

from moepic.policies.base import LayerStep, PolicyConfig, register_policy


@attrs.frozen(kw_only=True)
class RandomConfig(PolicyConfig):
    seed: int = attrs.field(default=0)

    @seed.validator
    def _non_negative(self, attribute, value) -> None:
        if value < 0:  # numpy seeds must be non-negative
            raise ValueError(f"cache.policy.seed must be >= 0, got {value}")


@attrs.frozen(eq=False)
class RandomState:
    layer: int
    now: int
    used_now_E: np.ndarray  # bool: chosen by the latest step


@final
@register_policy("random", RandomConfig)
class RandomPolicy:
    def __init__(self, config: RandomConfig = RandomConfig()) -> None:
        self.config = config

    def init(self, layer: int, num_experts: int) -> RandomState:
        return RandomState(layer, -1, np.zeros(num_experts, dtype=bool))

    def update(self, state: RandomState, step: LayerStep) -> RandomState:
        return RandomState(state.layer, step.clock, step.counts_E > 0)

    def priority(self, state: RandomState) -> np.ndarray:
        # Drawn from (seed, layer, clock) rather than carried generator state, so the state stays a value.
        draws_E = np.random.default_rng([self.config.seed, state.layer, state.now + 1]).random(len(state.used_now_E))
        return np.where(state.used_now_E, np.inf, draws_E)
