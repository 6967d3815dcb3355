"""Fit the engine's own host work (hardware profile) to measured engine runs. Pure.

The offloading engine spends host time the roofline does not see: planning each layer step and
handling each loaded expert (staging, submitting, waiting, reassembly). Given engine runs of known
layouts with their measured decode time, the simulator's prediction without that work leaves a
gap per run; `offload_step_us` and `load_us` are the non-negative least-squares fit of the gaps
to (planned steps per token, loads per token) over the copy-only runs. Hybrid runs, where given,
then fit `host_load_us` alone: what is left of their gap, per load computed on the host.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import numpy as np

from moepic.cache.layout import CacheLayout
from moepic.perfmodel.hardware import HardwareProfile
from moepic.perfmodel.latency import ModelTimes
from moepic.sim.simulate import simulate
from moepic.tracing import RoutingTrace


@attrs.frozen(eq=False)
class MeasuredRun:
    layout: CacheLayout
    policy: object
    predictor: object | None
    decode_s_per_token: float  # what the engine measured on the trace's run
    hybrid: str = "off"


def fit_engine_overheads(
    profile: HardwareProfile, times: ModelTimes, trace: RoutingTrace, runs: Sequence[MeasuredRun]
) -> HardwareProfile:
    """`profile` with `offload_step_us` and `load_us` fitted to `runs` (each on `trace`)."""
    bare = attrs.evolve(profile, offload_step_us=0.0, load_us=0.0)
    rows, gaps = [], []
    for run in (r for r in runs if r.hybrid == "off"):
        sim = simulate(trace, run.layout, run.policy, times, bare, run.predictor)
        steps = sum(not l.fully_resident for l in run.layout.layers)
        loads = sum(s.partial_hits + s.misses for s in sim.decode) / max(1, sim.tokens)
        rows.append((steps, loads))
        gaps.append(run.decode_s_per_token - float(sim.token_s.mean()))
    step_s, load_s = non_negative_least_squares(rows, gaps)
    fitted = attrs.evolve(profile, offload_step_us=step_s * 1e6, load_us=load_s * 1e6, host_load_us=0.0)
    hosted, host_gaps = [], []
    for run in (r for r in runs if r.hybrid != "off"):
        sim = simulate(trace, run.layout, run.policy, times, fitted, run.predictor, hybrid=run.hybrid)
        hosted.append(sum(h.experts + h.bottoms for h in sim.host) / max(1, sim.tokens))
        host_gaps.append(run.decode_s_per_token - float(sim.token_s.mean()))
    if not hosted or not any(hosted):
        return fitted
    host_load_s = max(0.0, float(np.dot(hosted, host_gaps) / np.dot(hosted, hosted)))
    return attrs.evolve(fitted, host_load_us=host_load_s * 1e6)


def non_negative_least_squares(rows, targets) -> tuple[float, float]:
    """argmin ‖A·x − b‖ over x ≥ 0 for two unknowns: the unconstrained fit, else the better one-variable fit."""
    A, b = np.asarray(rows, dtype=float), np.asarray(targets, dtype=float)
    x = np.linalg.lstsq(A, b, rcond=None)[0]
    if (x >= 0).all():
        return float(x[0]), float(x[1])
    best = (0.0, 0.0)
    for i in range(2):
        column = A[:, i]
        xi = max(0.0, float(column @ b / (column @ column))) if column @ column else 0.0
        candidate = (xi, 0.0) if i == 0 else (0.0, xi)
        if np.linalg.norm(A @ np.array(candidate) - b) < np.linalg.norm(A @ np.array(best) - b):
            best = candidate
    return best
