"""The simulator with a batch (moepic/sim/steps.py `batched_steps`): batch 1 is the trace's own run,
bit for bit; a batch's decode step plans the union of its streams' experts once, counts every load
it asks for, and is priced as one step over B sequences."""

from __future__ import annotations

import attrs
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moepic.cache.layout import plan_layout
from moepic.perfmodel.hardware import load_profile
from moepic.perfmodel.latency import model_times
from moepic.policies import POLICIES
from moepic.sim.baseline import load_baseline
from moepic.sim.run import Testbed, run_setup
from moepic.sim.shapes import ModelShape
from moepic.sim.simulate import simulate
from moepic.sim.steps import batched_steps, scheduled_steps, used_per_step
from sim_support import Case, request_trace, requests
from test_sim_properties import moe_spec
from tests_support import policy_for

A6000 = load_profile("a6000")


@st.composite
def cases(draw):
    L, K = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    E = draw(st.integers(K + 1, 8))
    spec = moe_spec(L, E, K, ffn=draw(st.sampled_from([64, 2048])), hidden=draw(st.sampled_from([64, 2048])))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    trace = request_trace(rng, draw(requests(max_sequences=4)), L, E, K, draw(st.sampled_from([0.3, 5.0])))
    return Case(spec=spec, trace=trace, policy=draw(st.sampled_from(sorted(POLICIES))), predictor=draw(st.sampled_from(["none", "oracle"])),
                theta=draw(st.sampled_from([0.0, 0.5, 1.0])), share=draw(st.floats(0.0, 1.0)))


def run(case: Case, steps=None, hw=A6000):
    predictor = case.build_predictor()
    times = model_times(hw, case.spec, dtype_bytes=2, predictor=predictor.horizon > 0)
    layout = case.layout(predictor)
    more = {} if steps is None else {"steps": steps}
    # A policy reading the future reads it in the order the steps route it.
    routed = case.trace if steps is None else steps.routed(case.trace)
    return simulate(case.trace, layout, policy_for(case.policy, routed), times, hw, predictor, **more), times, layout


@settings(max_examples=60)
@given(case=cases())
def test_batch_one_gives_exactly_the_results_of_the_traces_own_order(case):
    """Through the scheduler's order (each request joins when the one before ends), batch 1 replays
    the trace as it always did: every figure the same, bit for bit."""
    before, _, _ = run(case)
    after, _, _ = run(case, scheduled_steps(case.trace, 1, None))
    assert after.summary() == before.summary()
    assert after.token_s.tolist() == before.token_s.tolist() and after.exposed_s.tolist() == before.exposed_s.tolist()
    assert after.decode == before.decode and after.prefill == before.prefill


@settings(max_examples=60)
@given(case=cases(), batch=st.integers(2, 5), stream=st.none() | st.integers(1, 4))
def test_a_batch_step_plans_its_streams_union_once_and_counts_every_load_it_asks_for(case, batch, stream):
    steps = batched_steps(case.trace, batch, stream)
    result, _, _ = run(case, steps)
    decode_tokens = int(steps.tokens_S[steps.decode_S].sum())
    assert result.tokens == decode_tokens and result.steps == int(steps.decode_S.sum())
    assert result.step_tokens.tolist() == steps.tokens_S[steps.decode_S].tolist()
    for column, (decode, prefill) in enumerate(zip(result.decode, result.prefill)):
        used = used_per_step(case.trace, steps, column, steps.counts_SE(case.trace, column))
        for stats, wanted in ((decode, steps.decode_S), (prefill, ~steps.decode_S)):
            # One activation per (step, expert): an expert several streams chose is loaded once.
            assert stats.activations == sum(len(used[s]) for s in np.flatnonzero(wanted))
            assert stats.hits + stats.partial_hits + stats.misses == stats.activations
            assert stats.steps == int(wanted.sum()) and stats.tokens == int(steps.tokens_S[wanted].sum())
    summary = result.summary()
    if result.tokens:
        assert summary["tokens_per_s"] == pytest.approx(result.tokens / result.token_s.sum())
        assert min(result.token_s) * 1e3 * (1 - 1e-12) <= summary["ms_per_token"] <= max(result.token_s) * 1e3 * (1 + 1e-12)


@settings(max_examples=40)
@given(case=cases(), batch=st.integers(1, 5))
def test_with_every_expert_resident_a_batch_step_reads_each_expert_once_and_each_streams_cache(case, batch):
    case = attrs.evolve(case, predictor="none")
    steps = batched_steps(case.trace, batch)
    predictor = case.build_predictor()
    times = model_times(A6000, case.spec, dtype_bytes=2)
    layout = plan_layout(case.spec, dtype_bytes=2, budget=1.0, theta=1.0)
    result = simulate(case.trace, layout, policy_for(case.policy, steps.routed(case.trace)), times, A6000, predictor, steps=steps)
    counts = [steps.counts_SE(case.trace, c) for c in range(len(case.spec.moe_layers))]
    expected = []
    for s in np.flatnonzero(steps.decode_S):
        B = int(steps.tokens_S[s])
        per_layer = [times.layer_s + (B - 1) * times.layer_sequence_s
                     + sum(times.expert_s_for(int(n)) for n in counts_SE[s] if n) for counts_SE in counts]
        expected.append(times.rest_s + (B - 1) * times.rest_sequence_s + sum(per_layer))
    assert result.token_s == pytest.approx(expected, rel=1e-12)
    assert all(d.misses == 0 for d in result.decode)


def test_an_expert_costs_its_weights_until_its_tokens_matmuls_outweigh_them():
    spec = moe_spec(1, 8, 2, ffn=2048, hidden=2048)
    times = model_times(A6000, spec, dtype_bytes=2)
    assert times.expert_s_for(1) == times.expert_s
    assert times.expert_s_for(16) == times.expert_s  # decode batches stay bound by reading the weights
    many = 10**6
    assert times.expert_s_for(many) == pytest.approx(times.expert_launch_s + many * times.expert_token_s)
    assert times.layer_sequence_s > 0  # every stream reads its own KV cache


def test_belady_reads_the_future_in_the_order_a_batch_routes_it():
    """Through `run_setup`, Belady's future is the batch's own order (its check that the run routes
    what the trace says passes), and it hits at least as often as LRU on the same layout."""
    spec = moe_spec(2, 8, 2, ffn=64, hidden=64)
    trace = request_trace(np.random.default_rng(3), [(3, 12), (2, 10), (0, 9)], 2, 8, 2)
    shape = ModelShape(name="tiny", spec=spec, dtype_bytes=2)
    bed = Testbed(trace=trace, shape=shape, hw=A6000, budget=0.4, batch=3, stream_tokens=4)
    base = attrs.evolve(load_baseline("cache-only"), configurator=None, theta=1.0)
    hits = {}
    for name in ("belady", "lru"):
        result = run_setup(attrs.evolve(base, policy=POLICIES[name].config()), bed).result
        assert result.tokens == 31 and result.step_tokens.max() == 3
        hits[name] = sum(d.hits + d.partial_hits for d in result.decode)
    assert hits["belady"] >= hits["lru"]
