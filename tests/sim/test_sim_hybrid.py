"""The simulator's hybrid runs (moepic/sim/simulate.py with `hybrid`): what host compute must satisfy
whatever the trace, shape, policy, budget, link and host (property), and where it must change
nothing at all.

Small random shapes and traces (tests/sim/sim_support.py, as the property tests build them), run on the
a6000 profile with a link from slow to fast and one of the bundled host profiles; the `none` and
`oracle` predictors keep planning independent of timing.
"""

from __future__ import annotations

import attrs
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moepic.core.spec import ModelSpec
from moepic.errors import ConfigError
from moepic.perfmodel.hardware import known_hosts, load_host, load_profile
from moepic.perfmodel.host_costs import HostPricing
from moepic.policies import POLICIES
from moepic.sim.steps import trace_steps
from moepic.tracing import RoutingTrace
from perf_support import moe_spec
from sim_support import Case, request_trace

A6000 = load_profile("a6000")
DESKTOP = attrs.evolve(A6000, host=load_host("desktop-ddr5"))


# --- builders ----------------------------------------------------------------------------------------


@st.composite
def cases(draw, predictors=("none", "oracle"), thetas=(0.5, 0.25, 1.0, 0.0)):
    L, K = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    E = draw(st.integers(K + 2, 8))
    ffn, hidden = draw(st.sampled_from([256, 2048])), draw(st.sampled_from([64, 512, 2048]))  # θ of 64-neuron blocks
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    reqs = [(draw(st.integers(0, 4)), draw(st.integers(2, 8))) for _ in range(draw(st.integers(1, 2)))]
    trace = request_trace(rng, reqs, L, E, K, draw(st.sampled_from([0.3, 1.0, 5.0])))
    return Case(
        spec=moe_spec(L, E, K, hidden, ffn), trace=trace, policy=draw(st.sampled_from(sorted(POLICIES))),
        predictor=draw(st.sampled_from(predictors)), theta=draw(st.sampled_from(thetas)), share=draw(st.floats(0.3, 1.0)),
    )


@st.composite
def hardware(draw):
    """The a6000 profile with a link from very slow to fast, the engine's host work or not, and a bundled host."""
    return attrs.evolve(
        A6000, link_gbps=draw(st.sampled_from([0.05, 1.0, 25.0])), link_latency_us=draw(st.sampled_from([0.0, 10.0])),
        offload_step_us=draw(st.sampled_from([0.0, 20.0])), load_us=draw(st.sampled_from([0.0, 5.0])),
        host=load_host(draw(st.sampled_from(known_hosts()))),
    )


def compute_only_s(times, spec: ModelSpec, predicting: bool) -> float:
    """A decode token with every expert resident (as tests/sim/test_sim_properties.py prices it)."""
    L = len(spec.moe_layers)
    predictions = max(0, L - 1) if predicting else 0
    return times.rest_s + L * (times.layer_s + spec.moe.top_k * times.expert_s) + predictions * times.predictor_s


def parallel_floor_s(times, spec: ModelSpec, predicting: bool, result, hw) -> float:
    """A decode token when the host takes some of each layer's k experts in parallel with the device:
    with n on the host, the layer waits for max((k − n)·e, n·c), e a device expert, c the cheapest
    host call; over real n that is at least k·e·c / (e + c). (The compute-only floor does not bound
    a hybrid token: a host computing one tiny expert while the device computes two beats the device
    computing all three.)"""
    pricing = HostPricing.of(hw, 2)
    k, e = spec.moe.top_k, times.expert_s
    L = len(spec.moe_layers)
    predictions = max(0, L - 1) if predicting else 0
    per_layer = []
    for layer in result.layout.layers:
        c = pricing.load_costs(layer, 1).host_bottom_s  # a bottom is never dearer than a whole expert
        per_layer.append(times.layer_s + k * e * c / (e + c))
    return times.rest_s + sum(per_layer) + predictions * times.predictor_s


def decode_tokens(trace: RoutingTrace) -> int:
    return int(trace_steps(trace).decode_S.sum())


# --- host-only: every load on the host -------------------------------------------------------------


@settings(max_examples=25)
@given(case=cases(), hw=hardware())
def test_host_only_copies_nothing_and_hosts_every_miss_and_bottom(case, hw):
    """Every load is computed on the host, and the link's share is nothing, so nothing is prefetched either."""
    result, _ = case.run(hw, "host-only")
    assert result.hybrid == "host-only"
    assert result.demand_bytes == 0 and result.prefetch_bytes == 0 and result.wasted_prefetch_bytes == 0
    assert len(result.host) == len(result.decode) == len(case.spec.moe_layers)
    for host, decode, layer in zip(result.host, result.decode, result.layout.layers):
        assert (host.experts, host.bottoms) == (decode.misses, decode.partial_hits), layer
        assert host.bytes == decode.bytes_loaded  # what a copy would have moved, computed where it lies
        assert host.fill_bytes == host.fills * layer.top_bytes and host.fills <= decode.admissions
    summary = result.summary()
    assert summary["host_experts"] == sum(s.misses for s in result.decode)
    assert summary["host_bottoms"] == sum(s.partial_hits for s in result.decode)
    assert [row["host_experts"] for row in summary["layers"]] == [s.misses for s in result.decode]
    assert [row["host_bottoms"] for row in summary["layers"]] == [s.partial_hits for s in result.decode]


