"""Static (Fiddler-style): keep the experts a routing profile says are most popular. Pure.

The priority is each expert's share of its layer's routing in a profile trace, fixed for the
whole run, so the cache settles on the profile's top experts and then never changes. No warm-up
copies: a popular expert enters the cache the first time it is loaded.
"""

from __future__ import annotations

from typing import final

import attrs
import numpy as np

from moepic.analysis.routing_stats import expert_shares
from moepic.policies.base import LayerStep, PolicyConfig, register_policy
from moepic.tracing import RoutingTrace, trace_for
from moepic.tracing.checks import check_trace_covers


@attrs.frozen(kw_only=True)
class StaticConfig(PolicyConfig):
    # A routing trace (.npz from `moepic generate --record-trace`, or a .jsonl log) to count shares in.
    profile: str | None = None

    trace_key, trace_keyword = "profile", "profile"


@attrs.frozen(eq=False)
class StaticState:
    share_E: np.ndarray


@final
@register_policy("static", StaticConfig)
class StaticPolicy:
    def __init__(self, config: StaticConfig = StaticConfig(), profile: RoutingTrace | None = None) -> None:
        missing = "the static policy needs a routing profile: set cache.policy.profile=FILE (a trace)"
        self.profile, self.where = trace_for(profile, config.profile, missing=missing)
        self.config = config
        self.shares_LE = expert_shares(self.profile)

    def init(self, layer: int, num_experts: int) -> StaticState:
        return StaticState(self.shares_LE[check_trace_covers(self.where, self.profile, layer, num_experts)])

    def update(self, state: StaticState, step: LayerStep) -> StaticState:
        return state

    def priority(self, state: StaticState) -> np.ndarray:
        return state.share_E

    def priority_series(self, layer, num_experts, counts_SE, clock_S, tokens_S, new_request_S) -> np.ndarray:
        return np.broadcast_to(self.init(layer, num_experts).share_E, counts_SE.shape)
