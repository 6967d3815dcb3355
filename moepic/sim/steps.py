"""A routing trace cut into the steps the engine takes. Pure.

The engine routes a prompt's tokens in one step per MoE layer (prefill) and every generated token
in its own step (decode); the first step of each sequence starts a request. The simulator steps
in exactly that order, so its planner sees what the engine's saw.

With a batch of B (`batched_steps`), the trace's requests are concurrent streams served in
continuous-batching order (moepic/core/batching.py, the scheduler's rule): each joining request's
prompt is a step of its own, then one decode step routes one token of every running stream, so a
step's tokens are no longer neighbours in the trace (`order_N` lists them in step order).

    trace ─▶ requests (each sequence; with `stream_tokens`, cut into pieces of n decode tokens)
          ─▶ continuous_batching(decode tokens per request, B) ─▶ steps: [prompt]… [B decode tokens] …

`stream_tokens` makes many requests of a trace with few long sequences (the shared Mixtral traces
hold two): routing within a piece stays the trace's own, while pieces that run side by side are
as alike as neighbouring windows of one sequence are (cross-request correlation is the trace's,
not that of independent prompts). A piece after the first has no prompt in the trace: it joins
and decodes from the next step, as if its prompt had been routed unseen.
"""

from __future__ import annotations

import attrs
import numpy as np

from moepic.core.batching import continuous_batching
from moepic.predictors.base import merge_votes
from moepic.tracing import RoutingTrace


@attrs.frozen(eq=False)
class TraceSteps:
    start_S: np.ndarray  # first token of each step (a position in `order_N`)
    tokens_S: np.ndarray  # tokens in it (1 for decode at batch 1)
    decode_S: np.ndarray  # bool: a decode step (one token, or one of each running stream), timed and reported as decode
    new_request_S: np.ndarray  # bool: the first step of a request, for the policy (a batch run is one request)
    order_N: np.ndarray | None = None  # the trace's tokens in step order (None: the trace's own order)

    @property
    def num_steps(self) -> int:
        return len(self.start_S)

    def in_order(self, values_N: np.ndarray) -> np.ndarray:
        """A per-token array of the trace, in step order."""
        return values_N if self.order_N is None else values_N[self.order_N]

    def counts_SE(self, trace: RoutingTrace, column: int) -> np.ndarray:
        """[S, E]: how many of each step's tokens chose each expert in MoE layer `column`."""
        step_N = np.repeat(np.arange(self.num_steps), self.tokens_S)
        counts_SE = np.zeros((self.num_steps, trace.num_experts), dtype=np.int64)
        np.add.at(counts_SE, (step_N[:, None], self.in_order(trace.expert_ids_NLK[:, column])), 1)
        return counts_SE

    def routed(self, trace: RoutingTrace) -> RoutingTrace:
        """The trace as the steps route it: its tokens in step order, one sequence (what the engine
        routes, and the future Belady's MIN must read), or `trace` itself where the order is its own."""
        if self.order_N is None:
            return trace
        order = self.order_N
        return attrs.evolve(
            trace, expert_ids_NLK=trace.expert_ids_NLK[order], weights_NLK=trace.weights_NLK[order],
            sequence_N=np.zeros(len(order), trace.sequence_N.dtype), position_N=np.arange(len(order), dtype=trace.position_N.dtype),
            prefill_N=trace.prefill_N[order], hidden_NLD=None if trace.hidden_NLD is None else trace.hidden_NLD[order],
        )


def trace_steps(trace: RoutingTrace, *, token_by_token: bool = False) -> TraceSteps:
    """The engine's steps; `token_by_token`: every token a step of its own, a prompt's too (a
    decode-style replay, cache/replay.py's default)."""
    N = trace.num_tokens
    new_sequence_N = np.r_[True, trace.sequence_N[1:] != trace.sequence_N[:-1]] if N else np.zeros(0, bool)
    # A prefill token continues its predecessor's step if both are in the same sequence's prompt.
    continues_N = trace.prefill_N & np.r_[False, trace.prefill_N[:-1]] & ~new_sequence_N if N else np.zeros(0, bool)
    if token_by_token:
        continues_N = np.zeros(N, bool)
    start_S = np.flatnonzero(~continues_N)
    tokens_S = np.diff(np.r_[start_S, N])
    return TraceSteps(
        start_S=start_S, tokens_S=tokens_S, decode_S=tokens_S == 1, new_request_S=new_sequence_N[start_S]
    )


def step_predictions(named_NK: np.ndarray, steps: TraceSteps, candidates: int) -> list[list[int]]:
    """Per step: the experts named for a layer (several tokens' merged by votes, as the engine
    merges a prompt's or a batch's), at most k′."""
    rows = [[e for e in row if e >= 0] for row in steps.in_order(named_NK).tolist()]
    out = []
    for start, tokens in zip(steps.start_S.tolist(), steps.tokens_S.tolist()):
        out.append((rows[start] if tokens == 1 else merge_votes(rows[start : start + tokens]))[:candidates])
    return out


