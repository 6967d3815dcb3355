"""`moepic`: divide and conquer over layers, with a fixed-point iteration on θ per layer. Pure.

MoEpic's configurator (docs/design.md §6), as we reconstruct it:
- conquer, per layer and budget level M: θ from the fixed point
      θ = g(θ) = clip((1 − B·W / (k·S)) / h(C(θ)), 0, 1),   C(θ) = min(E, ⌊M / (θS)⌋),
  the smallest θ at which an average step's bottoms hide behind the compute window W (B·W bytes).
  g is non-decreasing (a larger θ caches fewer tops, so h(C(θ)) can only fall), so on the grid of
  neuron blocks the iteration is monotone from any start and stops within F/block + 1 steps.
  It is then refined by evaluating T_l at the cache sizes around C(θ*), each with the largest top
  that M still holds (for a fixed C, a larger top only shrinks what is loaded), at a coarse sweep
  of C, at C = E (every expert's top cached) and at θ = 1; then around the best of those. The
  sweep is there because a measured h(C) need not be concave: with a late jump the fixed point
  (which sees only the hit rate where it stands) can sit far from the best cache size.
  Without a predictor nothing hides (W = 0) and the fixed point is θ = 1 / h: θ = 1 where h > 0.
- divide: the layer range is halved recursively and the halves' best-latency-per-budget tables
  are merged with a min-plus convolution, so the budget split between layers is exact on the
  discretised budget; the backtrack through the merge tree gives every layer its share.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import numpy as np

from moepic.cache.layout import slots_for
from moepic.configurators.base import ConfiguratorConfig, best_per_budget, min_plus, register_configurator, units_for
from moepic.perfmodel.latency import LatencyModel, LayerChoice


@attrs.frozen(kw_only=True)
class MoEpicConfig(ConfiguratorConfig):
    budget_units: int = attrs.field(default=500, validator=attrs.validators.ge(1))
    window: int = attrs.field(default=2, validator=attrs.validators.ge(0))  # cache sizes refined on each side of C(θ*)


def fixed_point(g: Callable[[np.ndarray], np.ndarray], start_X: np.ndarray, max_steps: int) -> tuple[np.ndarray, int]:
    """Iterate b ← g(b) elementwise until nothing moves; (the fixed points, steps taken).

    For a non-decreasing g on a finite grid every sequence is monotone, so it stops within the grid's size."""
    b_X = np.asarray(start_X)
    for step in range(max_steps + 1):
        nxt = g(b_X)
        if np.array_equal(nxt, b_X):
            return b_X, step
        b_X = nxt
    raise RuntimeError(f"the fixed-point iteration did not settle within {max_steps} steps (is g monotone?)")


def slots_at(model: LatencyModel, column: int, budget_X: np.ndarray, blocks_X: np.ndarray) -> np.ndarray:
    """C(θ) = min(E, ⌊M / top bytes⌋) for tops of `blocks_X` neuron blocks of MoE layer `column` (0 where there are none)."""
    t = model.times_for(column)
    return slots_for(budget_X, blocks_X * t.block * t.neuron_bytes, model.num_experts)


