"""The CPU copy engine (a `CopyEngine`, moepic/runtime/copy_protocol.py), and `copy_engine_for`,
which picks it or the CUDA one (copy_cuda.py). Side effects: a worker thread.

One worker thread is the link: it takes urgent jobs before queued prefetches, copies, and with an
emulated link (`Link`) holds each job for latency + bytes/bandwidth, so a CPU-only machine runs the
pipeline at a realistic copy/compute ratio. Compute on the CPU is synchronous, so a released buffer
is free at once (`fence()` is None) and `wait` blocks until the copy has landed.

Stopping is prompt, whatever is queued (a Ctrl-C must not wait for minutes of emulated transfers):
`close` drops the copies that have not started (waiting for one raises CopyError), cuts short the
emulated hold of the copy in progress, and joins the worker, never from the worker thread itself.
"""

from __future__ import annotations

import ctypes
import math
import threading
import time
import weakref
from collections import deque

import attrs
import torch

from moepic.runtime.copy_protocol import CopyEngine, CopyError, CopyStats, Phase, Ranges, Ticket, ranges_bytes

WAKE_S = 0.1  # longest a blocked `wait` goes without checking for a Ctrl-C


@attrs.frozen(kw_only=True)
class Link:
    """An emulated host→device link: each copy takes latency + bytes / bandwidth."""

    gbps: float  # gigabytes (10⁹ bytes) per second
    latency_us: float = 0.0

    def __attrs_post_init__(self) -> None:
        if not (self.gbps > 0 and self.latency_us >= 0 and math.isfinite(self.gbps) and math.isfinite(self.latency_us)):
            raise ValueError(f"link: bandwidth must be > 0 GB/s and latency ≥ 0 µs, got {self.gbps}, {self.latency_us}")

    def seconds(self, nbytes: int) -> float:
        return self.latency_us * 1e-6 + nbytes / (self.gbps * 1e9)


def _host_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """One range, copied by the worker thread. Contiguous same-dtype host ranges (all the engine's)
    go through a plain memmove: torch's copy would start an OpenMP team in this thread, whose
    spinning threads then steal the cores from compute (measured: +5 ms/token on 2 cores)."""
    plain = (
        isinstance(dst, torch.Tensor) and isinstance(src, torch.Tensor) and type(src) is torch.Tensor
        and dst.device.type == src.device.type == "cpu" and dst.dtype == src.dtype
        and dst.is_contiguous() and src.is_contiguous()
    )
    if plain:
        ctypes.memmove(dst.data_ptr(), src.data_ptr(), src.numel() * src.element_size())
    else:
        dst.copy_(src)


class _LinkQueue:
    """The worker's state, apart from the engine, so a dropped engine is collected and its worker ends."""

    def __init__(self, link: Link | None, stats: CopyStats) -> None:
        self.link, self.stats = link, stats
        self.jobs: deque[tuple[Ticket, Ranges]] = deque()
        self.urgent: deque[tuple[Ticket, Ranges]] = deque()
        self.wake = threading.Condition()
        self.closed = False
        self.stopping = threading.Event()  # set by close: the emulated hold of a copy ends early
        self.failure: BaseException | None = None

    def put(self, ticket: Ticket, ranges: Ranges) -> None:
        with self.wake:
            if self.closed:
                raise CopyError("the copy engine is closed")
            (self.urgent if ticket.urgent else self.jobs).append((ticket, ranges))
            # notify_all, not notify: a KeyboardInterrupt inside an earlier notify() can leave a stale
            # waiter in the condition's list, and notify() would wake that one instead of the worker.
            self.wake.notify_all()

    def close(self) -> None:
        """Refuse new jobs and drop the waiting ones (their tickets are done, cancelled, with an error);
        the copy in progress, if any, finishes its copying but not its emulated hold."""
        self.stopping.set()
        with self.wake:
            self.closed = True
            dropped = [*self.urgent, *self.jobs]
            self.urgent.clear()
            self.jobs.clear()
            self.wake.notify_all()
        for ticket, _ in dropped:
            ticket.error = CopyError("not run: the copy engine was closed first")
            ticket.cancelled = True
            ticket.done.set()

    def withdraw(self, ticket: Ticket) -> bool:
        """Take a job that has not started off the queue; True if it was still waiting."""
        with self.wake:
            for queue in (self.jobs, self.urgent):  # a waited-for prefetch may have been promoted
                for i, (queued, _) in enumerate(queue):
                    if queued is ticket:
                        del queue[i]
                        ticket.cancelled = True
                        ticket.done.set()
                        return True
        return False

    def promote(self, ticket: Ticket) -> None:
        """Move a waiting job to the urgent queue's end (compute needs it now)."""
        with self.wake:
            for i, (queued, ranges) in enumerate(self.jobs):
                if queued is ticket:
                    del self.jobs[i]
                    self.urgent.append((ticket, ranges))
                    return

    def next(self) -> tuple[Ticket, Ranges] | None:
        with self.wake:
            while not (self.urgent or self.jobs or self.closed):
                self.wake.wait()
            queue = self.urgent if self.urgent else self.jobs
            return queue.popleft() if queue else None

    def run(self) -> None:
        while (job := self.next()) is not None:
            ticket, ranges = job
            start = time.perf_counter()
            try:
                if self.failure is not None:
                    raise CopyError(f"not run: an earlier copy failed ({self.failure})")
                for dst, src in ranges:
                    _host_copy(dst, src)
                if self.link is not None:  # hold the link for as long as the emulated transfer takes
                    self.stopping.wait(max(0.0, self.link.seconds(ticket.nbytes) - (time.perf_counter() - start)))
                self.stats.copies += 1
                self.stats.bytes += ticket.nbytes
                self.stats.busy_s += time.perf_counter() - start
            except BaseException as e:  # surfaced to whoever waits, never swallowed
                ticket.error = e
                self.failure = self.failure or e
            finally:
                ticket.done.set()
            # Drop the finished job before blocking for the next: its ticket points at the engine,
            # and a reference held here would keep a dropped engine (and its worker) alive.
            job = ticket = ranges = dst = src = None


