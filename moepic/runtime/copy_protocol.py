"""Asynchronous host→device copies: the one interface (`CopyEngine`) the offloading engine programs
against, and its tickets and stats. Pure: types only. The implementations own the side effects: the
CPU worker thread in copy_engine.py, CUDA streams and events in copy_cuda.py.

    engine ─submit(ranges, urgent)─▶ Ticket ─ ... compute ... ─wait(ticket)─▶ data usable
              │                                                    └─ the time blocked here is *exposed* copy time
              ├─ CUDA (copy_cuda.py): copies on a side stream (urgent ones on a higher-priority stream),
              │        an event per ticket; `wait` makes the compute stream wait on it, never the host.
              └─ CPU (copy_engine.py): one worker thread is the link: it takes urgent jobs before queued
                       prefetches, copies, and with an emulated link holds each job for latency +
                       bytes/bandwidth, so a CPU-only machine runs the pipeline at a realistic ratio.

A buffer being written by a copy must not be read until its ticket is waited for, and must not be
written again while compute still reads it: `submit(..., after=fence)` takes the fence the compute
side recorded when it let go of the buffer (`fence()`; on the CPU compute is synchronous, so None).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Literal, Protocol

import attrs
import torch

from moepic.errors import MoepicError

Ranges = Sequence[tuple[torch.Tensor, torch.Tensor]]  # (destination, source) pairs, same shapes
Phase = Literal["prefill", "decode"]  # the kind of step whose waits are being counted


class CopyError(MoepicError):
    """A host→device copy failed; the message names its size and cause."""


def ranges_bytes(ranges: Ranges) -> int:
    """Bytes the ranges move; each destination must have its source's shape (no broadcasting)."""
    for dst, src in ranges:
        if dst.shape != src.shape:
            raise ValueError(f"copy range: destination shape {tuple(dst.shape)} differs from source {tuple(src.shape)}")
    return sum(src.numel() * src.element_size() for _, src in ranges)


@attrs.define(eq=False)
class Ticket:
    """One submitted copy. `done` is set once the engine's host side is finished with it (see
    `CopyEngine`); `error` and `cancelled` are final from then on."""

    nbytes: int
    urgent: bool
    owner: object  # the engine that issued it: only that one may wait for or cancel it
    done: threading.Event = attrs.field(factory=threading.Event)
    error: BaseException | None = None
    event: object = None  # CUDA: the event recorded after the copies
    cancelled: bool = False  # withdrawn before it started: nothing was copied


@attrs.define
class CopyStats:
    copies: int = 0
    bytes: int = 0
    exposed_s: float = 0.0  # time compute waited for copies (CPU: measured in `wait`)
    decode_exposed_s: float = 0.0  # the part of it in decode steps (see `set_phase`)
    busy_s: float = 0.0  # time the link spent copying (what is not exposed was overlapped)
    waits: int = 0


class CopyEngine(Protocol):
    """Host→device copies that overlap compute. Both engines subclass this protocol.

    A ticket's `done` means one thing in every engine: the engine's host-side work on the copy is
    over. The copy was carried out (CPU: by the worker thread), or handed to the device, which
    finishes it without the host (CUDA: issued on a stream), or it failed, or it was dropped
    (`cancel`, `close`). From then on the ticket's `error` and `cancelled` are final and `wait`
    does not block the host. `done` does not say the data has arrived: `landed` does.

    A copy that fails raises CopyError from `wait`, naming the copy; the engine then refuses new
    work. Stopping is prompt, whatever is queued: `close` drops the copies that have not started
    (waiting for one raises CopyError).
    """

    def submit(self, ranges: Ranges, *, urgent: bool = False, after: object = None) -> Ticket:
        """Start copying each (destination, source) pair; `urgent` copies (compute needs them now)
        go ahead of prefetches. `after`: the fence to wait for before writing the destinations."""
        ...

    def wait(self, ticket: Ticket) -> None:
        """Make the copy's data usable by the compute that follows (CPU: blocks until it landed;
        CUDA: the compute stream waits, the host does not). Raises CopyError if it failed."""
        ...

    def landed(self, ticket: Ticket) -> bool:
        """Whether the copy has finished, successfully (never blocks)."""
        ...

    def cancel(self, ticket: Ticket) -> bool:
        """Withdraw a copy nobody needs any more if it has not started (a wrong prefetch), so it does
        not hold the link; True if it was withdrawn (then `done` and `cancelled`)."""
        ...

    def fence(self) -> object:
        """A marker of the compute issued so far; a copy submitted `after` it writes only once that
        compute has finished reading its buffer (None where compute is synchronous)."""
        ...

    def settle(self, ticket: Ticket) -> object:
        """Make a buffer that a dropped copy may still be writing safe to copy into: wait for the
        copy (returns None), or return a fence the next copy into the buffer waits on."""
        ...

    def set_phase(self, phase: Phase) -> None:
        """The kind of step the following waits belong to: exposed time in "decode" also counts in
        `decode_exposed_s`."""
        ...

    def current_stats(self) -> CopyStats:
        """The stats so far, with the time compute spent blocked on copies."""
        ...

    def close(self) -> None:
        """Stop: no new copies; returns once the engine holds no thread or pending device work."""
        ...