def _unique_pairs(pairs_X2: np.ndarray, ffn_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The distinct (slots, top) rows and each row's index among them (one integer key per pair: fast)."""
    keys, inverse = np.unique(pairs_X2[:, 0] * (ffn_size + 1) + pairs_X2[:, 1], return_inverse=True)
    return np.stack([keys // (ffn_size + 1), keys % (ffn_size + 1)], axis=1), inverse.ravel()


@register_configurator("moepic", MoEpicConfig)
class DivideAndConquer:
    def __init__(self, config: MoEpicConfig) -> None:
        self.config = config

    def theta_map(self, model: LatencyModel, column: int, budget_X: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        """g on top sizes in blocks (0…F/block), for each budget level M (bytes) of `budget_X`."""
        t, E, k = model.times_for(column), model.num_experts, model.k
        blocks = t.ffn_size // t.block
        layer = model.workload.layers[column]
        hidden_bytes = model.hw.link_gbps * 1e9 * model.window_s_L[column] if layer.candidates > 0 else 0.0
        need = 1.0 - hidden_bytes / (k * t.expert_bytes)  # the share of an expert that must be cached
        h_C = np.maximum.accumulate(layer.hit_rate_C)  # measured curves may dip; g must not

        def g(b_X: np.ndarray) -> np.ndarray:
            slots_X = np.where(b_X > 0, slots_at(model, column, budget_X, b_X), E)  # θ → 0: every top fits
            with np.errstate(divide="ignore"):
                theta_X = np.clip(np.where(h_C[slots_X] > 0, need / h_C[slots_X], 1.0 if need > 0 else 0.0), 0.0, 1.0)
            return np.ceil(theta_X * blocks - 1e-9).astype(np.int64)

        return g

    def layer_table(self, model: LatencyModel, column: int, unit: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """best[u] over u budget units for one layer, and each level's chosen (slots, top)."""
        U, E, t, R = self.config.budget_units, model.num_experts, model.times_for(column), self.config.window
        budget_V = np.floor(np.arange(U + 1) * unit).astype(np.int64)
        g = self.theta_map(model, column, budget_V)
        b_V, _ = fixed_point(g, np.zeros(U + 1, dtype=np.int64), t.ffn_size // t.block + 1)
        slots_star_V = np.where(b_V > 0, slots_at(model, column, budget_V, b_V), 0)
        window = np.arange(-R, R + 1)[None, :]

        def with_tops(slots_VN: np.ndarray) -> np.ndarray:
            """[V, N, 2] (slots, the largest top whose slots fit each level's budget)."""
            top_VN = (budget_V[:, None] // np.maximum(slots_VN * t.neuron_bytes, 1)) // t.block * t.block
            top_VN = np.where(slots_VN > 0, np.minimum(top_VN, t.ffn_size), 0)
            return np.stack([np.where(top_VN > 0, slots_VN, 0), top_VN], axis=-1)

        # First round: C(θ*) ± window; a coarse sweep of C, so that a curve with a late jump is not
        # missed; every expert's top cached (the smallest θ with C = E); whole experts (θ = 1).
        sweep = np.unique(np.linspace(0, E, min(E, 8) + 1).round().astype(np.int64))
        first_VN = np.concatenate([
            np.clip(slots_star_V[:, None] + window, 0, E),
            np.broadcast_to(sweep, (U + 1, len(sweep))),
            np.minimum(E, budget_V // t.expert_bytes)[:, None],
        ], axis=1)
        first = with_tops(first_VN)
        latency = self._evaluator(model, column)
        best_V = first[np.arange(U + 1), latency(first).argmin(1), 0]
        # Second round: the cache sizes around each level's best so far.
        second = with_tops(np.clip(best_V[:, None] + window, 0, E))
        pairs = _unique_pairs(np.concatenate([first.reshape(-1, 2), second.reshape(-1, 2)]), t.ffn_size)[0]
        units_X = units_for(pairs[:, 0], pairs[:, 1], t.neuron_bytes, unit)
        # Every candidate fits its own level; best_per_budget also lets a level use a cheaper level's pick.
        best_U, arg_U = best_per_budget(units_X, latency(pairs[None])[0], U)
        return best_U, pairs[arg_U, 0], pairs[arg_U, 1]

    @staticmethod
    def _evaluator(model: LatencyModel, column: int):
        """T_l of [..., 2] (slots, top) pairs, each distinct pair evaluated once."""

        def latency(pairs_VN2: np.ndarray) -> np.ndarray:
            unique, inverse = _unique_pairs(pairs_VN2.reshape(-1, 2), model.times.ffn_size)
            return model.layer_s(column, unique[:, 0], unique[:, 1])[inverse].reshape(pairs_VN2.shape[:-1])

        return latency

    def configure(self, model: LatencyModel, cache_bytes: int) -> tuple[LayerChoice, ...]:
        unit = cache_bytes / self.config.budget_units
        tables = [self.layer_table(model, c, unit) for c in range(model.num_layers)]

        def solve(lo: int, hi: int):
            """Best total latency per budget level for layers [lo, hi), and how to split it."""
            if hi - lo == 1:
                return tables[lo][0], None
            mid = (lo + hi) // 2
            left, left_plan = solve(lo, mid)
            right, right_plan = solve(mid, hi)
            total_U, right_units_U = min_plus(left, right)
            return total_U, (mid, left_plan, right_plan, right_units_U)

        def assign(lo: int, hi: int, plan, u: int, out: list) -> None:
            if plan is None:
                _, slots_U, top_U = tables[lo]
                out[lo] = LayerChoice(slots=int(slots_U[u]), top_neurons=int(top_U[u]))
                return
            mid, left_plan, right_plan, right_units_U = plan
            v = int(right_units_U[u])
            assign(lo, mid, left_plan, u - v, out)
            assign(mid, hi, right_plan, v, out)

        total_U, plan = solve(0, model.num_layers)
        out: list = [None] * model.num_layers
        assign(0, model.num_layers, plan, int(np.argmin(total_U)), out)
        return tuple(out)
