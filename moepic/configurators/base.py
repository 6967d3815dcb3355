"""What a configurator is, the registry that builds one by name, and the budget bookkeeping they share. Pure.

A configurator turns a latency model (moepic/perfmodel/latency.py) and the bytes left for caches
into one `LayerChoice` per MoE layer: how many tops it caches and how large they are (θ).

    global budget ─▶ − staging (top_k + prefetch buffers) ─▶ cache bytes ─▶ configurator ─▶ {C_l, θ_l}

Everything that is not a choice between configurations lives here: staging, the all-resident
case (both by the rules of moepic/cache/layout.py, which the engine's layout follows too), and the
discretised budget the `dp` and `moepic` configurators share (a layer's option costs
⌈bytes / unit⌉ units, so whole units never add up to more than the budget).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Protocol

import attrs
import numpy as np

from moepic.cache.layout import cache_bytes_after_staging
from moepic.core.ffn import top_neurons_for
from moepic.perfmodel.latency import LatencyModel, LayerChoice
from moepic.perfmodel.workload import workload_from_trace
from moepic.registry import Registry, StrategyConfig

CONFIGURATORS = Registry("configurator", default="moepic")


class ConfiguratorConfig(StrategyConfig):
    registry = CONFIGURATORS


class Configurator(Protocol):
    def configure(self, model: LatencyModel, cache_bytes: int) -> tuple[LayerChoice, ...]:
        """One choice per MoE layer whose cache bytes sum to at most `cache_bytes`."""
        ...


def register_configurator(name: str, config: type[ConfiguratorConfig]):
    return CONFIGURATORS.register(name, config)


@attrs.frozen(kw_only=True)
class CacheConfiguration:
    layers: tuple[LayerChoice, ...]
    staging_experts: int
    neuron_bytes: tuple[int, ...]  # per MoE layer (layers may store their experts in different formats)
    ffn_size: int
    predicted_s: float  # per decode token

    def cache_bytes(self) -> list[int]:
        return [c.slots * c.top_neurons * n for c, n in zip(self.layers, self.neuron_bytes, strict=True)]

    @property
    def total_bytes(self) -> int:
        """Caches and staging (sized for the largest expert): what the run will hold on the device for routed experts."""
        return sum(self.cache_bytes()) + self.staging_experts * self.ffn_size * max(self.neuron_bytes)

    def thetas(self, block: int) -> list[float]:
        """θ per layer as a float that `top_neurons_for` reads back as exactly the chosen top."""
        out = []
        for c in self.layers:
            theta = c.top_neurons / self.ffn_size
            while top_neurons_for(theta, self.ffn_size, block) < c.top_neurons:  # 1/49·49 < 1 in floats
                theta = math.nextafter(theta, 1.0)
            out.append(theta)
        return out


def configure_cache(configurator: Configurator, model: LatencyModel, budget_bytes: int, staging_experts: int) -> CacheConfiguration:
    """The configurator's choice for a global budget (caches and staging), with its predicted latency.

    A budget that holds every whole expert needs no configurator (and no staging); one below the
    staging buffers cannot run at all."""
    t, E = model.times, model.num_experts
    layer_times = model.layer_times
    if budget_bytes >= sum(E * lt.expert_bytes for lt in layer_times):  # every expert whole: nothing to configure
        layers, staging_experts = (LayerChoice(slots=E, top_neurons=t.ffn_size),) * model.num_layers, 0
    else:
        staging_bytes = max(lt.expert_bytes for lt in layer_times)
        cache_bytes = cache_bytes_after_staging(budget_bytes, staging_experts, staging_bytes, what="budget")
        layers = tuple(configurator.configure(model, cache_bytes))
    return CacheConfiguration(
        layers=layers, staging_experts=staging_experts, neuron_bytes=tuple(lt.neuron_bytes for lt in layer_times),
        ffn_size=t.ffn_size, predicted_s=model.token_s(layers),
    )


@attrs.frozen(eq=False)
class TraceConfiguration:
    """The configuration chosen on a profiling trace, and what it was chosen with."""

    policy: object  # the winning candidate, as given (a config or a built policy)
    latency: LatencyModel
    chosen: CacheConfiguration
    workload_s: float  # replaying the trace for the workload profiles
    configure_s: float  # the configurator itself


def configure_on_trace(
    configurator: Configurator, trace, policies, *, hw, times, recall_L, candidates: float, budget_bytes: int,
    staging_experts: int, progress: Callable[[int], None] = lambda layers: None, hybrid: str = "off", dtype_bytes: int = 2,
) -> TraceConfiguration:
    """For each candidate policy (one, or `--policy auto`'s): its workload on `trace`, the latency
    model and the configurator's choice; the fastest predicted wins (`progress`: after each layer).
    `hybrid`: where the run computes its loads (moepic/cache/placement.py), which the latency model prices."""
    best, workload_s, configure_s = None, 0.0, 0.0
    for policy in policies:
        start = time.perf_counter()
        workload = workload_from_trace(trace, policy, recall_L=recall_L, candidates=candidates, progress=lambda done: progress(1))
        workload_s += time.perf_counter() - start
        latency = LatencyModel(hw, times, workload, hybrid=hybrid, dtype_bytes=dtype_bytes)
        start = time.perf_counter()
        chosen = configure_cache(configurator, latency, budget_bytes, staging_experts)
        configure_s += time.perf_counter() - start
        if best is None or chosen.predicted_s < best[2].predicted_s:
            best = (policy, latency, chosen)
    return TraceConfiguration(*best, workload_s=workload_s, configure_s=configure_s)


def top_grid(model: LatencyModel, steps: int = 0) -> np.ndarray:
    """Top sizes (neurons) to consider: every neuron block, or `steps` equal steps of θ rounded down to blocks."""
    t = model.times
    if not steps:
        return np.arange(0, t.ffn_size + 1, t.block)
    return np.unique(np.floor(np.linspace(0, 1, steps + 1) * t.ffn_size / t.block).astype(np.int64) * t.block)


def units_for(slots, top, neuron_bytes: int, unit_bytes: float) -> np.ndarray:
    """Budget units an option occupies: ⌈its bytes / unit⌉ (0 for an empty cache)."""
    nbytes = np.asarray(slots, dtype=np.float64) * np.asarray(top, dtype=np.float64) * neuron_bytes
    if unit_bytes <= 0:
        return np.where(nbytes > 0, np.iinfo(np.int64).max // 4, 0)
    return np.ceil(nbytes / unit_bytes - 1e-9).astype(np.int64)


def best_per_budget(units_X: np.ndarray, latency_X: np.ndarray, budget_units: int) -> tuple[np.ndarray, np.ndarray]:
    """best[u] = min latency over options with at most u units, and which option (index into X) gives it."""
    best_U = np.full(budget_units + 1, np.inf)
    arg_U = np.full(budget_units + 1, -1)
    fits = units_X <= budget_units
    order = np.lexsort((latency_X[fits], units_X[fits]))  # by units, then latency
    idx = np.flatnonzero(fits)[order]
    first = np.r_[True, units_X[idx][1:] != units_X[idx][:-1]]
    best_U[units_X[idx][first]] = latency_X[idx][first]
    arg_U[units_X[idx][first]] = idx[first]
    for u in range(1, budget_units + 1):  # prefix minimum, carrying the argmin
        if best_U[u - 1] < best_U[u]:
            best_U[u], arg_U[u] = best_U[u - 1], arg_U[u - 1]
    return best_U, arg_U


def min_plus(a_U: np.ndarray, b_U: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """c[u] = min over v ≤ u of a[u − v] + b[v], and the v that attains it."""
    U = len(a_U)
    u_idx, v_idx = np.arange(U)[:, None], np.arange(U)[None, :]
    total_UV = np.where(v_idx <= u_idx, a_U[np.clip(u_idx - v_idx, 0, None)] + b_U[None, :], np.inf)
    arg_U = total_UV.argmin(1)
    return total_UV[np.arange(U), arg_U], arg_U
