"""`dp`: the exact dynamic program over a discretised budget and a θ grid. Pure. The reference.

Every option (C tops of every grid size) of every layer is evaluated; best_l[u] is the fastest
option of layer l within u budget units, and F[l][u] = min_v F[l−1][u−v] + best_l[v] (docs/design.md §6).
O(L · options) model evaluations and O(L · U²) for the program; exact on its grid.
"""

from __future__ import annotations

import attrs
import numpy as np

from moepic.configurators.base import ConfiguratorConfig, best_per_budget, min_plus, register_configurator, top_grid, units_for
from moepic.perfmodel.latency import LatencyModel, LayerChoice


@attrs.frozen(kw_only=True)
class DPConfig(ConfiguratorConfig):
    budget_units: int = attrs.field(default=500, validator=attrs.validators.ge(1))
    theta_steps: int = attrs.field(default=0, validator=attrs.validators.ge(0))  # 0: every neuron block


@register_configurator("dp", DPConfig)
class DynamicProgram:
    def __init__(self, config: DPConfig) -> None:
        self.config = config

    def configure(self, model: LatencyModel, cache_bytes: int) -> tuple[LayerChoice, ...]:
        U, E = self.config.budget_units, model.num_experts
        unit = cache_bytes / U
        tops = top_grid(model, self.config.theta_steps)
        slots_X = np.repeat(np.arange(E + 1), len(tops))
        top_X = np.tile(tops, E + 1)
        keep = (top_X > 0) | (slots_X == 0)  # θ = 0 caches nothing: one option
        slots_X, top_X = slots_X[keep], top_X[keep]
        tables = [best_per_budget(units_for(slots_X, top_X, model.times_for(c).neuron_bytes, unit), model.layer_s(c, slots_X, top_X), U)
                  for c in range(model.num_layers)]
        # Forward: F[l][u]; remember each layer's share v for the backtrack.
        total_U, shares = tables[0][0], []
        for best_U, _ in tables[1:]:
            total_U, share_U = min_plus(total_U, best_U)
            shares.append(share_U)
        u = int(np.argmin(total_U))
        choices = []
        for c in range(model.num_layers - 1, -1, -1):
            v = int(shares[c - 1][u]) if c else u
            x = tables[c][1][v]
            choices.append(LayerChoice(slots=int(slots_X[x]), top_neurons=int(top_X[x])))
            u -= v
        return tuple(reversed(choices))
