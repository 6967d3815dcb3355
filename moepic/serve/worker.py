"""The loop that owns the model: it steps the scheduler and hands each request's tokens to the
event loop. Side effects: a thread (when started as one), wall-clock times, stderr (a failed
step's traceback).

    handlers (event loop) ── submit / cancel ──▶ command queue ──▶ worker: apply, step(), …
                        ◀── each request's TokenEvents (the last says why it ended) ──┘
                            or an ApiError: the worker stopped, or a step failed

Why apart from the event loop: a step holds the CPU (or waits on the device) for milliseconds to
seconds; on the event loop it would stall every connection. Why one: the scheduler and the expert
engine are not thread-safe, and a single owner needs no locks around them. Commands are applied
between steps, so a request submitted during a step joins the next (continuous batching), and a
cancelled one leaves before it, its KV cache freed.

`moepic serve` runs it on the main thread, the HTTP server beside it (moepic/serve/server.py):
torch's OpenMP team belongs to the thread that first used it, and a second thread's team on the
same cores made every small op wait for sleeping workers (measured: 165 vs 300 tokens/s on the
bundled model). `start` runs it in a thread of its own, for tests and embedding.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import queue
import sys
import threading
import time
import traceback

import attrs

from moepic.runtime.scheduler import QueueFull, Request, Scheduler
from moepic.serve.protocol import ApiError

RATE_WINDOW_S = 10.0  # tokens/s is measured over the last this many seconds
REPORT_EVERY_S = 0.5  # the engine's counters are copied for /metrics at most this often
IDLE_WAKE_S = 0.25  # an idle worker on the main thread wakes this often (a signal's handler runs then)


@attrs.define
class WorkerCounters:
    """What the worker did; written by its thread only, read by /metrics (each value read whole)."""

    steps: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0  # of the requests admitted to the queue
    busy_s: float = 0.0  # time inside steps
    engine: dict | None = None  # the expert engine's report, as of the last copy (None: all resident)
    recent: collections.deque = attrs.field(factory=collections.deque)  # (time, tokens) of recent steps
    lock: threading.Lock = attrs.field(factory=threading.Lock)  # guards `recent`

    def tokens_per_s(self, now: float) -> float:
        with self.lock:
            while self.recent and self.recent[0][0] < now - RATE_WINDOW_S:
                self.recent.popleft()
            return sum(n for _, n in self.recent) / RATE_WINDOW_S


@attrs.frozen
class _Submit:
    request: Request
    loop: asyncio.AbstractEventLoop
    accepted: asyncio.Future  # → the request id, or QueueFull
    events: asyncio.Queue


_STOP = object()


class ServeWorker:
    def __init__(self, scheduler: Scheduler, experts=None) -> None:
        self.scheduler, self.experts = scheduler, experts
        self.counters = WorkerCounters()
        self.failed: str | None = None  # why the engine stopped serving, after a step failed
        self.stopping = False
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[int, _Submit] = {}
        self._reported_at = 0.0
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Step in a thread of its own (tests, embedding); `moepic serve` calls `run` on its main thread."""
        self._thread = threading.Thread(target=self.run, name="moepic-serve-worker", daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        """Stop after the current step (from any thread); requests still running get a 503."""
        self.stopping = True
        self._commands.put(_STOP)

    def stop(self, timeout: float = 30.0) -> None:
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout)

    # --- the event loop's side ----------------------------------------------------------------------

    async def submit(self, request: Request) -> tuple[int, asyncio.Queue]:
        """Queue `request`: its id and the queue its events arrive on. ApiError 429 when the queue is
        full, 503 when the server is stopping or its engine failed."""
        if self.failed is not None:
            raise ApiError(503, f"the server cannot generate any more: {self.failed}", kind="server_error")
        if self.stopping:
            raise ApiError(503, "the server is shutting down", kind="server_error")
        loop = asyncio.get_running_loop()
        submit = _Submit(request, loop, loop.create_future(), asyncio.Queue())
        self._commands.put(submit)
        try:
            request_id = await submit.accepted
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}; retry later", kind="server_busy", code="queue_full") from None
        return request_id, submit.events

    def cancel(self, request_id: int) -> None:
        """Drop the request (waiting or running) before the next step; its events stop."""
        self._commands.put(("cancel", request_id))

    @property
    def queued(self) -> int:
        return self.scheduler.queued

    @property
    def batch_size(self) -> int:
        return self.scheduler.batch_size

    # --- the worker thread --------------------------------------------------------------------------

    def run(self) -> None:
        """Apply commands and step until `request_stop`. Idle, it waits for a command in slices, so
        that on the main thread a signal's handler gets its turn."""
        while True:
            waiting = self.scheduler.idle or self.failed is not None  # nothing to step: sleep until told
            command = self._wait_for_command() if waiting else self._next_command()
            while command is not None:
                if command is _STOP:
                    self._end_all(ApiError(503, "the server shut down before this request finished", kind="server_error"))
                    return
                self._apply(command)
                command = self._next_command()
            if not self.scheduler.idle and self.failed is None:
                self._step()

    def _next_command(self):
        with contextlib.suppress(queue.Empty):
            return self._commands.get_nowait()
        return None

    def _wait_for_command(self):
        while True:
            with contextlib.suppress(queue.Empty):
                return self._commands.get(timeout=IDLE_WAKE_S)

    def _apply(self, command) -> None:
        if isinstance(command, _Submit):
            if self.failed is not None:
                refused = ApiError(503, f"the server cannot generate any more: {self.failed}", kind="server_error")
                _call(command.loop, _settle, command.accepted, None, refused, None)
                return
            try:
                request_id = self.scheduler.submit(command.request)
            except QueueFull as e:
                _call(command.loop, _settle, command.accepted, None, e, None)
                return
            self._streams[request_id] = command
            self.counters.prompt_tokens += len(command.request.prompt_ids)
            # A handler gone meanwhile (its client left) cancels the request it no longer waits for.
            _call(command.loop, _settle, command.accepted, request_id, None, lambda: self.cancel(request_id))
        else:
            _, request_id = command
            self.scheduler.cancel(request_id)
            self._streams.pop(request_id, None)

    def _step(self) -> None:
        start = time.perf_counter()
        try:
            events = self.scheduler.step()
        except Exception as e:  # a bug or a device error: this engine's state is unknown from here on
            traceback.print_exc(file=sys.stderr)
            self.failed = f"a decode step failed ({type(e).__name__}: {e})"
            for request_id in list(self._streams):
                self.scheduler.cancel(request_id)
            self._end_all(ApiError(500, f"generation failed: {self.failed}", kind="server_error"))
            return
        now = time.perf_counter()
        self.counters.steps += 1
        self.counters.busy_s += now - start
        self.counters.generated_tokens += len(events)
        with self.counters.lock:
            self.counters.recent.append((now, len(events)))
        for event in events:
            stream = self._streams.get(event.request_id)
            if stream is None:
                continue
            _call(stream.loop, stream.events.put_nowait, event)
            if event.finished is not None:  # its last event: the handler has what it needs
                self.scheduler.result(event.request_id)
                del self._streams[event.request_id]
        if self.experts is not None and (self.scheduler.idle or now - self._reported_at > REPORT_EVERY_S):
            self.counters.engine, self._reported_at = self.experts.report(), now

    def _end_all(self, error: ApiError) -> None:
        for stream in self._streams.values():
            _call(stream.loop, stream.events.put_nowait, error)
        self._streams.clear()


def _call(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    """`fn(*args)` on the event loop's thread; nothing if that loop has closed (the server is gone)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)


def _settle(future: asyncio.Future, value, error: BaseException | None, abandoned) -> None:
    if future.cancelled():
        if abandoned is not None:
            abandoned()
    elif error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)