class ThreadCopyEngine(CopyEngine):
    """The CPU copy engine: a worker thread drains a two-level queue (urgent first, then FIFO).
    A ticket is `done` once the worker has copied it (and held the emulated link), failed it, or
    dropped it; `cancel` and `close` set it for the copies they withdraw."""

    def __init__(self, link: Link | None = None) -> None:
        self.link = link
        self.stats = CopyStats()
        self._phase: Phase = "prefill"
        self._queue = _LinkQueue(link, self.stats)
        self._worker = threading.Thread(target=self._queue.run, name="moepic-copy", daemon=True)
        self._worker.start()
        # An engine nobody closed still stops and joins its worker: when collected, or at exit (a
        # worker thread alive at interpreter exit, having run torch ops, aborts the process).
        self._finalizer = weakref.finalize(self, _stop, self._queue, self._worker)

    def submit(self, ranges: Ranges, *, urgent: bool = False, after: object = None) -> Ticket:
        if self._queue.failure is not None:
            raise CopyError(f"the copy engine stopped after a failed copy: {self._queue.failure}")
        ticket = Ticket(nbytes=ranges_bytes(ranges), urgent=urgent, owner=self)
        self._queue.put(ticket, tuple(ranges))
        return ticket

    def wait(self, ticket: Ticket) -> None:
        if ticket.owner is not self:
            raise ValueError("waiting for a copy this engine did not issue")
        if ticket.cancelled and ticket.error is None:  # withdrawn by `cancel`: nobody should wait for it
            raise ValueError("waiting for a copy that was cancelled")
        if not ticket.done.is_set():  # a prefetch compute now needs goes ahead of the other prefetches
            self._queue.promote(ticket)
        start = time.perf_counter()
        # In short slices: a Ctrl-C the kernel hands to another thread (this worker, say) is raised
        # here only once the main thread runs Python code again, and never hang on a dead worker.
        while not ticket.done.wait(timeout=WAKE_S):
            if not self._worker.is_alive():
                raise CopyError("the copy worker died before finishing a copy")
        waited = time.perf_counter() - start
        self.stats.exposed_s += waited
        self.stats.decode_exposed_s += waited if self._phase == "decode" else 0.0
        self.stats.waits += 1
        if ticket.error is not None:
            raise CopyError(f"copying {ticket.nbytes} bytes failed: {ticket.error}") from ticket.error

    def landed(self, ticket: Ticket) -> bool:
        """Whether the copy has finished, successfully (never blocks)."""
        return ticket.done.is_set() and not ticket.cancelled and ticket.error is None

    def cancel(self, ticket: Ticket) -> bool:
        """Withdraw a copy nobody needs any more if it has not started (a wrong prefetch), so it does
        not hold the link; True if it was withdrawn. A started copy runs to the end."""
        if ticket.owner is not self:
            raise ValueError("cancelling a copy this engine did not issue")
        return self._queue.withdraw(ticket)

    def fence(self) -> None:
        return None  # compute on the CPU is synchronous: a released buffer is free at once

    def set_phase(self, phase: Phase) -> None:
        self._phase = phase

    def settle(self, ticket: Ticket) -> None:
        """Make a buffer that a dropped copy may still be writing safe to copy into: wait for it."""
        self.wait(ticket)

    def current_stats(self) -> CopyStats:
        """The stats, with the wall time compute spent blocked in `wait`."""
        return self.stats

    def close(self) -> None:
        """Stop the worker: copies not started are dropped, a copy in progress ends its copying (not
        its emulated hold); returns once the worker has ended. Finished tickets can still be waited for."""
        self._finalizer()


def _stop(queue: _LinkQueue, worker: threading.Thread) -> None:
    queue.close()
    # The worker drops its last ticket, whose owner may be the last reference to the engine: this
    # finalizer then runs in the worker itself, which ends on its own once the queue is closed.
    if worker is threading.current_thread():
        return
    while worker.is_alive():
        # A Ctrl-C landing in close() may have cost the worker its wake-up: wake it again, in case.
        worker.join(timeout=WAKE_S)
        with queue.wake:
            queue.wake.notify_all()


def copy_engine_for(device: torch.device, link: Link | None = None) -> CopyEngine:
    """The CUDA engine for a CUDA device, else the thread engine (over `link`, if emulating one)."""
    if device.type == "cuda":
        from moepic.runtime.copy_cuda import CudaCopyEngine

        if link is not None:
            raise ValueError("an emulated link is for CPU runs; on CUDA the real link is used")
        return CudaCopyEngine(device)
    return ThreadCopyEngine(link)
