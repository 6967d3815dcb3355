"""Continuous batching: requests join and leave between decode steps of one model. Side effects:
wall-clock timing; the KV caches it allocates (freed when a request ends or is cancelled).

    submit(request) ─▶ waiting ─admit (prefill alone, first token)─▶ running ─decode_step─▶ … ─▶ done
                                   up to `max_batch` running            (EOS, token limit, cancel)

Each `step()` admits waiting requests while the batch has room, prefills each admitted prompt
alone — whole, or its next `prefill_chunk` tokens, so a long prompt spreads over several steps
while the others keep decoding — whose last piece gives its first token (as in `generate`), then
runs one decode step (core/model.py `decode_step`) for every request that had a token before the
step. Every request's tokens and logits are what `generate` gives it alone (with the same
`prefill_chunk`), bit for bit, whatever else is in the batch and whenever it arrived
(tests/runtime/test_scheduler.py): the MoE layers load the union of the batch's experts once, and
every token is computed as its sequence alone would compute it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence

import attrs
import torch

from moepic.config import SamplingConfig
from moepic.core.batching import joining
from moepic.core.model import KVCache, Model, decode_step, forward
from moepic.core.moe import ExpertSource
from moepic.core.rope import cache_rebuild_length
from moepic.errors import MoepicError
from moepic.runtime.generation import (
    GenerationResult,
    GenerationStats,
    check_prefill_chunk,
    next_token,
    rebuild,
    stop_ids,
)


class QueueFull(MoepicError):
    """The scheduler's queue holds `max_queue` waiting requests already (a server answers 429)."""


@attrs.frozen(kw_only=True)
class Request:
    prompt_ids: tuple[int, ...] = attrs.field(converter=tuple)
    max_new_tokens: int
    sampling: SamplingConfig = SamplingConfig(greedy=True)
    eos_ids: tuple[int, ...] | None = attrs.field(default=None, converter=attrs.converters.optional(tuple))

    def __attrs_post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("the prompt is empty: give at least one token")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@attrs.frozen
class TokenEvent:
    """A request's new token; `finished`: why it ended with it ("eos", "length"), else None."""

    request_id: int
    token: int
    finished: str | None = None


class _Running:
    """One admitted request: its cache, sampler, tokens and times."""

    def __init__(self, model: Model, request: Request) -> None:
        self.request = request
        self.eos = stop_ids(model, request.eos_ids)
        self.generator = torch.Generator(device=model.device).manual_seed(request.sampling.seed)
        self.cache = KVCache.allocate(model, len(request.prompt_ids) + request.max_new_tokens)
        self.new_ids: list[int] = []
        self.logits: list[torch.Tensor] = []
        self.last: torch.Tensor | None = None  # the newest token, the next step's input
        self.prefilled = 0  # prompt tokens through the model so far
        self.prefill_s = self.decode_s = 0.0

    def take(self, logits_V: torch.Tensor, keep_logits: bool) -> str | None:
        """Sample the next token (as `generate` does); why the request ends with it, if it does."""
        self.last = next_token(logits_V, self.request.sampling, self.generator)
        self.new_ids.append(int(self.last))
        if keep_logits:
            self.logits.append(logits_V.clone())
        if self.new_ids[-1] in self.eos:
            return "eos"
        return "length" if len(self.new_ids) == self.request.max_new_tokens else None

    def result(self, keep_logits: bool) -> GenerationResult:
        stats = GenerationStats(prompt_tokens=len(self.request.prompt_ids), tokens=len(self.new_ids),
                                prefill_s=self.prefill_s, decode_s=self.decode_s)
        return GenerationResult(token_ids=self.new_ids, stats=stats, stopped_on_eos=self.new_ids[-1] in self.eos,
                                logits=self.logits if keep_logits else None)


