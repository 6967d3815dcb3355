"""A trace cut into the steps of a batch (moepic/core/batching.py, moepic/sim/steps.py): the
continuous-batching order, every token stepped once, a step's experts the union of its streams',
and the engine's scheduler routing in the very order the simulator replays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moepic.checkpoint.load import load_model
from moepic.core.batching import continuous_batching
from moepic.core.moe import ResidentExperts
from moepic.runtime.scheduler import Request, Scheduler
from moepic.sim.steps import batched_steps, scheduled_steps, trace_steps, used_per_step
from moepic.tracing.jsonl import load_jsonl_trace
from sim_support import request_trace, requests, routing_trace

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "traces" / "mixtral-8x7b-instruct-fp8"

traces = st.builds(
    lambda reqs, seed, L, K: request_trace(np.random.default_rng(seed), reqs, L, 8, K),
    requests(max_sequences=4, max_prompt=4, max_decode=9), st.integers(0, 2**32 - 1), st.integers(1, 3), st.integers(1, 3),
)
batches = st.integers(1, 6)
stream_tokens = st.none() | st.integers(1, 5)


def step_tokens(steps, s: int) -> np.ndarray:
    """The trace's tokens step s routes."""
    order_N = np.arange(steps.tokens_S.sum()) if steps.order_N is None else steps.order_N
    return order_N[steps.start_S[s] : steps.start_S[s] + steps.tokens_S[s]]


# --- the pure order -------------------------------------------------------------------------------


@settings(max_examples=200)
@given(lengths=st.lists(st.integers(0, 6), max_size=12), batch=batches)
def test_streams_join_in_arrival_order_as_soon_as_the_batch_has_room(lengths, batch):
    steps = continuous_batching(lengths, batch)
    running: list[int] = []
    joined: list[int] = []
    decoded = [0] * len(lengths)
    for step in steps:
        assert step.decoding == tuple(running)  # those with a token before the step, in admission order
        room = batch - len(running)
        waiting = len(lengths) - len(joined)
        assert len(step.joining) == min(room, waiting)  # first come, first served, while there is room
        assert list(step.joining) == list(range(len(joined), len(joined) + len(step.joining)))
        joined += step.joining
        for r in step.decoding:
            decoded[r] += 1
        # A stream leaves once it has decoded its tokens (a prompt-only one at its prefill).
        running = [r for r in (*step.decoding, *step.joining) if decoded[r] < lengths[r]]
        assert len(running) <= batch
    assert decoded == lengths and joined == list(range(len(lengths))) and not running


def test_a_batch_larger_than_the_requests_runs_them_all_at_once():
    steps = continuous_batching([2, 1, 3], 8)
    assert [(s.joining, s.decoding) for s in steps] == [((0, 1, 2), ()), ((), (0, 1, 2)), ((), (0, 2)), ((), (2,))]


def test_a_stream_joins_the_step_after_one_ends():
    steps = continuous_batching([1, 3, 2], 2)
    assert [(s.joining, s.decoding) for s in steps] == [((0, 1), ()), ((), (0, 1)), ((2,), (1,)), ((), (1, 2)), ((), (2,))]


# --- a trace in that order ------------------------------------------------------------------------


@settings(max_examples=150)
@given(trace=traces)
def test_batch_one_through_the_scheduler_is_the_traces_own_order(trace):
    own, scheduled = trace_steps(trace), scheduled_steps(trace, 1, None)
    assert scheduled.order_N is None
    for field in ("start_S", "tokens_S", "decode_S", "new_request_S"):
        assert np.array_equal(getattr(own, field), getattr(scheduled, field)), field


