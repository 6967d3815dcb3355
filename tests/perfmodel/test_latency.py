"""The latency model: the U-shape in θ the paper reports, monotone in bandwidth, the configurator's
pick against uniform θ on the real Mixtral traces, and workload curves equal to trace replay."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

from moepic.cache.layout import plan_layout
from moepic.cache.replay import replay_trace
from moepic.configurators import CONFIGURATORS, configure_cache
from moepic.perfmodel.hardware import HardwareProfile, load_profile
from moepic.perfmodel.latency import LatencyModel, model_times
from moepic.perfmodel.workload import workload_from_trace, first_layer_unpredicted
from moepic.policies import PolicyConfig
from moepic.policies.base import POLICIES
from perf_support import latency_models, moe_spec, power_curve, workload
from tests_support import traces

SHARED = Path(__file__).resolve().parents[3] / "shared" / "traces" / "mixtral-8x7b-instruct-fp8"


def uniform_s(model, theta: float, budget: int, staging: int) -> float:
    configurator = CONFIGURATORS.build(CONFIGURATORS["uniform"].config(theta=theta))
    return configure_cache(configurator, model, budget, staging).predicted_s


def test_latency_is_u_shaped_in_theta_on_a_qwen15_moe_shaped_workload():
    """Qwen1.5-MoE-A2.7B shapes (60 experts, top-4, F=1408, a shared expert), an LCP-like hit curve
    (62 % at 30 of 60 cached, as the paper reports), ~97 % recall and a link that hides about two
    experts' copies behind a layer's compute: the paper's setting, constructed."""
    spec = moe_spec(24, 60, 4, 2048, 1408, shared=5632)
    hw = HardwareProfile(
        name="constructed", source="test", device="cuda", link_gbps=20.0, link_latency_us=10.0, device_copy_gbps=300.0,
        memory_gbps=600.0, matmul_tflops=100.0, expert_overhead_us=300.0, layer_overhead_us=800.0,
    )
    curve = power_curve(60, 1.4)
    assert curve[30] == pytest.approx(0.62, abs=0.01)
    model = LatencyModel(hw, model_times(hw, spec, dtype_bytes=2, predictor=True), workload([curve] * 24, 4, 0.97, 4))
    budget = int(0.25 * 24 * 60 * model.times.expert_bytes)
    thetas = np.linspace(0, 1, 11)
    latency = np.array([uniform_s(model, th, budget, 12) for th in thetas])
    best = int(latency.argmin())
    assert 0 < best < len(thetas) - 1, latency
    assert latency[0] > 1.2 * latency[best] and latency[-1] > 1.02 * latency[best], latency
    # Falling to the minimum, rising after it (allowing the small step at θ = 1, where hits stop copying).
    assert (np.diff(latency[: best + 1]) < 0).all() and (np.diff(latency[best:-1]) > 0).all(), latency


