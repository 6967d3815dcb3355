"""Continuous batching's order: which requests join and which decode at each step. Pure.

    waiting (arrival order) ─join while the batch has room─▶ running (admission order) ─last token─▶ done
    a step:  each joining request's prompt alone (its prefill gives its first token),
             then one decode step over the requests that had a token before the step

A request that joins at a step decodes from the next one; one that ends (its last token taken)
leaves at once, and its place is taken at the next step. The engine's scheduler
(runtime/scheduler.py `Scheduler.step`) follows this order and the simulator (sim/steps.py)
replays a trace's requests in it, so a simulated batch routes what a real one would. The
scheduler begins one request for its expert source for everything it serves
(`ExpertSource.begin_request` once), which the simulator follows for the policy's request (LCP's μ).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import attrs


@attrs.frozen
class BatchStep:
    joining: tuple[int, ...]  # requests admitted before the step, each prefilled alone, in arrival order
    decoding: tuple[int, ...]  # requests that had a token before the step: one row each, in admission order


def joining(running: int, waiting: int, max_batch: int) -> int:
    """How many waiting requests join a batch of `running` before a step: first come, first
    served, while the batch has room."""
    return max(0, min(waiting, max_batch - running))


def continuous_batching(decode_steps_R: Sequence[int], max_batch: int) -> list[BatchStep]:
    """The steps of a run where requests 0…R−1 all wait at the start (in that order) and request r
    takes part in `decode_steps_R[r]` decode steps after its prefill (0: its prefill's token is its last)."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    if any(n < 0 for n in decode_steps_R):
        raise ValueError(f"decode steps must be >= 0, got {list(decode_steps_R)}")
    waiting = deque(range(len(decode_steps_R)))
    left_R = list(decode_steps_R)
    running: list[int] = []
    steps = []
    while waiting or running:
        decoding = tuple(running)
        joined = tuple(waiting.popleft() for _ in range(joining(len(running), len(waiting), max_batch)))
        for r in decoding:
            left_R[r] -= 1
        running = [r for r in (*decoding, *joined) if left_R[r] > 0]
        steps.append(BatchStep(joined, decoding))
    return steps
