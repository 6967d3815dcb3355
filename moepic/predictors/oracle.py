"""Oracle: the future read from a trace of the same run: the upper bound for every predictor. Pure.

Only a trace of this very run is a bound: the engine shows it every step's routing
(`check_routing`), which must be the trace's (moepic/policies/own_future.py).
"""

from __future__ import annotations

import attrs
import numpy as np
import torch

from moepic.core.model import Model
from moepic.policies import own_future
from moepic.predictors.base import PredictorConfig, check_horizon, layers_ahead, merge_votes, nearest, register_predictor
from moepic.tracing import RoutingTrace, trace_for
from moepic.tracing.checks import check_trace_covers


@attrs.frozen(kw_only=True)
class OracleConfig(PredictorConfig):
    trace: str | None = None  # the run's routing trace (`moepic generate --record-trace`)
    horizon: int = attrs.field(default=1, validator=check_horizon)

    reads_the_future = True

    def recall_by_construction(self) -> float:
        return 1.0  # it names what the run routes


USER = "the oracle predictor"


@register_predictor("oracle", OracleConfig)
class OraclePredictor:
    def __init__(self, config: OracleConfig, model: Model, future: RoutingTrace | None = None) -> None:
        missing = "the oracle predictor needs the future: set predictor.trace=FILE (the run's trace)"
        self.future, self.where = trace_for(future, config.trace, missing=missing)
        self.config = config
        self.horizon = config.horizon
        self.candidates = model.spec.moe.top_k  # per token; a prefill step prefetches its most common
        moe_layers = model.spec.moe_layers
        self.targets = layers_ahead(moe_layers, model.spec.num_layers, config.horizon)
        self.reads = "router_input"
        self.columns = {l: check_trace_covers(self.where, self.future, l, model.spec.moe.num_experts) for l in moe_layers}

    def init(self) -> None:
        return None

    def guess(self, layer: int, hidden_TD: torch.Tensor) -> None:
        return None  # it reads the trace on the host: nothing to compute on the device

    def check_prompt(self, prompt_tokens: int) -> None:
        own_future.check_prompt(self.where, self.future, prompt_tokens, USER)

    def check_routing(self, layer: int, clock: int, ids_per_token) -> None:
        counts_E = own_future.routed_counts(ids_per_token, self.future.num_experts)
        own_future.check_step(self.where, self.future, self.columns[layer], layer, clock, len(ids_per_token), counts_E, USER)

    def predict(self, state, layer: int, hidden_TD: torch.Tensor, clock: int, guess_rows=None):
        tokens = hidden_TD.shape[0]
        out = {}
        for target in self.targets.get(layer, ()):
            ids_TK = self.future.expert_ids_NLK[clock : clock + tokens, self.columns[target]]
            out[target] = merge_votes(np.sort(ids_TK, axis=1).tolist())  # a prompt: its most used first
        return out, state

    def trace_predictions(self, trace: RoutingTrace) -> dict[int, np.ndarray]:
        return nearest(self.trace_predictions_ahead(trace))

    def trace_predictions_ahead(self, trace: RoutingTrace) -> dict[tuple[int, int], np.ndarray]:
        if trace is not self.future:
            raise ValueError("the oracle predicts only the trace it was built with")
        # One token's set, sorted as `predict` returns it; the same from every source.
        named = {t: np.sort(trace.expert_ids_NLK[:, c], axis=1) for t, c in self.columns.items()}
        return {(layer, t): named[t] for layer, targets in self.targets.items() if layer in self.columns for t in targets}
