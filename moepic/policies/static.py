"""Static (Fiddler-style): keep the experts a routing profile says are most popular. Pure.

The priority is each expert's share of its layer's routing in a profile trace, fixed for the
whole run, so the cache settles on the profile's top experts and then never changes. No warm-up
copies: a popular expert enters the cache the first time it is loaded.
"""

from __future__ import annotations

from typing import final

import attrs
import numpy as np

from moepic.errors import ConfigError
from moepic.policies.base import LayerStep, PolicyConfig, register_policy
from moepic.tracing import RoutingTrace, load_any_trace


@attrs.frozen(kw_only=True)
class StaticConfig(PolicyConfig):
    # A routing trace (.npz from `moepic generate --record-trace`, or a .jsonl log) to count shares in.
    profile: str | None = None


@attrs.frozen(eq=False)
class StaticState:
    share_E: np.ndarray


@final
@register_policy("static", StaticConfig)
class StaticPolicy:
    def __init__(self, config: StaticConfig = StaticConfig(), profile: RoutingTrace | None = None) -> None:
        if profile is None:
            if config.profile is None:
                raise ConfigError("the static policy needs a routing profile: set cache.policy.profile=FILE (a trace)")
            profile = load_any_trace(config.profile)
        from moepic.analysis.routing_stats import expert_shares

        self.config = config
        self.num_experts = profile.num_experts
        self.share_by_layer = dict(zip(profile.moe_layers, expert_shares(profile)))
        self.where = config.profile or profile.source or "the profile trace"

    def init(self, layer: int, num_experts: int) -> StaticState:
        if layer not in self.share_by_layer or num_experts != self.num_experts:
            raise ConfigError(
                f"{self.where}: profile has MoE layers {sorted(self.share_by_layer)} with {self.num_experts} experts; "
                f"the model's layer {layer} has {num_experts}"
            )
        return StaticState(self.share_by_layer[layer])

    def update(self, state: StaticState, step: LayerStep) -> StaticState:
        return state

    def priority(self, state: StaticState) -> np.ndarray:
        return state.share_E
