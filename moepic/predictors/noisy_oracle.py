"""Noisy oracle: the future read from a trace, then degraded to a chosen recall. Pure.

It stands in for a real predictor where one cannot run: the shared JSONL traces carry no hidden
states, so gate lookahead cannot be replayed on them, but its measured or published recall can
(docs/design.md §4: 80–97 %). For every token and MoE layer it names each truly routed expert with
probability `recall` (per layer, seeded, independently) and fills the rest of its k′ candidates
with experts the layer does not route, drawn uniformly: so precision = recall·k/k′ on average.
Named experts come first, then the wrong guesses (a real predictor scores its hits higher too).
In a run, as the oracle, the trace must be this run's own (moepic/policies/own_future.py).
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import numpy as np

from moepic.core.model import Model
from moepic.policies import own_future
from moepic.predictors.base import PredictorConfig, layers_ahead, merge_votes, nearest, register_predictor
from moepic.tracing import RoutingTrace, trace_for
from moepic.tracing.checks import check_trace_covers


def _recall_values(instance, attribute, value) -> None:
    values = value if isinstance(value, tuple) else (value,)
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1 for v in values):
        raise ValueError(f"predictor.recall must be a number in [0, 1] or one per MoE layer, got {value!r}")


def _recall_converter(value):
    return tuple(value) if isinstance(value, list) else value


@attrs.frozen(kw_only=True)
class NoisyOracleConfig(PredictorConfig):
    recall: float | tuple[float, ...] = attrs.field(default=0.85, converter=_recall_converter, validator=_recall_values)
    candidates: int | None = attrs.field(default=None, validator=attrs.validators.optional(attrs.validators.ge(1)))  # k′ (default: top-k)
    seed: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    trace: str | None = None  # the run's routing trace (the future it degrades)
    horizon: ClassVar[int] = 1  # one MoE layer ahead

    reads_the_future = True


@register_predictor("noisy_oracle", NoisyOracleConfig)
class NoisyOracle:
    horizon = 1
    reads = "router_input"

    def __init__(self, config: NoisyOracleConfig, model: Model, future: RoutingTrace | None = None) -> None:
        """Needs only `model.spec` (the simulator passes a shape without weights)."""
        missing = "the noisy_oracle predictor needs the future: set predictor.trace=FILE (the run's trace)"
        self.future, self.where = trace_for(future, config.trace, missing=missing)
        spec = model.spec
        moe_layers = spec.moe_layers
        columns = [check_trace_covers(self.where, self.future, l, spec.moe.num_experts) for l in moe_layers]
        self.columns = dict(zip(moe_layers, columns))
        recall = config.recall if isinstance(config.recall, tuple) else (config.recall,) * len(moe_layers)
        if len(recall) != len(moe_layers):
            raise ValueError(f"predictor.recall: expected one value per MoE layer ({len(moe_layers)}), got {len(recall)}")
        self.config = config
        self.num_experts = spec.moe.num_experts
        self.candidates = min(config.prefetch_shape(spec.moe.top_k).candidates, self.num_experts)
        self.targets = layers_ahead(moe_layers, spec.num_layers, 1)
        rng = np.random.default_rng(config.seed)
        self.table = {l: self._named(self.future.expert_ids_NLK[:, c], recall[i], rng) for i, (l, c) in enumerate(zip(moe_layers, columns))}

    def _named(self, routed_NK: np.ndarray, recall: float, rng: np.random.Generator) -> np.ndarray:
        """[N, k′]: per token, the named routed experts, then wrong guesses."""
        N, E = len(routed_NK), self.num_experts
        rows = np.arange(N)[:, None]
        keys_NE = rng.random((N, E))  # wrong guesses: a uniform draw among the unrouted experts
        keys_NE[rows, routed_NK] = np.where(rng.random(routed_NK.shape) < recall, -1.0, np.inf)
        order_NE = np.argsort(keys_NE, axis=1, kind="stable")[:, : self.candidates]
        named_NE = np.take_along_axis(keys_NE, order_NE, axis=1)
        return np.where(np.isinf(named_NE), -1, order_NE)  # −1: fewer candidates than k′ (k′ > E − k)

    def init(self) -> None:
        return None

    def guess(self, layer: int, hidden_TD) -> None:
        return None  # it reads the trace on the host

    def check_prompt(self, prompt_tokens: int) -> None:
        own_future.check_prompt(self.where, self.future, prompt_tokens, "the noisy_oracle predictor")

    def check_routing(self, layer: int, clock: int, ids_per_token) -> None:
        counts_E = own_future.routed_counts(ids_per_token, self.num_experts)
        own_future.check_step(
            self.where, self.future, self.columns[layer], layer, clock, len(ids_per_token), counts_E, "the noisy_oracle predictor"
        )

    def predict(self, state, layer: int, hidden_TD, clock: int, guess_rows=None):
        tokens = hidden_TD.shape[0]
        return {t: merge_votes([[e for e in row if e >= 0] for row in self.table[t][clock : clock + tokens].tolist()])
                for t in self.targets.get(layer, ())}, state

    def trace_predictions(self, trace: RoutingTrace) -> dict[int, np.ndarray]:
        """[N, k′] per target MoE layer: what `predict` names for each token of `trace` (its future)."""
        return nearest(self.trace_predictions_ahead(trace))

    def trace_predictions_ahead(self, trace: RoutingTrace) -> dict[tuple[int, int], np.ndarray]:
        if trace is not self.future:
            raise ValueError("noisy_oracle predicts only the trace it was built with")
        # What the MoE layers name for the next one: never the first MoE layer (nothing routes before it).
        return {(layer, t): self.table[t] for layer in self.table for t in self.targets[layer]}
