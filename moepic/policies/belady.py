"""Belady's MIN: keep the experts that will be used soonest. Needs the future, so it is offline. Pure.

With admission (a loaded expert may bypass the cache), evicting the expert whose next use is
furthest away maximises hits (ties: see `priority`): the upper bound every online policy is compared against. The
future comes from a routing trace of the same run (record one with `moepic generate
--record-trace`); the trace's token n is the layer's clock n. A trace of another run would give a
wrong bound, so every step checks that the run routes what the trace says (moepic/policies/own_future.py).
"""

from __future__ import annotations

from typing import final

import attrs
import numpy as np

from moepic.policies import own_future
from moepic.policies.base import LayerStep, PolicyConfig, register_policy
from moepic.tracing import RoutingTrace, trace_for
from moepic.tracing.checks import check_trace_covers


LOOKAHEAD_USES = 16
USER = "the belady policy"


@attrs.frozen(kw_only=True)
class BeladyConfig(PolicyConfig):
    # The run's routing trace: the future that the policy sees.
    trace: str | None = None

    trace_key, trace_keyword = "trace", "future"


@attrs.frozen(eq=False)
class BeladyState:
    uses_E: tuple[np.ndarray, ...]  # sorted clocks at which each expert is used
    next_clock: int  # the first clock after the latest step


@final
@register_policy("belady", BeladyConfig)
class BeladyPolicy:
    def __init__(self, config: BeladyConfig = BeladyConfig(), future: RoutingTrace | None = None) -> None:
        missing = "the belady policy needs the future: set cache.policy.trace=FILE (the run's trace)"
        self.future, self.where = trace_for(future, config.trace, missing=missing)
        self.config = config

    def init(self, layer: int, num_experts: int) -> BeladyState:
        ids_NK = self.future.expert_ids_NLK[:, check_trace_covers(self.where, self.future, layer, num_experts)]
        return BeladyState(tuple(np.flatnonzero((ids_NK == e).any(axis=1)) for e in range(num_experts)), 0)

    def check_prompt(self, prompt_tokens: int) -> None:
        own_future.check_prompt(self.where, self.future, prompt_tokens, USER)

    def update(self, state: BeladyState, step: LayerStep) -> BeladyState:
        column = check_trace_covers(self.where, self.future, step.layer, len(step.counts_E))
        own_future.check_step(self.where, self.future, column, step.layer, step.clock, step.tokens, step.counts_E, USER)
        return BeladyState(state.uses_E, step.clock + step.tokens)

    def priority(self, state: BeladyState) -> np.ndarray:
        """Minus each expert's rank by upcoming uses: the soonest next use ranks first.

        Ties on the next use are broken by the use after it, and so on (up to LOOKAHEAD_USES): with
        several experts per step a tie matters, because an expert the step uses cannot be evicted
        for one it does not, so keeping the one needed again sooner afterwards saves a later miss.
        Experts with the same upcoming uses share a rank.
        """
        E = len(state.uses_E)
        upcoming_EU = np.full((E, LOOKAHEAD_USES), np.inf)
        for e, uses in enumerate(state.uses_E):
            i = np.searchsorted(uses, state.next_clock)
            ahead = uses[i : i + LOOKAHEAD_USES]
            upcoming_EU[e, : len(ahead)] = ahead
        order = np.lexsort(upcoming_EU.T[::-1])  # lexsort's last key is the primary one
        in_order = upcoming_EU[order]
        starts_group = np.r_[True, (in_order[1:] != in_order[:-1]).any(axis=1)]
        rank_E = np.empty(E)
        rank_E[order] = np.cumsum(starts_group)
        return -rank_E

    def priority_series(self, layer, num_experts, counts_SE, clock_S, tokens_S, new_request_S) -> np.ndarray:
        """`priority` after every step at once: one lexicographic sort of all steps' upcoming uses."""
        uses_E = self.init(layer, num_experts).uses_E
        column = self.future.moe_layers.index(layer)  # init checked it is there
        own_future.check_steps(self.where, self.future, column, layer, clock_S, tokens_S, counts_SE, USER)
        S, E = len(clock_S), num_experts
        if not S:
            return np.zeros((0, E))
        next_S = clock_S + tokens_S
        width = max((len(u) for u in uses_E), default=0) + LOOKAHEAD_USES
        padded_EW = np.full((E, width), np.inf)
        for e, uses in enumerate(uses_E):
            padded_EW[e, : len(uses)] = uses
        first_SE = np.stack([np.searchsorted(uses, next_S) for uses in uses_E], axis=1)
        upcoming_SEU = padded_EW[np.arange(E)[None, :, None], first_SE[:, :, None] + np.arange(LOOKAHEAD_USES)]
        keys = upcoming_SEU.reshape(S * E, LOOKAHEAD_USES)
        step = np.repeat(np.arange(S), E)
        order = np.lexsort((*keys.T[::-1], step))  # by step, then the soonest uses
        in_order = keys[order]
        new_step = np.r_[True, step[order][1:] != step[order][:-1]]
        starts_group = new_step | np.r_[True, (in_order[1:] != in_order[:-1]).any(axis=1)]
        rank = np.cumsum(starts_group)
        rank -= np.maximum.accumulate(np.where(new_step, rank - 1, 0))  # ranks restart at 1 in each step
        rank_flat = np.empty(S * E)
        rank_flat[order] = rank
        return -rank_flat.reshape(S, E)