def used_per_step(trace: RoutingTrace, steps: TraceSteps, column: int, counts_SE: np.ndarray) -> list[list[int]]:
    """Per step, the experts it routes to in MoE layer `column`, ascending (what the planner takes):
    a batch's the union of its tokens', each once."""
    if (steps.tokens_S == 1).all():  # one token a step: its ids, sorted (distinct, as routers pick them)
        ids_NK = np.sort(steps.in_order(trace.expert_ids_NLK[:, column]), axis=1)
        if (np.diff(ids_NK, axis=1) > 0).all():
            return ids_NK.tolist()
    rows, experts = np.nonzero(counts_SE)
    return [part.tolist() for part in np.split(experts, np.cumsum(np.bincount(rows, minlength=len(counts_SE)))[:-1])]


@attrs.frozen
class _Request:
    prompt: int | None  # its prompt's step of `trace_steps` (None: the trace has none for it)
    rows: tuple[int, ...]  # its later steps, one per decode step it takes part in


def trace_requests(trace: RoutingTrace, stream_tokens: int | None = None) -> tuple[TraceSteps, list[_Request]]:
    """The trace's own steps, and its requests over them: each sequence (a prompt step, if it starts
    with one, then its other steps), cut into pieces of `stream_tokens` decode steps if given."""
    own = trace_steps(trace)
    first_S = np.flatnonzero(own.new_request_S)
    requests = []
    for first, stop in zip(first_S.tolist(), np.r_[first_S[1:], own.num_steps].tolist()):
        prompt = first if trace.prefill_N[own.start_S[first]] else None
        rows = tuple(range(first + (prompt is not None), stop))
        n = stream_tokens or max(1, len(rows))
        pieces = [rows[i : i + n] for i in range(0, len(rows), n)] or [()]
        requests += [_Request(prompt if i == 0 else None, piece) for i, piece in enumerate(pieces)]
    return own, requests


def batched_steps(trace: RoutingTrace, batch: int = 1, stream_tokens: int | None = None) -> TraceSteps:
    """The steps of the trace's requests decoded `batch` at a time in continuous-batching order
    (see the module docstring). Batch 1 without `stream_tokens` is `trace_steps`, the trace's own order."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if stream_tokens is not None and stream_tokens < 1:
        raise ValueError(f"stream_tokens must be >= 1 (or None: whole sequences), got {stream_tokens}")
    if batch == 1 and stream_tokens is None:
        return trace_steps(trace)
    return scheduled_steps(trace, batch, stream_tokens)


def scheduled_steps(trace: RoutingTrace, batch: int, stream_tokens: int | None) -> TraceSteps:
    """`batched_steps` always through the scheduler's order (batch 1 included: it gives the trace's own steps)."""
    own, requests = trace_requests(trace, stream_tokens)
    if batch > 1:
        for r in requests:
            wide = [s for s in r.rows if own.tokens_S[s] > 1]
            if wide:
                n = int(own.start_S[wide[0]])
                raise ValueError(f"batch {batch}: token {n} starts a prompt of {own.tokens_S[wide[0]]} tokens after the "
                                 f"sequence's first decode token (sequence {trace.sequence_N[n]}); a batch decodes one token a row")
    spans, decode, first = [], [], []  # per step: its own steps (token ranges) in order, decode?, a request's first?
    next_row = [0] * len(requests)
    for step in continuous_batching([len(r.rows) for r in requests], batch):
        for r in step.joining:
            if requests[r].prompt is not None:
                spans.append((requests[r].prompt,))
                decode.append(bool(own.tokens_S[requests[r].prompt] == 1))  # a one-token step counts as decode
                first.append(True)
        if step.decoding:
            rows = []
            for r in step.decoding:
                rows.append(requests[r].rows[next_row[r]])
                next_row[r] += 1
            spans.append(tuple(rows))
            decode.append(len(rows) > 1 or bool(own.tokens_S[rows[0]] == 1))
            alone = step.decoding[0]
            first.append(len(rows) == 1 and next_row[alone] == 1 and requests[alone].prompt is None)
    # The policy's requests: one after another at batch 1 (each `generate` begins one); a batch run
    # is one (the scheduler begins one for all it serves).
    begins_S = first if batch == 1 else [i == 0 for i in range(len(spans))]
    own_starts = own.start_S
    order_N = np.concatenate([np.arange(own_starts[s], own_starts[s] + own.tokens_S[s]) for span in spans for s in span]
                             or [np.zeros(0, np.int64)])
    tokens_S = np.array([sum(int(own.tokens_S[s]) for s in span) for span in spans], dtype=np.int64)
    in_trace_order = np.array_equal(order_N, np.arange(trace.num_tokens))
    return TraceSteps(
        start_S=np.cumsum(tokens_S) - tokens_S, tokens_S=tokens_S, decode_S=np.array(decode, dtype=bool),
        new_request_S=np.array(begins_S, dtype=bool), order_N=None if in_trace_order else order_N.astype(np.int64),
    )