@given(latency_models(), st.floats(1.01, 10), st.data())
def test_a_faster_link_never_makes_a_configuration_slower(model, speedup, data):
    t = model.times
    slots = np.array([data.draw(st.integers(0, model.num_experts))])
    top = np.array([t.block * data.draw(st.integers(0, t.ffn_size // t.block))])
    import attrs

    faster = LatencyModel(attrs.evolve(model.hw, link_gbps=model.hw.link_gbps * speedup), t, model.workload)
    for column in range(model.num_layers):
        assert faster.layer_s(column, slots, top)[0] <= model.layer_s(column, slots, top)[0] * (1 + 1e-12)


@given(latency_models(), st.data())
def test_a_better_predictor_never_makes_a_configuration_slower(model, data):
    import attrs

    column = data.draw(st.integers(0, model.num_layers - 1))
    layer = model.workload.layers[column]
    better = attrs.evolve(layer, recall=data.draw(st.floats(layer.recall, 1.0)))
    layers = list(model.workload.layers)
    layers[column] = better
    other = LatencyModel(model.hw, model.times, attrs.evolve(model.workload, layers=tuple(layers)))
    t = model.times
    slots = np.arange(model.num_experts + 1)
    top = np.full(len(slots), t.block * data.draw(st.integers(0, t.ffn_size // t.block)))
    assert (other.layer_s(column, slots, top) <= model.layer_s(column, slots, top) * (1 + 1e-12) + 1e-15).all()


@given(traces(), st.sampled_from(sorted(POLICIES)), st.data())
def test_the_hit_rate_curve_is_the_replayed_hit_rate(trace, name, data):
    from hypothesis import assume

    assume(trace.num_tokens > 0 and name not in ("static", "belady"))  # those need a profile trace file
    trace = __import__("attrs").evolve(trace, prefill_N=np.zeros(trace.num_tokens, dtype=bool))
    policy: PolicyConfig = POLICIES[name].config()
    profile = workload_from_trace(trace, policy, recall_L=[0.0] * len(trace.moe_layers), candidates=0)
    slots = data.draw(st.integers(0, trace.num_experts))
    spec = moe_spec(len(trace.moe_layers), trace.num_experts, trace.top_k, 64, 64)
    spec = __import__("attrs").evolve(spec, layer_kinds=tuple("moe" if l in trace.moe_layers else "dense" for l in range(max(trace.moe_layers) + 1)), dense_ffn=64)
    layout = plan_layout(spec, dtype_bytes=2, budget=[f"{slots * 3 * 64 * 64 * 2}B"] * len(trace.moe_layers), theta=1.0)
    assert [l.slots for l in layout.layers] == [slots] * len(layout.layers)
    replayed = replay_trace(trace, layout, POLICIES.build(policy))
    for layer, stats in zip(profile.layers, replayed):
        assert layer.hit_rate_C[slots] == pytest.approx(stats.hit_rate)


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"the shared Mixtral traces are not at {SHARED}")
@pytest.mark.parametrize("fraction", [0.125, 0.25, 0.5])
def test_on_the_mixtral_traces_with_an_a6000_the_configurator_beats_every_uniform_theta(fraction):
    from moepic.policies.lcp import LCPConfig
    from moepic.tracing.jsonl import load_jsonl_trace

    trace = load_jsonl_trace(SHARED / "gsm8k_2_routing.jsonl")
    spec = moe_spec(32, 8, 2, 4096, 14336)
    hw = load_profile("a6000")
    profile = workload_from_trace(trace, LCPConfig(), recall_L=first_layer_unpredicted(0.85, 32), candidates=2)
    model = LatencyModel(hw, model_times(hw, spec, dtype_bytes=2, predictor=True), profile)
    budget = int(fraction * 32 * 8 * model.times.expert_bytes)
    ours = configure_cache(CONFIGURATORS.build(CONFIGURATORS["moepic"].config()), model, budget, 6).predicted_s
    for theta in (0.0, 0.25, 0.4, 0.6, 1.0):
        assert ours < uniform_s(model, theta, budget, 6)


@given(latency_models(), st.data())
def test_a_miss_format_prices_a_miss_at_its_low_bit_copy(model, data):
    """Bytes a step loads: each hit's bottom, each miss's low-bit copy (its own bytes without a miss
    format); compute: hits at the expert's kernel, misses at the copy's. Where every expert is a
    whole hit nothing changes."""
    import attrs

    t = model.times
    low = LatencyModel(model.hw, attrs.evolve(t, miss_neuron_bytes=t.neuron_bytes // 4, miss_expert_s=t.expert_s * 1.5),
                       model.workload)
    column = data.draw(st.integers(0, model.num_layers - 1))
    slots = np.arange(model.num_experts + 1)
    top = np.full(len(slots), t.block * data.draw(st.integers(0, t.ffn_size // t.block)))
    ours, theirs = low.parts(column, slots, top), model.parts(column, slots, top)
    h, k = ours["hit_rate"], model.k
    bottom = np.where(top == t.ffn_size, 0, (t.ffn_size - top) * t.neuron_bytes)
    np.testing.assert_allclose(ours["bytes"], k * (h * bottom + (1 - h) * t.ffn_size * (t.neuron_bytes // 4)))
    np.testing.assert_allclose(ours["compute"] - theirs["compute"], k * (1 - h) * 0.5 * t.expert_s, atol=1e-15)
    every = (slots == model.num_experts) & (top == t.ffn_size)
    np.testing.assert_allclose(low.layer_s(column, slots, top)[every], model.layer_s(column, slots, top)[every])


@given(latency_models(), st.data())
def test_a_miss_formats_fills_hold_the_link_for_the_admitted_tops(model, data):
    """Each admitted miss's full-precision top is filled from the host: on a layer that prefetches
    nothing (the first) it adds exactly its link time to the demand; it never makes a step faster."""
    import attrs

    t = model.times
    low_times = attrs.evolve(t, miss_neuron_bytes=max(1, t.neuron_bytes // 4), miss_expert_s=t.expert_s)
    admissions = data.draw(st.floats(0.0, float(model.k)))
    layers = tuple(attrs.evolve(l, admissions_C=np.full(model.num_experts + 1, admissions)) for l in model.workload.layers)
    filled = LatencyModel(model.hw, low_times, attrs.evolve(model.workload, layers=layers))
    unfilled = LatencyModel(model.hw, low_times, model.workload)
    slots = np.arange(model.num_experts + 1)
    top = np.full(len(slots), t.block * data.draw(st.integers(0, t.ffn_size // t.block)))
    link = model.hw.link_gbps * 1e9
    first_f, first_u = filled.parts(0, slots, top), unfilled.parts(0, slots, top)
    np.testing.assert_allclose(first_f["demand"] - first_u["demand"],
                               admissions * (top * t.neuron_bytes / link + model.hw.link_latency_us * 1e-6), rtol=1e-9, atol=1e-15)
    for column in range(model.num_layers):
        assert (filled.layer_s(column, slots, top) >= unfilled.layer_s(column, slots, top) - 1e-15).all()


@settings(max_examples=20, deadline=None)
@given(trace=traces())
def test_the_replay_counts_admissions_lru_takes_every_miss_it_has_room_for(trace):
    """The admissions the replay measures: never more than a step's misses or the cache's slots, and
    LRU takes every miss once the cache has room for a whole step's experts (C ≥ k)."""
    assume(trace.num_tokens > 0)
    profile = workload_from_trace(trace, POLICIES["lru"].config(), recall_L=[0.0] * len(trace.moe_layers), candidates=0)
    for layer in profile.layers:
        misses_C, k = trace.top_k * (1 - layer.hit_rate_C), trace.top_k
        slots_C = np.arange(len(misses_C))
        assert (layer.admissions_C <= np.minimum(misses_C, slots_C) + 1e-9).all()
        np.testing.assert_allclose(layer.admissions_C[k:], misses_C[k:], atol=1e-9)


@given(latency_models(), st.data())
def test_per_layer_times_price_each_layer_as_its_own_format(model, data):
    """Layers storing their experts in different formats (a GGUF file's kinds vary by layer): each
    MoE layer is priced exactly as a model in its own format would price it."""
    import attrs

    t = model.times
    other = attrs.evolve(t, neuron_bytes=max(1, t.neuron_bytes // 3), expert_s=t.expert_s * 1.25)
    layer_times = [other if c % 2 else t for c in range(model.num_layers)]
    mixed = LatencyModel(model.hw, layer_times, model.workload)
    slots = np.arange(model.num_experts + 1)
    top = np.full(len(slots), t.block * data.draw(st.integers(0, t.ffn_size // t.block)))
    for column, own in enumerate(layer_times):
        alone = LatencyModel(model.hw, own, model.workload)
        np.testing.assert_array_equal(mixed.layer_s(column, slots, top), alone.layer_s(column, slots, top))
