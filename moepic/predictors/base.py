"""What an expert predictor is, and the registry that builds one by name. Pure.

While layer l computes, the engine asks the predictor which experts the next `horizon` MoE layers
will route to, and copies them ahead (paper-brief §4). A predictor sees layer l's router input
and returns, per target layer, candidate experts best first; the engine caps and prefetches them.

    layer l routes ─▶ predict(state, l, router_input_TD, clock) ─▶ {l+1: [e…], l+2: […]}, state'

State is an explicit value (oracle: nothing but the clock it is given; a learned predictor: none).
Predictions never change numbers, only what is copied early.
"""

from __future__ import annotations

from typing import Protocol, TypeVar

import attrs
import torch

from moepic.registry import Registry, StrategyConfig

PREDICTORS = Registry("predictor", default="none")

State = TypeVar("State")


class PredictorConfig(StrategyConfig):
    """Base of every predictor's frozen config: `{name: gate_lookahead, candidates: 3}`."""

    registry = PREDICTORS


def register_predictor(name: str, config: type[PredictorConfig]):
    return PREDICTORS.register(name, config)


class Predictor(Protocol[State]):
    horizon: int  # how many MoE layers ahead it predicts
    candidates: int  # at most this many experts a layer are worth prefetching (k′)
    # Where it reads the hidden state: "router_input" (as a MoE layer routes: the earliest, so the
    # copies overlap that layer's experts and the next attention) or "layer_output" (the residual
    # after a layer: more accurate, later, so the copies overlap only the next attention).
    tap: str

    def init(self) -> State:
        ...

    def predict(
        self, state: State, layer: int, router_input_TD: torch.Tensor, clock: int
    ) -> tuple[dict[int, list[int]], State]:
        """Per later MoE layer: candidate experts for this step's tokens, most likely first."""
        ...


def layers_ahead(moe_layers: tuple[int, ...], num_layers: int, horizon: int) -> dict[int, tuple[int, ...]]:
    """For every layer l: the next `horizon` MoE layers after it (what a prediction at l targets)."""
    return {l: tuple(m for m in moe_layers if m > l)[:horizon] for l in range(num_layers)}


def candidates_from_scores(scores_TE: torch.Tensor, per_token: int) -> list[int]:
    """Each token's top `per_token` experts, merged: ordered by their best rank, then total score."""
    top_TK = scores_TE.topk(min(per_token, scores_TE.shape[-1]), dim=-1)
    if scores_TE.shape[0] == 1:  # decode: already in order
        return top_TK.indices[0].tolist()
    totals = torch.zeros(scores_TE.shape[-1], dtype=torch.float32, device=scores_TE.device)
    totals.index_add_(0, top_TK.indices.reshape(-1), torch.ones(top_TK.indices.numel(), device=scores_TE.device))
    chosen = totals.nonzero().squeeze(-1)
    return chosen[totals[chosen].argsort(descending=True, stable=True)].tolist()


@attrs.frozen(kw_only=True)
class NoneConfig(PredictorConfig):
    pass


@register_predictor("none", NoneConfig)
class NoPredictor:
    """No prediction: every expert is loaded on demand when its layer routes."""

    horizon = 0
    candidates = 0
    tap = "router_input"

    def __init__(self, config: NoneConfig = NoneConfig(), model=None) -> None:
        self.config = config

    def init(self) -> None:
        return None

    def predict(self, state, layer, router_input_TD, clock):
        return {}, state