# --- auto and host-only: bounds -----------------------------------------------------------------------


@settings(max_examples=30)
@given(case=cases(), hw=hardware(), mode=st.sampled_from(["auto", "host-only"]))
def test_a_hybrid_run_hosts_no_more_than_it_loads_and_its_tokens_are_finite_and_bounded_below(case, hw, mode):
    result, times = case.run(hw, mode)
    assert result.hybrid == mode and result.tokens == decode_tokens(case.trace)
    hosted = sum(h.experts + h.bottoms for h in result.host)
    assert hosted <= sum(s.misses + s.partial_hits for s in result.decode)
    for host, decode in zip(result.host, result.decode):
        assert host.experts <= decode.misses and host.bottoms <= decode.partial_hits
        assert host.seconds >= 0.0 and (host.seconds > 0) == (host.experts + host.bottoms > 0)
    assert len(result.host_s) == len(result.host_wait_s) == result.tokens
    assert np.all(result.host_s >= 0.0) and np.all(result.host_wait_s >= 0.0)
    assert np.all(np.isfinite(result.token_s))
    assert np.all(result.host_wait_s <= result.token_s)
    assert sum(h.seconds for h in result.host) == pytest.approx(result.host_s.sum(), rel=1e-9, abs=1e-15)
    floor = parallel_floor_s(times, case.spec, case.predicting, result, hw)
    assert np.all(result.token_s >= floor * (1 - 1e-12))
    if hosted == 0:  # nothing ran on the host: the copy-only floor holds
        assert np.all(result.token_s >= compute_only_s(times, case.spec, case.predicting) * (1 - 1e-12))
    if result.tokens:
        assert result.layer_s.sum() + times.rest_s == pytest.approx(result.token_s.mean(), rel=1e-9)


@settings(max_examples=15)
@given(case=cases(thetas=(1.0,)), hw=hardware(), mode=st.sampled_from(["auto", "host-only"]))
def test_whole_expert_caches_have_no_bottoms_for_the_host(case, hw, mode):
    result, _ = case.run(hw, mode)
    assert all(h.bottoms == 0 for h in result.host)
    assert result.summary()["host_bottoms"] == 0


# --- off is today's simulator -----------------------------------------------------------------------------


@settings(max_examples=20)
@given(case=cases(), hw=hardware())
def test_hybrid_off_is_the_copy_only_run_exactly(case, hw):
    default, _ = case.run(hw)
    off, _ = case.run(hw, "off")
    np.testing.assert_array_equal(off.token_s, default.token_s)
    np.testing.assert_array_equal(off.exposed_s, default.exposed_s)
    assert off.summary() == default.summary()
    assert off.hybrid == "off" and all(h.experts == h.bottoms == h.fills == 0 for h in off.host)
    assert np.all(off.host_s == 0.0) and np.all(off.host_wait_s == 0.0)
    # The host profile prices nothing when off: without one the run is the same.
    plain, _ = case.run(attrs.evolve(hw, host=None), "off")
    np.testing.assert_array_equal(plain.token_s, off.token_s)


# --- a host that never wins -----------------------------------------------------------------------------------


@settings(max_examples=20)
@given(case=cases(), hw=hardware())
def test_auto_with_a_hopelessly_slow_host_hosts_nothing(case, hw):
    crawling = attrs.evolve(hw, host=attrs.evolve(hw.host, bf16_expert_gbps=1e-6, fp32_expert_gbps=1e-6, matmul_gflops=1e-6))
    result, _ = case.run(crawling, "auto")
    assert all(h.experts == h.bottoms == h.fills == 0 for h in result.host)
    assert np.all(result.host_s == 0.0) and np.all(result.host_wait_s == 0.0)
    if case.predictor == "none":  # nothing prefetched, nothing withdrawn: every load copied as when off
        off, _ = case.run(crawling, "off")
        np.testing.assert_array_equal(result.token_s, off.token_s)
        assert result.demand_bytes == off.demand_bytes


# --- a hybrid mode needs a host -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["auto", "host-only"])
def test_a_hybrid_mode_without_a_host_profile_asks_for_host(mode):
    case = Case(spec=moe_spec(2, 4, 2, 64, 64), trace=request_trace(np.random.default_rng(0), [(0, 3)], 2, 4, 2, 1.0),
                policy="lru", predictor="none", theta=0.5, share=0.2)
    assert A6000.host is None
    with pytest.raises(ConfigError, match="--host"):
        case.run(A6000, mode)
    result, _ = case.run(DESKTOP, mode)
    assert result.tokens == 3