class Scheduler:
    """Continuous batching over `model` and its expert source (default: every expert resident).
    `max_batch`: requests decoded together; `max_queue`: requests waiting beyond them;
    `prefill_chunk`: prompt tokens a request puts through per step (None: its whole prompt)."""

    def __init__(self, model: Model, experts: ExpertSource | None = None, *, max_batch: int = 8, max_queue: int = 64,
                 keep_logits: bool = False, prefill_chunk: int | None = None) -> None:
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        check_prefill_chunk(model, prefill_chunk)
        self.model, self.experts, self.keep_logits, self.prefill_chunk = model, experts, keep_logits, prefill_chunk
        self.max_batch, self.max_queue = max_batch, max_queue
        self._waiting: deque[tuple[int, Request]] = deque()
        self._running: dict[int, _Running] = {}
        self._done: dict[int, GenerationResult] = {}
        self._next_id = 0
        self._rebuild_at = cache_rebuild_length(model.spec.rope, model.rope_scaling)
        if experts is not None:
            experts.begin_request()

    @property
    def idle(self) -> bool:
        return not self._waiting and not self._running

    @property
    def queued(self) -> int:
        return len(self._waiting)

    @property
    def batch_size(self) -> int:
        return len(self._running)

    def submit(self, request: Request) -> int:
        """Queue `request`; its id. QueueFull when `max_queue` requests wait already beyond the batch's
        free places (a request that the next step admits is not refused for arriving before it)."""
        with_it = len(self._waiting) + 1
        beyond_batch = with_it - joining(len(self._running), with_it, self.max_batch)  # waiting after the next step's admissions
        if beyond_batch > self.max_queue:
            raise QueueFull(f"{beyond_batch - 1} requests are waiting already beyond the batch (the queue holds {self.max_queue})")
        request_id, self._next_id = self._next_id, self._next_id + 1
        self._waiting.append((request_id, request))
        return request_id

    def cancel(self, request_id: int) -> None:
        """Drop a waiting or running request (its KV cache goes with it); a finished one stays."""
        self._waiting = deque((i, r) for i, r in self._waiting if i != request_id)
        self._running.pop(request_id, None)

    def result(self, request_id: int) -> GenerationResult | None:
        """A finished request's result (None while it runs), handed out once."""
        return self._done.pop(request_id, None)

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """Admit what fits, put each admitted prompt's next piece through, then one decode step for
        the requests that had a token: the tokens this produced (first tokens first)."""
        events: list[TokenEvent] = []
        ready = [i for i, seq in self._running.items() if seq.new_ids]  # the ones with a token to continue from
        for _ in range(joining(len(self._running), len(self._waiting), self.max_batch)):  # the rule the simulator replays
            request_id, request = self._waiting.popleft()
            self._running[request_id] = _Running(self.model, request)
        for request_id, seq in list(self._running.items()):
            if not seq.new_ids:
                self._prefill(request_id, seq, events)
        batched = []
        for request_id in ready:
            seq = self._running[request_id]
            if seq.cache.length == self._rebuild_at:  # it outgrows a rope scale its cached keys carry: alone, as `generate`
                start = time.perf_counter()
                logits_V, seq.cache = rebuild(self.model, [*seq.request.prompt_ids, *seq.new_ids], seq.cache, self.experts)
                seq.decode_s += time.perf_counter() - start
                events.append(self._took(request_id, seq, logits_V))
            else:
                batched.append(request_id)
        if batched:
            start = time.perf_counter()
            tokens_B = torch.cat([self._running[i].last.view(1) for i in batched])
            logits_BV, caches = decode_step(self.model, tokens_B, [self._running[i].cache for i in batched], self.experts)
            elapsed = time.perf_counter() - start  # every request in the step waited for all of it
            for row, request_id in enumerate(batched):
                seq = self._running[request_id]
                seq.cache, seq.decode_s = caches[row], seq.decode_s + elapsed
                events.append(self._took(request_id, seq, logits_BV[row]))
        return events

    def _prefill(self, request_id: int, seq: _Running, events: list[TokenEvent]) -> None:
        """The prompt's next piece through the model; its last gives the first token."""
        start = time.perf_counter()
        prompt = seq.request.prompt_ids
        piece = prompt[seq.prefilled : seq.prefilled + (self.prefill_chunk or len(prompt))]
        piece_T = torch.tensor(piece, dtype=torch.long, device=self.model.device)
        logits_TV, seq.cache = forward(self.model, piece_T, seq.cache, self.experts, logits_for="last")
        seq.prefilled += len(piece)
        seq.prefill_s += time.perf_counter() - start
        if seq.prefilled == len(prompt):
            events.append(self._took(request_id, seq, logits_TV[-1]))

    def _took(self, request_id: int, seq: _Running, logits_V: torch.Tensor) -> TokenEvent:
        finished = seq.take(logits_V, self.keep_logits)
        if finished is not None:
            self._done[request_id] = seq.result(self.keep_logits)
            del self._running[request_id]
        return TokenEvent(request_id, seq.new_ids[-1], finished)


def generate_batch(
    model: Model, requests: Sequence[Request], *, experts: ExpertSource | None = None, keep_logits: bool = False,
    prefill_chunk: int | None = None,
) -> list[GenerationResult]:
    """Each request's result, in order, as `generate` would give it alone: all submitted at once,
    decoded together (a request's decode time is the wall time of the steps it took part in)."""
    scheduler = Scheduler(model, experts, max_batch=max(1, len(requests)), max_queue=len(requests), keep_logits=keep_logits,
                          prefill_chunk=prefill_chunk)
    ids = [scheduler.submit(r) for r in requests]
    while not scheduler.idle:
        scheduler.step()
    return [scheduler.result(i) for i in ids]
