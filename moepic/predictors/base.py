"""What an expert predictor is, and the registry that builds one by name. Pure.

While layer l computes, the engine asks the predictor which experts the next `horizon` MoE layers
will route to, and copies them ahead (docs/design.md §4). A predictor sees layer l's router input
and returns, per target layer, candidate experts best first; the engine caps and prefetches them.

    layer l routes ─▶ predict(state, l, router_input_TD, clock) ─▶ {l+1: [e…], l+2: […]}, state'

State is an explicit value (oracle: nothing but the clock it is given; a learned predictor: none).
Predictions never change numbers, only what is copied early.
"""

from __future__ import annotations

from typing import ClassVar, Protocol, TypeVar

import attrs
import numpy as np
import torch

from moepic.cache.layout import PrefetchShape
from moepic.errors import ConfigError
from moepic.registry import Registry, StrategyConfig
from moepic.tracing.checks import require_router_inputs, router_inputs

PREDICTORS = Registry("predictor", default="none")

State = TypeVar("State")

# MoE layers ahead a predictor may target. Further ahead the routing has drifted too far to guess
# (the bundled model: a 0 % hit rate at 9), and every extra layer holds staging buffers.
MAX_HORIZON = 3


def horizon_problem(value, key: str) -> str | None:
    """Why `value` is no horizon (the message names `key`), or None: one rule for configs and flags."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_HORIZON:
        return f"{key} must be an integer from 1 to {MAX_HORIZON} (MoE layers ahead), got {value!r}"
    return None


def at_least_one(instance, attribute, value) -> None:
    """attrs validator of an optional count (`candidates`: None means the model's top-k)."""
    if value is not None and value < 1:
        raise ValueError(f"predictor.{attribute.name} must be >= 1, got {value}")


def check_horizon(instance, attribute, value) -> None:
    """attrs validator of a predictor config's `horizon`."""
    problem = horizon_problem(value, f"predictor.{attribute.name}")
    if problem:
        raise ValueError(problem)


class PredictorConfig(StrategyConfig):
    """Base of every predictor's frozen config: `{name: gate_lookahead, candidates: 3}`.

    What a predictor needs is declared here, by its config class, never inferred from its name:
    `needs_router_inputs`: it scores each MoE layer's router input with the model's weights, so a
    replay needs the model and a trace recorded with router inputs; `reads_the_future`: it reads the
    routing of the run it serves, passed to its class as `future=` (a replay passes the trace).
    """

    registry = PREDICTORS
    needs_router_inputs: ClassVar[bool] = False
    reads_the_future: ClassVar[bool] = False

    def recall_by_construction(self) -> float | None:
        """The recall it has without measuring (no prefetching: 0), or None: measure it on a trace."""
        return 0.0 if self.prefetch_shape(1).horizon == 0 else None

    def prefetch_shape(self, top_k: int) -> PrefetchShape:
        """k′ (a config's `candidates`, else the model's top-k) and the horizon (0: no prefetching).
        Staging is sized from it before any predictor is built (configure, the simulator)."""
        horizon = getattr(self, "horizon", 0)
        return PrefetchShape(candidates=(getattr(self, "candidates", None) or top_k) if horizon else 0, horizon=horizon)


def register_predictor(name: str, config: type[PredictorConfig]):
    return PREDICTORS.register(name, config)


class Predictor(Protocol[State]):
    horizon: int  # how many MoE layers ahead it predicts
    candidates: int  # at most this many experts a layer are worth prefetching (k′)
    # Where it reads the hidden state: "router_input" (as a MoE layer routes: the earliest, so the
    # copies overlap that layer's experts and the next attention) or "layer_output" (the residual
    # after a layer: more accurate, later, so the copies overlap only the next attention).
    reads: str

    def init(self) -> State:
        ...

    def guess(self, layer: int, hidden_TD: torch.Tensor) -> torch.Tensor | None:
        """Device-side part, if any: each token's candidate ids [T, n] for the layers ahead. The MoE
        block reads it back together with the routing, so predicting costs no extra host sync."""
        ...

    def predict(
        self, state: State, layer: int, hidden_TD: torch.Tensor, clock: int, guess_rows: list[list[int]] | None = None
    ) -> tuple[dict[int, list[int]], State]:
        """Per later MoE layer: candidate experts for this step's tokens, most likely first.
        `guess_rows` is `guess(...)` already on the host (computed and read here when None)."""
        ...

    def trace_predictions(self, trace) -> dict[int, np.ndarray]:
        """Per MoE layer, [N, k′] ids that the MoE layer before it names for each token of `trace`
        (best first, −1 pads), as `predict` would one token at a time (`nearest(trace_predictions_ahead)`)."""
        ...

    def trace_predictions_ahead(self, trace) -> dict[tuple[int, int], np.ndarray]:
        """For the simulator: per (source MoE layer, target MoE layer within the horizon), [N, k′]
        ids the source names for the target for each token of `trace`."""
        ...

    # Optional, for predictors that read the run's future from a trace (oracle, noisy_oracle):
    # `check_prompt(prompt_tokens)` before a run and `check_routing(layer, clock, ids_per_token)` as
    # each layer routes, which stop a run whose trace is not its own (moepic/policies/own_future.py).


def layers_ahead(moe_layers: tuple[int, ...], num_layers: int, horizon: int) -> dict[int, tuple[int, ...]]:
    """For every layer l: the next `horizon` MoE layers after it (what a prediction at l targets)."""
    return {l: tuple(m for m in moe_layers if m > l)[:horizon] for l in range(num_layers)}


def nearest(ahead: dict[tuple[int, int], np.ndarray]) -> dict[int, np.ndarray]:
    """Per target layer, what the closest source names (the MoE layer right before it)."""
    out, source_of = {}, {}
    for (source, target), named in sorted(ahead.items()):
        if source >= source_of.get(target, -1):
            source_of[target], out[target] = source, named
    return out


def merge_votes(rows: list[list[int]]) -> list[int]:
    """Tokens' candidate lists merged: one token's as it is (best first); several by votes, then id."""
    if len(rows) == 1:
        return list(rows[0])
    votes: dict[int, int] = {}
    for row in rows:
        for e in row:
            votes[e] = votes.get(e, 0) + 1
    return sorted(votes, key=lambda e: (-votes[e], e))


class ScoringPredictor:
    """A predictor that scores every expert of a layer ahead on the device (gate lookahead, mlp).

    Subclasses set `targets` (layer → layers ahead), `candidates` (k′), `num_experts`, `hidden_size`,
    `device` and `dtype`, and write `scores`; the top-k′ ids of all targets form one [T, targets·k′] tensor
    for the fused read.
    """

    targets: dict[int, tuple[int, ...]]
    candidates: int
    num_experts: int
    hidden_size: int  # D: the width of the router inputs it scores
    device: torch.device  # where it scores (the model's device and dtype)
    dtype: torch.dtype

    def scores(self, layer: int, target: int, hidden_TD: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def init(self) -> None:
        return None

    def guess(self, layer: int, hidden_TD: torch.Tensor) -> torch.Tensor | None:
        targets = self.targets.get(layer, ())
        if not targets:
            return None
        k = min(self.candidates, self.num_experts)
        return torch.cat([self.scores(layer, t, hidden_TD).topk(k, dim=-1).indices for t in targets], dim=1)

    def predict(self, state, layer: int, hidden_TD: torch.Tensor, clock: int, guess_rows=None):
        targets = self.targets.get(layer, ())
        if not targets:
            return {}, state
        rows = guess_rows if guess_rows is not None else self.guess(layer, hidden_TD).tolist()
        k = min(self.candidates, self.num_experts)
        return {t: merge_votes([row[i * k : (i + 1) * k] for row in rows]) for i, t in enumerate(targets)}, state

    def trace_predictions(self, trace) -> dict[int, np.ndarray]:
        return nearest(self.trace_predictions_ahead(trace))

    def trace_predictions_ahead(self, trace) -> dict[tuple[int, int], np.ndarray]:
        """[N, k′] per (source, target): what each MoE layer names for each later one within the
        horizon, from the trace's recorded router inputs (one batched `guess` per layer, as the
        engine computes it)."""
        if self.reads != "router_input":  # the trace records router inputs, not layer outputs
            raise ConfigError("only a predictor that reads the router input (gate_lookahead, mlp) can be run on a trace; give --recall")
        where = trace.source or "the trace"
        require_router_inputs(
            trace, where, "no router inputs to run the predictor on; record them with "
            "`moepic generate --record-trace FILE --trace-hidden`, or simulate a noisy_oracle with the predictor's recall",
        )
        hidden_NLD = router_inputs(trace, self.hidden_size, where)
        k = min(self.candidates, self.num_experts)
        out = {}
        for column, layer in enumerate(trace.moe_layers):
            targets = self.targets.get(layer, ())
            if targets:
                hidden_ND = torch.as_tensor(hidden_NLD[:, column]).to(self.device, self.dtype)
                guess_NX = self.guess(layer, hidden_ND).cpu().numpy()  # targets' top-k′ side by side
                out.update({(layer, t): guess_NX[:, i * k : (i + 1) * k] for i, t in enumerate(targets)})
        return out


@attrs.frozen(kw_only=True)
class NoneConfig(PredictorConfig):
    pass


@register_predictor("none", NoneConfig)
class NoPredictor:
    """No prediction: every expert is loaded on demand when its layer routes."""

    horizon = 0
    candidates = 0
    reads = "router_input"

    def __init__(self, config: NoneConfig = NoneConfig(), model=None) -> None:
        self.config = config

    def init(self) -> None:
        return None

    def guess(self, layer, hidden_TD):
        return None

    def predict(self, state, layer, hidden_TD, clock, guess_rows=None):
        return {}, state

    def trace_predictions(self, trace) -> dict[int, np.ndarray]:
        return {}

    def trace_predictions_ahead(self, trace) -> dict[tuple[int, int], np.ndarray]:
        return {}