def test_an_unknown_hybrid_mode_is_refused():
    case = Case(spec=moe_spec(1, 4, 1, 64, 64), trace=request_trace(np.random.default_rng(0), [(0, 2)], 1, 4, 1, 1.0),
                policy="lru", predictor="none", theta=0.5, share=0.2)
    with pytest.raises(ValueError, match="hybrid must be one of off, auto, host-only, got 'banana'"):
        case.run(DESKTOP, "banana")


# --- one trace, three modes ------------------------------------------------------------------------------------


def split_expert_case(predictor: str = "none") -> Case:
    """Experts of 24 MiB with half their neurons cached, and skewed routing: many partial hits."""
    return Case(spec=moe_spec(2, 6, 2, 2048, 2048), trace=request_trace(np.random.default_rng(0), [(3, 12)], 2, 6, 2, 0.3),
                policy="lru", predictor=predictor, theta=0.5, share=0.5)


@pytest.mark.parametrize("predictor", ["none", "oracle"])
def test_auto_splits_a_copy_bound_run_between_link_and_host_and_beats_copying_alone(predictor):
    """On PCIe 4.0 a 12 MiB bottom copies in ~0.5 ms and the desktop host computes it in ~0.35 ms:
    auto puts some misses and bottoms on each side, and splits admitted misses between the two
    (top over the link, bottom on the host)."""
    case = split_expert_case(predictor)
    off, _ = case.run(DESKTOP, "off")
    auto, _ = case.run(DESKTOP, "auto")
    summary = auto.summary()
    assert summary["host_splits"] > 0 and summary["host_bottoms"] > 0
    assert auto.demand_bytes > 0  # and some still copied
    assert auto.token_s.mean() < off.token_s.mean()
    assert summary["host_wait_ms_per_token"] <= summary["ms_per_token"]


def test_host_only_on_an_idle_fast_link_fills_every_admission_and_caches_as_copying_does():
    case = split_expert_case()
    off, _ = case.run(DESKTOP, "off")
    host_only, _ = case.run(DESKTOP, "host-only")
    assert [(s.hits, s.partial_hits, s.misses, s.admissions) for s in host_only.decode] == [
        (s.hits, s.partial_hits, s.misses, s.admissions) for s in off.decode
    ]
    for host, decode, layer in zip(host_only.host, host_only.decode, host_only.layout.layers):
        assert host.fills == decode.admissions and host.fill_bytes == decode.admissions * layer.top_bytes


def test_auto_on_a_slow_link_fills_nothing_so_nothing_is_ever_cached():
    """At 1 GB/s a 12 MiB top takes longer to copy than the host takes to compute the expert: auto
    computes every load on the host and never slows a step to fill a cache, so every admission is
    withdrawn and every expert misses."""
    case = split_expert_case()
    result, _ = case.run(attrs.evolve(DESKTOP, link_gbps=1.0), "auto")
    assert all(s.admissions == s.hits == s.partial_hits == 0 for s in result.decode + result.prefill)
    assert all(h.fills == h.fill_bytes == 0 for h in result.host)
    assert result.summary()["host_experts"] == sum(s.misses for s in result.decode) == 2 * 2 * 12


@pytest.mark.parametrize("theta", [0.0, 0.5])
def test_a_host_computed_miss_costs_the_hand_off_the_call_and_the_result_back(theta):
    """One MoE layer, top-1, one decode token whose expert misses, on the host: the device waits from
    routing for the hand-off, the host's call and the result's way back."""
    spec = moe_spec(1, 4, 1, 512, 256)
    trace = request_trace(np.random.default_rng(0), [(0, 1)], 1, 4, 1, 1.0)
    case = Case(spec=spec, trace=trace, policy="lru", predictor="none", theta=theta, share=0.5)
    result, times = case.run(DESKTOP, "host-only")
    layer = result.layout.layers[0]
    pricing = HostPricing.of(DESKTOP, 2)
    handoff, host_s = DESKTOP.host.result_latency_us * 1e-6, pricing.host_s(layer.expert_bytes, 1)
    routed = times.layer_s + DESKTOP.offload_step_us * 1e-6
    device = DESKTOP.load_us * 1e-6  # the device's own part: taking the result in
    assert handoff > 0 and host_s > device
    assert result.token_s == pytest.approx([times.rest_s + routed + 2 * handoff + host_s], rel=1e-12)
    assert result.host_s == pytest.approx([host_s], rel=1e-12)
    assert result.host_wait_s == pytest.approx([2 * handoff + host_s - device], rel=1e-12)
    assert result.summary()["host_experts"] == 1 and result.demand_bytes == 0
