"""What a cache replacement policy is, and the registry that builds one by name. Pure.

A policy is a state update plus a priority score (house style): it never touches the cache.
The residency planner (moepic/cache/planner.py) asks it, after each layer step, how much every
expert is worth keeping, and does the evicting itself. So a new policy is one small file:
a frozen config (its YAML keys), a state, and a class with `init`, `update` and `priority`,
registered under a name with `@register_policy`.

    step t of layer l ──update(state, step)──▶ state' ──priority(state')──▶ worth_E ──▶ planner
"""

from __future__ import annotations

from typing import ClassVar, Protocol, TypeVar

import attrs
import numpy as np

from moepic.registry import Registry, StrategyConfig
from moepic.tracing import RoutingTrace


@attrs.frozen(kw_only=True)
class LayerStep:
    """One forward step of one MoE layer, as a policy sees it.

    `clock` counts the tokens this layer routed before the step (so a decode step advances it by
    one, a prefill of T tokens by T); `counts_E[e]` is how many of the step's tokens chose expert e.
    `new_request` marks the first step of a request (LCP's μ counts within one request).
    """

    layer: int
    clock: int
    tokens: int
    counts_E: np.ndarray
    new_request: bool = False

    @property
    def used(self) -> np.ndarray:
        return np.flatnonzero(self.counts_E)


State = TypeVar("State")


class CachePolicy(Protocol[State]):
    def init(self, layer: int, num_experts: int) -> State:
        """The state before the layer's first step."""
        ...

    def update(self, state: State, step: LayerStep) -> State:
        """The state after `step` (returns a new value; never mutates `state`)."""
        ...

    def priority(self, state: State) -> np.ndarray:
        """float64 [E]: how much each expert is worth keeping now; the lowest is evicted first."""
        ...

    # Optional, for trace replays and the simulator: `priority_series(layer, num_experts, counts_SE,
    # clock_S, tokens_S, new_request_S)` → [S, E], the priority after each of S steps from `init`, vectorised
    # over steps. A policy's state depends on the routing alone, never on the cache, which is what
    # lets a replay compute it ahead. It must equal stepping `update`/`priority` (tested per policy).


POLICIES = Registry("policy", default="lcp")  # MoEpic's own is the default


class PolicyConfig(StrategyConfig):
    """Base of every policy's frozen config. A YAML node `{name: lcp, rho: 0.25}` becomes one.

    What a policy needs is declared here, by its config class, never inferred from its name:
    `trace_key` is the config key naming the routing trace it reads (None: it reads none), and
    `trace_keyword` the keyword its class takes that trace by directly (what a replay passes);
    `offered_by_auto` puts it among the choices of `moepic configure --policy auto`.
    """

    registry = POLICIES
    trace_key: ClassVar[str | None] = None
    trace_keyword: ClassVar[str | None] = None
    offered_by_auto: ClassVar[bool] = False


def register_policy(name: str, config: type[PolicyConfig]):
    """Class decorator: `name` in YAML builds `policy_class(config_instance)`."""
    return POLICIES.register(name, config)


def known_policies() -> str:
    return POLICIES.known()


def build_policy(config: PolicyConfig) -> CachePolicy:
    return POLICIES.build(config)


def build_policy_on(config: PolicyConfig, trace: RoutingTrace) -> CachePolicy:
    """The policy for a replay of `trace`: one that reads a trace (static's profile, belady's future)
    and names no file of its own is given `trace` itself."""
    if config.trace_key is None or getattr(config, config.trace_key) is not None:
        return POLICIES.build(config)
    return POLICIES.build(config, **{config.trace_keyword: trace})


def auto_policies() -> tuple[str, ...]:
    """The policies `--policy auto` chooses among, by predicted latency on the profiling trace (those
    whose config sets `offered_by_auto`): the default first (it wins a tie), then by name."""
    offered = (name for name, entry in POLICIES.items() if entry.config.offered_by_auto)
    return tuple(sorted(offered, key=lambda name: (name != POLICIES.default, name)))


def priority_series(
    policy: CachePolicy, layer: int, num_experts: int, counts_SE: np.ndarray, tokens_S: np.ndarray, new_request_S: np.ndarray
) -> np.ndarray:
    """[S, E]: what the planner ranks with at each of S consecutive steps of a layer (the priority
    after the step's update), from the layer's initial state; step by step unless the policy has a
    vectorised `priority_series`."""
    tokens_S = np.asarray(tokens_S, dtype=np.int64)
    clock_S = np.cumsum(tokens_S) - tokens_S
    series = getattr(policy, "priority_series", None)
    if series is not None:
        return series(layer, num_experts, counts_SE, clock_S, tokens_S, new_request_S)
    out_SE = np.empty(counts_SE.shape, dtype=np.float64)
    state = policy.init(layer, num_experts)
    for s, (counts_E, clock, tokens, new) in enumerate(zip(counts_SE, clock_S, tokens_S, new_request_S)):
        state = policy.update(state, LayerStep(layer=layer, clock=int(clock), tokens=int(tokens), counts_E=counts_E, new_request=bool(new)))
        out_SE[s] = policy.priority(state)
    return out_SE


def last_used_series(counts_SE: np.ndarray, clock_S: np.ndarray) -> np.ndarray:
    """[S, E]: `last_used_after` applied step after step (clocks only grow, so it is a running max)."""
    return np.maximum.accumulate(np.where(counts_SE > 0, clock_S[:, None], -1), axis=0)


def last_used_after(last_used_E: np.ndarray, step: LayerStep) -> np.ndarray:
    """A copy of the last-use clocks with the step's experts used now (states are values)."""
    out_E = last_used_E.copy()
    out_E[step.used] = step.clock
    return out_E


def recency_E(last_used_E: np.ndarray, clock: int) -> np.ndarray:
    """Tokens since each expert's last use (ν); never-used experts are infinitely old."""
    return np.where(last_used_E >= 0, clock - last_used_E, np.inf)
