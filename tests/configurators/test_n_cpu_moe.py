"""configurators/n_cpu_moe.py: llama.cpp's `--n-cpu-moe N` — the last MoE layers resident whole, the
first N with nothing on the device — against any budget (property), and its baseline in the simulator."""

from __future__ import annotations

import attrs
import numpy as np
import pytest
from hypothesis import given, strategies as st

from moepic.configurators import CONFIGURATORS, configure_cache
from moepic.errors import ConfigError
from moepic.perfmodel.hardware import load_host, load_profile
from moepic.perfmodel.latency import LatencyModel, model_times
from moepic.sim.baseline import load_baseline
from moepic.sim.run import Testbed, check_trace_fits, run_setup
from moepic.sim.shapes import PRESETS
from moepic.tracing.synthetic import SyntheticRouting, generate_trace
from perf_support import latency_models, moe_spec, power_curve, workload

STAGING = 2


def n_cpu_moe():
    return CONFIGURATORS.build(CONFIGURATORS["n_cpu_moe"].config())


def all_bytes(model) -> int:
    return model.num_layers * model.num_experts * model.times.expert_bytes


@given(latency_models(), st.floats(0, 1.2))
def test_the_last_layers_are_resident_whole_the_first_empty_as_many_as_the_bytes_hold(model, share):
    t, E, L = model.times, model.num_experts, model.num_layers
    cache_bytes = int(share * all_bytes(model))
    layers = n_cpu_moe().configure(model, cache_bytes)
    assert len(layers) == L
    resident = [(c.slots, c.top_neurons) == (E, t.ffn_size) for c in layers]
    empty = [(c.slots, c.top_neurons) == (0, 0) for c in layers]
    assert all(r != e for r, e in zip(resident, empty)), "a layer neither whole nor empty"
    on_host = sum(empty)
    assert empty == [True] * on_host + [False] * (L - on_host)  # the first N on the host, the rest resident
    used = sum(c.slots * c.top_neurons * t.neuron_bytes for c in layers)
    assert used == sum(resident) * E * t.expert_bytes <= cache_bytes
    # The most that fit: one more resident layer would not.
    assert on_host == 0 or used + E * t.expert_bytes > cache_bytes


@given(latency_models(), st.floats(0, 1))
def test_n_cpu_moe_through_configure_cache_stays_within_the_budget_and_reads_back_as_thetas_zero_and_one(model, fraction):
    t = model.times
    low = STAGING * t.expert_bytes
    budget = low + int(fraction * max(0, all_bytes(model) - 1 - low))
    chosen = configure_cache(n_cpu_moe(), model, budget, STAGING)
    assert chosen.total_bytes <= budget
    assert set(chosen.thetas(t.block)) <= {0.0, 1.0}


def test_a_budget_of_two_and_a_half_layers_keeps_the_last_two_whole():
    E, L = 4, 5
    hw = load_profile("a6000")
    times = model_times(hw, moe_spec(L, E, 2, 256, 128), dtype_bytes=2, predictor=False)
    model = LatencyModel(hw, times, workload([power_curve(E, 2.0)] * L, 2, 0.0, 0))
    layers = n_cpu_moe().configure(model, int(2.5 * E * times.expert_bytes))
    assert [c.slots for c in layers] == [0, 0, 0, E, E]
    assert [c.top_neurons for c in layers] == [0, 0, 0, 128, 128]


# --- the llama-cpp-n-cpu-moe baseline ----------------------------------------------------------------


@pytest.fixture(scope="module")
def mixtral_trace():
    shape = PRESETS["mixtral-8x7b"]
    L = len(shape.spec.moe_layers)
    routing = SyntheticRouting(num_experts=8, top_k=2, skew=[1.0] * L, reuse=[1.0] * L, decay=[0.5] * L, correlation=[1.0] * L)
    return shape, check_trace_fits(generate_trace(routing, 12, seed=1, sequences=1), shape, "synthetic")


def test_the_llama_cpp_baseline_runs_its_first_layers_on_the_host_and_the_rest_resident(mixtral_trace):
    shape, trace = mixtral_trace
    hw = attrs.evolve(load_profile("a6000"), host=load_host("desktop-ddr5"))
    setup = load_baseline("llama-cpp-n-cpu-moe")
    assert setup.hybrid == "host-only" and setup.configurator is not None
    result = run_setup(setup, Testbed(trace=trace, shape=shape, hw=hw, budget=0.5)).result
    E, k = shape.spec.moe.num_experts, shape.spec.moe.top_k
    # Half of all expert bytes, less top-2 staging: 126 of 256 experts, so 15 of 32 layers whole.
    assert [l.slots for l in result.layout.layers] == [0] * 17 + [E] * 15
    assert all(l.fully_resident for l in result.layout.layers[17:])
    assert result.hybrid == "host-only" and result.demand_bytes == result.prefetch_bytes == 0
    for layer, host, decode in zip(result.layout.layers, result.host, result.decode):
        if layer.slots:
            assert decode.hits == decode.activations and host.experts == 0
        else:
            assert host.experts == decode.misses == result.tokens * k and host.fills == 0
    assert np.all(np.isfinite(result.token_s)) and np.all(result.host_s > 0)


def test_the_llama_cpp_baseline_without_a_host_asks_for_one(mixtral_trace):
    shape, trace = mixtral_trace
    with pytest.raises(ConfigError, match="--host"):
        run_setup(load_baseline("llama-cpp-n-cpu-moe"), Testbed(trace=trace, shape=shape, hw=load_profile("a6000"), budget=0.5))