@settings(max_examples=200)
@given(trace=traces, batch=batches, stream=stream_tokens)
def test_every_trace_token_is_stepped_exactly_once_whatever_the_batch(trace, batch, stream):
    steps = batched_steps(trace, batch, stream)
    routed = np.concatenate([step_tokens(steps, s) for s in range(steps.num_steps)])
    assert sorted(routed.tolist()) == list(range(trace.num_tokens))
    assert int(steps.tokens_S.sum()) == trace.num_tokens
    assert steps.new_request_S[0]
    if batch > 1:  # the scheduler begins one request for all it serves
        assert steps.new_request_S.sum() == 1
    for s in range(steps.num_steps):
        tokens = step_tokens(steps, s)
        if trace.prefill_N[tokens[0]]:  # a prompt: alone, whole, one sequence's
            assert trace.prefill_N[tokens].all() and len(set(trace.sequence_N[tokens].tolist())) == 1
            assert np.all(np.diff(tokens) == 1)
        else:  # a decode step: one token of each of at most `batch` streams, each stream's next
            assert len(tokens) <= batch and not trace.prefill_N[tokens].any()
            assert steps.decode_S[s]


@settings(max_examples=100)
@given(trace=traces, batch=batches, stream=stream_tokens)
def test_each_stream_decodes_its_tokens_in_order_one_a_step(trace, batch, stream):
    steps = batched_steps(trace, batch, stream)
    last_position: dict[int, int] = {}
    for s in range(steps.num_steps):
        tokens = step_tokens(steps, s)
        sequences = trace.sequence_N[tokens].tolist()
        if stream is not None:  # pieces of one sequence are requests of their own: they may run side by side
            continue
        if not trace.prefill_N[tokens[0]]:
            assert len(set(sequences)) == len(sequences)  # a decode step: one row per stream
        for n in tokens.tolist():
            sequence = int(trace.sequence_N[n])
            assert trace.position_N[n] > last_position.get(sequence, -1)
            last_position[sequence] = int(trace.position_N[n])


@settings(max_examples=100)
@given(trace=traces, batch=batches, stream=stream_tokens)
def test_a_steps_experts_are_the_union_of_its_tokens_each_once(trace, batch, stream):
    steps = batched_steps(trace, batch, stream)
    for column in range(len(trace.moe_layers)):
        counts_SE = steps.counts_SE(trace, column)
        used = used_per_step(trace, steps, column, counts_SE)
        for s in range(steps.num_steps):
            ids = trace.expert_ids_NLK[step_tokens(steps, s), column]
            assert used[s] == sorted(set(ids.ravel().tolist()))
            assert counts_SE[s].tolist() == np.bincount(ids.ravel(), minlength=trace.num_experts).tolist()


def test_the_requests_of_stream_tokens_are_cut_from_each_sequence_and_join_as_others_end():
    # Two sequences of 2 prompt + 5 decode tokens, cut into requests of 2 decode tokens: per sequence
    # (prompt + positions 2-3), (4-5), (6), in that order of arrival.
    trace = request_trace(np.random.default_rng(0), [(2, 5), (2, 5)], 1, 8, 2)
    steps = batched_steps(trace, 2, 2)
    layout = [(trace.sequence_N[t].tolist(), trace.position_N[t].tolist()) for t in (step_tokens(steps, s) for s in range(steps.num_steps))]
    assert layout == [
        ([0, 0], [0, 1]),  # the first two requests join; the first one's prompt, alone (the second has none)
        ([0, 0], [2, 4]), ([0, 0], [3, 5]),  # both decode together, and both end
        ([1, 1], [0, 1]),  # the next two join: the second sequence's prompt
        ([0, 1], [6, 2]),  # the first sequence's last piece ends
        ([1], [3]),  # the fifth request joined (no prompt): it decodes from the next step
        ([1], [4]), ([1, 1], [5, 6]),
    ]
    assert steps.new_request_S.tolist() == [True] + [False] * 7  # a batch run is one request for the policy


def test_a_batch_refuses_a_prompt_after_a_sequences_first_decode_token():
    # One sequence: a decode token, then a second prompt of two tokens (a chat's next turn).
    trace = routing_trace([[[0, 1]], [[2, 3]], [[4, 5]]], 8, prefill_N=[False, True, True])
    assert batched_steps(trace, 1, 1).tokens_S.tolist() == [1, 2]  # one after another: as the trace steps it
    with pytest.raises(ValueError, match="batch 2: token 1 starts a prompt of 2 tokens"):
        batched_steps(trace, 2)


