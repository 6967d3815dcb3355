"""Workload profiles: what a routing trace says about each MoE layer, for the latency model. Pure.

Per MoE layer l:
- `hits_CJ[C, j]`: the probability that j of a decode step's k routed experts find their top
  segment cached, when the layer caches C tops (C = 0…E). It is measured by replaying the trace
  through the real planner and policy (moepic/cache/replay.py) with C slots, so it includes the
  policy's warm-up, admission rule and request boundaries. Its mean over j, divided by k, is the
  hit-rate curve h_l(C) of docs/design.md §5. The whole distribution is kept (not just h_l) because a
  step's exposed copy time is a maximum, and E[max] ≠ max[E]: that is what makes latency U-shaped
  in θ (a step with k hits hides its bottoms; a step with a miss cannot hide a whole expert).
  For large E the curve is replayed at a grid of C and interpolated linearly in between.
- `recall`: the share of its routed experts that the predictor named one MoE layer earlier (the
  first MoE layer: 0, nothing runs before it); `candidates`: experts prefetched per step (k′).
- `admissions_C[C]`: the misses a decode step admits to the cache, on average, with C tops (from the
  same replay): what a miss format fills from the host behind the step's copies.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import attrs
import numpy as np

from moepic.cache.layout import slot_count_layout
from moepic.cache.replay import replay_layer
from moepic.policies.base import CachePolicy, PolicyConfig, build_policy
from moepic.tracing import RoutingTrace
from moepic.tracing.checks import require_router_inputs


@attrs.frozen(kw_only=True, eq=False)
class LayerWorkload:
    layer: int  # model layer index
    hits_CJ: np.ndarray  # [E+1, k+1], rows sum to 1
    recall: float  # a_l
    candidates: float  # k′_l: experts prefetched per step (0: no prediction)
    admissions_C: np.ndarray | None = None  # [E+1] misses admitted per decode step (None: not measured, 0)

    def __attrs_post_init__(self) -> None:
        if self.hits_CJ.ndim != 2 or not np.allclose(self.hits_CJ.sum(1), 1.0) or (self.hits_CJ < -1e-12).any():
            raise ValueError(f"layer {self.layer}: hits_CJ must be [E+1, k+1] distributions over j")
        if not 0.0 <= self.recall <= 1.0:
            raise ValueError(f"layer {self.layer}: recall must be in [0, 1], got {self.recall}")
        if self.candidates < 0:
            raise ValueError(f"layer {self.layer}: candidates must be >= 0, got {self.candidates}")

    @property
    def hit_rate_C(self) -> np.ndarray:
        """h_l(C) for C = 0…E."""
        k = self.hits_CJ.shape[1] - 1
        return self.hits_CJ @ np.arange(k + 1) / k


@attrs.frozen(kw_only=True, eq=False)
class WorkloadProfile:
    num_experts: int
    top_k: int
    layers: tuple[LayerWorkload, ...]
    source: str = ""  # the trace and policy it was measured with

    def __attrs_post_init__(self) -> None:
        for l in self.layers:
            if l.hits_CJ.shape != (self.num_experts + 1, self.top_k + 1):
                raise ValueError(f"layer {l.layer}: hits_CJ has shape {l.hits_CJ.shape}, expected {(self.num_experts + 1, self.top_k + 1)}")


def curve_points(num_experts: int, max_points: int = 33) -> np.ndarray:
    """The cache sizes C at which to replay: every C for small E, else a grid dense at small C."""
    if num_experts + 1 <= max_points:
        return np.arange(num_experts + 1)
    grid = np.r_[np.arange(9), np.geomspace(8, num_experts, max_points - 9)]
    return np.unique(np.round(grid).astype(int))


def _interpolate(points_C: np.ndarray, values_PJ: np.ndarray, num_experts: int) -> np.ndarray:
    every_C = np.arange(num_experts + 1)
    return np.stack([np.interp(every_C, points_C, values_PJ[:, j]) for j in range(values_PJ.shape[1])], axis=1)


def hit_distribution(trace: RoutingTrace, column: int, policy: CachePolicy, slots: int) -> tuple[np.ndarray, float]:
    """[k+1]: the share of decode steps of MoE layer `column` with j routed experts cached, with
    `slots` tops; and the misses a decode step admits to the cache, on average."""
    E, k = trace.num_experts, trace.top_k
    layout = slot_count_layout(trace.moe_layers[column], E, slots)
    counted = decode_steps(trace)
    hist_J = np.zeros(k + 1)
    admitted = 0
    for plan, count in zip(replay_layer(trace, column, layout, policy), counted):
        if count:
            hist_J[sum(p.outcome != "miss" for p in plan.experts)] += 1
            admitted += sum(p.outcome == "miss" and p.slot is not None for p in plan.experts)
    return hist_J / hist_J.sum(), admitted / hist_J.sum()


def workload_from_trace(
    trace: RoutingTrace,
    policy: PolicyConfig | CachePolicy,
    *,
    recall_L: Sequence[float],
    candidates: float,
    progress: Callable[[int], None] = lambda done: None,
) -> WorkloadProfile:
    """Replay `trace` at every curve point of every MoE layer (`progress` is told after each layer).
    `policy`: a config, or a built policy (Belady needs its future given)."""
    if isinstance(policy, PolicyConfig):
        policy = build_policy(policy)
    E, k = trace.num_experts, trace.top_k
    if len(recall_L) != len(trace.moe_layers):
        raise ValueError(f"recall: expected one value per MoE layer ({len(trace.moe_layers)}), got {len(recall_L)}")
    points_C = curve_points(E)
    layers = []
    for column, layer in enumerate(trace.moe_layers):
        measured = [hit_distribution(trace, column, policy, int(c)) for c in points_C]
        measured_PJ = np.stack([hits_J for hits_J, _ in measured])
        admitted_P1 = np.array([[admitted] for _, admitted in measured])
        layers.append(LayerWorkload(
            layer=layer, hits_CJ=_interpolate(points_C, measured_PJ, E), recall=float(recall_L[column]),
            candidates=candidates if column else 0.0, admissions_C=_interpolate(points_C, admitted_P1, E)[:, 0],
        ))
        progress(column + 1)
    source = f"{trace.source or trace.model}: {trace.num_tokens} tokens, policy {policy.config.name}"
    return WorkloadProfile(num_experts=E, top_k=k, layers=tuple(layers), source=source)


def first_layer_unpredicted(recall: float, num_layers: int) -> list[float]:
    """One recall for every MoE layer but the first, which nothing before it can predict."""
    return [0.0] + [recall] * (num_layers - 1)


def decode_steps(trace: RoutingTrace) -> np.ndarray:
    """[N] the tokens whose statistics describe decoding: the decode steps, or all if there are none."""
    return ~trace.prefill_N if (~trace.prefill_N).any() else np.ones(trace.num_tokens, dtype=bool)


def check_router_inputs(trace: RoutingTrace, where: str) -> None:
    """What `measured_recall` needs of a trace, checked before any model is loaded (`where`: the trace's file)."""
    require_router_inputs(
        trace, where, "the trace has no router inputs, so the predictor's recall cannot be measured; "
        "record it with `moepic generate --record-trace FILE --trace-hidden`, or give --recall",
    )


def measured_recall(trace: RoutingTrace, predictor) -> list[float]:
    """Per MoE layer: the share of its routed experts (decode steps) that `predictor` named one MoE
    layer earlier, from its `trace_predictions` (0 for the first MoE layer: nothing runs before it)."""
    named = predictor.trace_predictions(trace)
    decode = decode_steps(trace)
    recall = []
    for column, layer in enumerate(trace.moe_layers):
        routed_NK = trace.expert_ids_NLK[decode, column]
        if layer not in named or not len(routed_NK):
            recall.append(0.0)
            continue
        named_NC = named[layer][decode, : predictor.candidates]
        recall.append(float((routed_NK[:, :, None] == named_NC[:, None, :]).any(-1).mean()))
    return recall
