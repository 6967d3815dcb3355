"""Configurators against each other and against the budget: moepic ≈ dp, dp exact on its grid,
nothing ever over budget, the fixed point settles from any start, and the θ limits of the paper."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import assume, given, strategies as st

from moepic.cache.layout import BudgetError, plan_layout
from moepic.configurators import CONFIGURATORS, configure_cache
from moepic.configurators.base import best_per_budget, top_grid, units_for
from moepic.configurators.moepic import DivideAndConquer, MoEpicConfig, fixed_point
from moepic.perfmodel.latency import LayerChoice
from moepic.registry import Registry
from perf_support import latency_models

STAGING = 2


def build(name: str, **knobs):
    return CONFIGURATORS.build(CONFIGURATORS[name].config(**knobs))


def all_bytes(model) -> int:
    return model.num_layers * model.num_experts * model.times.expert_bytes


def budget_between(model, fraction: float) -> int:
    """A global budget from the staging minimum up to just below all expert bytes."""
    low = STAGING * model.times.expert_bytes
    assume(all_bytes(model) - 1 > low)
    return int(low + fraction * (all_bytes(model) - 1 - low))


@given(latency_models(), st.floats(0, 1))
def test_moepic_is_within_one_percent_of_the_exact_program(model, fraction):
    budget = budget_between(model, fraction)
    dp = configure_cache(build("dp", budget_units=120), model, budget, STAGING)
    ours = configure_cache(build("moepic", budget_units=120), model, budget, STAGING)
    assert ours.predicted_s <= dp.predicted_s * 1.01


@given(latency_models(), st.floats(0, 1), st.sampled_from(["moepic", "dp", "uniform"]))
def test_no_configurator_exceeds_the_budget_and_the_engine_reads_back_its_choice(model, fraction, name):
    budget = budget_between(model, fraction)
    chosen = configure_cache(build(name), model, budget, STAGING)
    assert chosen.total_bytes <= budget
    t, E = model.times, model.num_experts
    for c in chosen.layers:
        assert 0 <= c.slots <= E and 0 <= c.top_neurons <= t.ffn_size and c.top_neurons % t.block == 0
        assert c.slots == 0 or c.top_neurons > 0
    # The YAML it becomes (per-layer bytes, θ) gives the engine's planner the same caches.
    spec_like = _spec_for(model)
    layout = plan_layout(
        spec_like, dtype_bytes=2, budget=[f"{b}B" for b in chosen.cache_bytes()], theta=chosen.thetas(t.block),
        widest_neuron_block=t.block, staging_experts=STAGING,
    )
    assert [(l.slots, l.top_neurons) for l in layout.layers] == [(c.slots, c.top_neurons) for c in chosen.layers]
    assert layout.cache_bytes + layout.staging_bytes <= budget


@given(latency_models(), st.floats(0, 1.2), st.sampled_from([0.0, 0.3, 0.5, 1.0]))
def test_uniform_configurator_and_the_layout_apply_one_rule_for_slots_the_minimum_and_all_resident(model, share, theta):
    """A global budget anywhere from nothing to more than every expert: the `uniform` configurator and
    `plan_layout` (what the engine runs) fail alike below staging, and otherwise give the same slots,
    tops and staging (at θ = 1 both keep every expert whole where the budget holds them all)."""
    t = model.times
    budget = int(share * all_bytes(model))
    outcomes = []
    for lay_out in (
        lambda: configure_cache(build("uniform", theta=theta), model, budget, STAGING),
        lambda: plan_layout(_spec_for(model), dtype_bytes=2, budget=f"{budget}B", theta=theta, widest_neuron_block=t.block,
                            staging_experts=STAGING),
    ):
        try:
            chosen = lay_out()
        except BudgetError as e:
            outcomes.append(str(e).split(" is ", 1)[1])  # after the budget's own name
        else:
            outcomes.append(([(c.slots, c.top_neurons) for c in chosen.layers], chosen.staging_experts))
    if budget >= all_bytes(model) and theta < 1:
        return  # the configurator caches whole experts whatever its θ; a layout keeps the θ it is given
    assert outcomes[0] == outcomes[1]
    below = budget < STAGING * t.expert_bytes
    assert isinstance(outcomes[0], str) == below
    if budget >= all_bytes(model):
        assert outcomes[0] == ([(model.num_experts, t.ffn_size)] * model.num_layers, 0)


def _spec_for(model):
    from perf_support import moe_spec

    t = model.times
    hidden = t.neuron_bytes // 2 // 3
    return moe_spec(model.num_layers, model.num_experts, model.k, hidden, t.ffn_size)


@given(latency_models(max_layers=3, max_experts=4), st.floats(0, 1))
def test_the_dynamic_program_is_optimal_on_its_grid(model, fraction):
    """Brute force over every combination of per-layer options that fits the discretised budget."""
    U, budget = 12, budget_between(model, fraction)
    cache = budget - STAGING * model.times.expert_bytes
    unit = cache / U
    tops = top_grid(model, 3)
    options = [(c, t) for c in range(model.num_experts + 1) for t in tops if (t > 0) == (c > 0) or c == 0]
    options = sorted(set((c, t if c else 0) for c, t in options))
    units = {o: int(units_for(o[0], o[1], model.times.neuron_bytes, unit)) for o in options}
    best = np.inf
    for combo in itertools.product(options, repeat=model.num_layers):
        if sum(units[o] for o in combo) <= U:
            best = min(best, model.token_s([LayerChoice(slots=c, top_neurons=t) for c, t in combo]))
    chosen = configure_cache(build("dp", budget_units=U, theta_steps=3), model, budget, STAGING)
    assert chosen.predicted_s == pytest.approx(best, rel=1e-9)


@given(latency_models(), st.floats(0, 1), st.data())
def test_the_fixed_point_iteration_settles_from_any_start(model, fraction, data):
    t = model.times
    blocks = t.ffn_size // t.block
    configurator = DivideAndConquer(MoEpicConfig())
    budgets = np.array([int(fraction * model.num_experts * t.expert_bytes)])
    column = data.draw(st.integers(0, model.num_layers - 1))
    g = configurator.theta_map(model, column, budgets)
    start = np.array([data.draw(st.integers(0, blocks))])
    b, steps = fixed_point(g, start, blocks + 1)
    assert np.array_equal(g(b), b)
    assert steps <= blocks + 1
    # g is monotone, which is why it settles: check it on the whole grid.
    grid = np.arange(blocks + 1)
    values = np.array([g(np.array([b]))[0] for b in grid])
    assert (np.diff(values) >= 0).all()


@given(latency_models(), st.floats(0, 1), st.floats(0, 1))
def test_theta_zero_caches_nothing_so_its_latency_does_not_depend_on_the_budget(model, f1, f2):
    a = configure_cache(build("uniform", theta=0.0), model, budget_between(model, f1), STAGING)
    b = configure_cache(build("uniform", theta=0.0), model, budget_between(model, f2), STAGING)
    assert a.predicted_s == pytest.approx(b.predicted_s, rel=1e-12)
    assert all(c.slots == 0 for c in a.layers)


@given(latency_models(), st.sampled_from(["moepic", "dp", "uniform"]))
def test_a_budget_that_holds_every_expert_loads_nothing_and_costs_compute_only(model, name):
    chosen = configure_cache(build(name, theta=1.0) if name == "uniform" else build(name), model, all_bytes(model), STAGING)
    assert chosen.staging_experts == 0
    assert all(c.slots == model.num_experts and c.top_neurons == model.times.ffn_size for c in chosen.layers)
    for part in model.breakdown(chosen.layers):
        assert max(part["demand"], part["exposed_prefetch"], part["assemble"]) < 1e-15 and part["bytes"] < 1e-6


@given(latency_models(), st.floats(0, 1))
def test_whole_expert_hits_load_nothing_and_split_hits_load_their_bottom(model, fraction):
    t = model.times
    slots = np.arange(model.num_experts + 1)
    whole = model.parts(0, slots, np.full(len(slots), t.ffn_size))
    h = model.workload.layers[0].hit_rate_C
    assert np.allclose(whole["bytes"], model.k * (1 - h) * t.expert_bytes)
    top = t.block * int(fraction * (t.ffn_size // t.block))
    split = model.parts(0, slots, np.full(len(slots), top))
    cached = h if top else np.zeros_like(h)
    expected = model.k * (cached * (t.ffn_size - top) * t.neuron_bytes + (1 - cached) * t.expert_bytes)
    assert np.allclose(split["bytes"], expected)


def test_a_budget_below_the_staging_buffers_fails_and_names_the_minimum():
    from hypothesis import find

    model = find(latency_models(), lambda m: True)
    with pytest.raises(BudgetError, match="minimum working set"):
        configure_cache(build("moepic"), model, STAGING * model.times.expert_bytes - 1, STAGING)


def test_every_configurator_is_registered_and_an_unknown_one_lists_them():
    assert {"uniform", "dp", "moepic"} <= set(CONFIGURATORS)
    assert isinstance(CONFIGURATORS, Registry) and CONFIGURATORS.default == "moepic"
    from moepic.errors import ConfigError

    with pytest.raises(ConfigError, match="known: dp, moepic, n_cpu_moe, uniform"):
        CONFIGURATORS.structure_node({"name": "greedy"}, "configurator")


def test_best_per_budget_keeps_the_fastest_option_that_fits_each_budget():
    units = np.array([0, 2, 2, 5, 9])
    latency = np.array([10.0, 7.0, 8.0, 3.0, 1.0])
    best, arg = best_per_budget(units, latency, 6)
    assert best.tolist() == [10, 10, 7, 7, 7, 3, 3]
    assert arg.tolist() == [0, 0, 1, 1, 1, 3, 3]