@pytest.mark.parametrize(("batch", "stream", "expected"), [(0, None, "batch must be >= 1"), (2, 0, "stream_tokens must be >= 1")])
def test_a_bad_batch_or_stream_length_is_named(batch, stream, expected):
    trace = request_trace(np.random.default_rng(0), [(1, 2)], 1, 8, 2)
    with pytest.raises(ValueError, match=expected):
        batched_steps(trace, batch, stream)


@pytest.mark.skipif(not SHARED.is_dir(), reason="the shared Mixtral traces (../shared/traces) are absent")
@pytest.mark.parametrize("name", ["gsm8k", "humaneval"])
def test_the_shared_traces_cut_into_requests_of_eight_decode_16_at_a_time(name):
    trace = load_jsonl_trace(SHARED / f"{name}_2_routing.jsonl")
    steps = batched_steps(trace, 16, 8)
    # Decode-only traces: every request's tokens are rows (no prompt), 8 of them but a sequence's last piece.
    pieces = [min(8, n - start) for n in np.unique(trace.sequence_N, return_counts=True)[1].tolist() for start in range(0, n, 8)]
    assert len(pieces) > 16
    assert steps.tokens_S.tolist() == [len(s.decoding) for s in continuous_batching(pieces, 16) if s.decoding]
    assert max(steps.tokens_S) == 16 and steps.decode_S.all()
    assert sorted(steps.order_N.tolist()) == list(range(trace.num_tokens))


# --- the engine's scheduler routes in that order -------------------------------------------------


class _Recording:
    """Every expert resident; records each step of one MoE layer: (tokens, decode?), and when a
    request begins (as steps seen before it)."""

    def __init__(self, weights, layer: int) -> None:
        self.resident, self.layer = ResidentExperts(weights), layer
        self.seen: list[tuple[int, bool | None]] = []
        self.requests: list[int] = []

    def begin_request(self) -> None:
        self.requests.append(len(self.seen))

    def after_layer(self, layer, x_TD) -> None:
        pass

    def lookahead(self, layer, router_input_TD) -> None:
        return None

    def experts_for(self, layer, ids_per_token, router_input_TD, lookahead_rows=None, *, decode=None):
        if layer == self.layer:
            self.seen.append((len(ids_per_token), decode))
        return self.resident.experts_for(layer, ids_per_token, router_input_TD, lookahead_rows, decode=decode)


@settings(max_examples=8, deadline=None)
@given(reqs=st.lists(st.tuples(st.integers(2, 9), st.integers(1, 5)), min_size=1, max_size=5), batch=st.integers(1, 4))
def test_the_engines_scheduler_steps_as_the_simulator_replays_a_trace(checkpoint_dir, reqs, batch):
    """The tiny model's scheduler, with the same prompt lengths and tokens, routes steps of the
    sizes (and decode flags) the simulator's batched steps have, and begins one request."""
    model = _model(checkpoint_dir)
    source = _Recording(model.weights, model.spec.moe_layers[0])
    scheduler = Scheduler(model, source, max_batch=batch, max_queue=len(reqs))
    for prompt, new in reqs:
        scheduler.submit(Request(prompt_ids=list(range(1, prompt + 1)), max_new_tokens=new, eos_ids=()))
    while not scheduler.idle:
        scheduler.step()
    # The trace of these requests: each prompt, then the tokens fed back (all but the last).
    trace = request_trace(np.random.default_rng(0), [(p, n - 1) for p, n in reqs], 1, 8, 2)
    steps = batched_steps(trace, batch)
    assert [n for n, _ in source.seen] == steps.tokens_S.tolist()
    assert [bool(d) for _, d in source.seen] == steps.decode_S.tolist()
    assert source.requests == [0]


_MODELS: dict = {}


def _model(checkpoint_dir):
    if "mixtral" not in _MODELS:
        _MODELS["mixtral"] = load_model(checkpoint_dir("mixtral"), dtype=torch.float32)
    return _MODELS["mixtral"]
