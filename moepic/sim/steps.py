"""A routing trace cut into the steps the engine takes. Pure.

The engine routes a prompt's tokens in one step per MoE layer (prefill) and every generated token
in its own step (decode); the first step of each sequence starts a request. The simulator steps
in exactly that order, so its planner sees what the engine's saw.
"""

from __future__ import annotations

import attrs
import numpy as np

from moepic.tracing import RoutingTrace


@attrs.frozen(eq=False)
class TraceSteps:
    start_S: np.ndarray  # first token of each step
    tokens_S: np.ndarray  # tokens in it (1 for decode)
    decode_S: np.ndarray  # bool: a one-token step, timed and reported (the engine counts these as decode)
    new_request_S: np.ndarray  # bool: the first step of a sequence

    @property
    def num_steps(self) -> int:
        return len(self.start_S)

    def counts_SE(self, trace: RoutingTrace, column: int) -> np.ndarray:
        """[S, E]: how many of each step's tokens chose each expert in MoE layer `column`."""
        step_N = np.repeat(np.arange(self.num_steps), self.tokens_S)
        counts_SE = np.zeros((self.num_steps, trace.num_experts), dtype=np.int64)
        np.add.at(counts_SE, (step_N[:, None], trace.expert_ids_NLK[:, column]), 1)
        return counts_SE


def trace_steps(trace: RoutingTrace) -> TraceSteps:
    N = trace.num_tokens
    new_sequence_N = np.r_[True, trace.sequence_N[1:] != trace.sequence_N[:-1]] if N else np.zeros(0, bool)
    # A prefill token continues its predecessor's step if both are in the same sequence's prompt.
    continues_N = trace.prefill_N & np.r_[False, trace.prefill_N[:-1]] & ~new_sequence_N if N else np.zeros(0, bool)
    start_S = np.flatnonzero(~continues_N)
    tokens_S = np.diff(np.r_[start_S, N])
    return TraceSteps(
        start_S=start_S, tokens_S=tokens_S, decode_S=tokens_S == 1, new_request_S=new_sequence_N[start_S]
    )
