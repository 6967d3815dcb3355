"""Builders the simulator's property tests share: hand-made routing traces and a simulated case
(a shape, a trace, a policy, a predictor, θ and a budget share)."""

from __future__ import annotations

import attrs
import numpy as np
from hypothesis import strategies as st

from moepic.cache.layout import plan_layout, staging_buffers
from moepic.core.spec import ModelSpec
from moepic.perfmodel.latency import model_times
from moepic.predictors.base import NoPredictor
from moepic.predictors.oracle import OracleConfig, OraclePredictor
from moepic.sim.run import SpecOnly
from moepic.sim.simulate import simulate
from moepic.tracing import RoutingTrace
from tests_support import policy_for


def routing_trace(ids_NLK, num_experts: int, *, moe_layers=None, sequence_N=None, prefill_N=None) -> RoutingTrace:
    ids = np.asarray(ids_NLK, dtype=np.int64)
    N, L, K = ids.shape
    sequence_N = np.zeros(N, np.int32) if sequence_N is None else np.asarray(sequence_N, np.int32)
    starts = np.r_[0, np.flatnonzero(np.diff(sequence_N)) + 1] if N else np.zeros(0, int)
    position_N = np.arange(N) - np.repeat(starts, np.diff(np.r_[starts, N])) if N else np.zeros(0, int)
    return RoutingTrace(
        model="hand-made", moe_layers=tuple(range(L)) if moe_layers is None else moe_layers, num_experts=num_experts,
        top_k=K, expert_ids_NLK=ids, weights_NLK=np.full((N, L, K), 1 / K, np.float32), sequence_N=sequence_N,
        position_N=position_N.astype(np.int32), prefill_N=np.zeros(N, bool) if prefill_N is None else np.asarray(prefill_N, bool),
    )


@st.composite
def requests(draw, max_sequences: int = 2, max_prompt: int = 4, max_decode: int = 8):
    """(prompt tokens, decode tokens) per sequence: a prompt of 0 tokens starts decoding at once."""
    n = draw(st.integers(1, max_sequences))
    return [(draw(st.integers(0, max_prompt)), draw(st.integers(1, max_decode))) for _ in range(n)]


def skewed_ids(rng: np.random.Generator, N: int, L: int, E: int, K: int, concentration: float) -> np.ndarray:
    popularity_LE = rng.dirichlet(np.full(E, concentration), size=L) + 1e-9
    popularity_LE /= popularity_LE.sum(-1, keepdims=True)
    ids = np.zeros((N, L, K), np.int64)
    for n in range(N):
        for l in range(L):
            ids[n, l] = rng.choice(E, K, replace=False, p=popularity_LE[l])
    return ids


def request_trace(rng, reqs, L: int, E: int, K: int, concentration: float = 0.5) -> RoutingTrace:
    """Each request: its prompt's tokens (prefill), then its decode tokens, one sequence each."""
    prefill_N = np.concatenate([np.r_[np.ones(p, bool), np.zeros(d, bool)] for p, d in reqs])
    sequence_N = np.concatenate([np.full(p + d, i) for i, (p, d) in enumerate(reqs)])
    return routing_trace(skewed_ids(rng, len(prefill_N), L, E, K, concentration), E, sequence_N=sequence_N, prefill_N=prefill_N)


@attrs.frozen
class Case:
    spec: ModelSpec
    trace: RoutingTrace
    policy: str
    predictor: str
    theta: float
    share: float

    @property
    def predicting(self) -> bool:
        """The simulator charges the predictor's time only where it names a layer ahead: with one
        MoE layer, or without a predictor, there is none."""
        return self.predictor != "none" and len(self.spec.moe_layers) > 1

    def build_predictor(self):
        if self.predictor == "oracle":
            return OraclePredictor(OracleConfig(), SpecOnly(self.spec), future=self.trace)
        return NoPredictor()

    def layout(self, predictor):
        """`share` of the way from the minimum working set (staging) to every expert whole."""
        staging = staging_buffers(self.spec.moe.top_k, predictor)
        everything = plan_layout(self.spec, dtype_bytes=2, budget=1.0, theta=1.0)
        expert_bytes = everything.layers[0].expert_bytes
        least = staging * expert_bytes
        budget = least + int(self.share * max(0, everything.expert_bytes - least))
        return plan_layout(self.spec, dtype_bytes=2, budget=budget, theta=self.theta, staging_experts=staging)

    def run(self, hw, hybrid: str | None = None, *, layout=None):
        """(SimResult, ModelTimes); `hybrid` None: simulate's default."""
        predictor = self.build_predictor()
        times = model_times(hw, self.spec, dtype_bytes=2, predictor=predictor.horizon > 0)
        layout = layout or self.layout(predictor)
        more = {} if hybrid is None else {"hybrid": hybrid}
        return simulate(self.trace, layout, policy_for(self.policy, self.trace), times, hw, predictor, **more), times
