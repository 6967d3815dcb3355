"""The CUDA copy engine (a `CopyEngine`, moepic/runtime/copy_protocol.py): host→device copies on side
streams, synchronised by events. Side effects: CUDA streams and events (this module is their only owner).

It never blocks the host: `wait` makes the compute stream wait on a copy's event, and stall time is
read from timing events when reporting.
"""

from __future__ import annotations

import torch

from moepic.runtime.copy_protocol import CopyEngine, CopyStats, Phase, Ranges, Ticket, ranges_bytes


class CudaCopyEngine(CopyEngine):
    """Copies on side streams; urgent (on-demand) copies on a higher-priority stream than prefetches.
    A ticket is `done` as soon as its copies are issued on a stream: the device finishes them without
    the host, so nothing is left for the host to do (`landed` asks the device whether they finished)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stats = CopyStats()
        self._phase: Phase = "prefill"
        self._prefetch_stream = torch.cuda.Stream(device, priority=0)
        self._urgent_stream = torch.cuda.Stream(device, priority=-1)
        self._stalls: list[tuple[torch.cuda.Event, torch.cuda.Event, str]] = []
        self._copies: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def submit(self, ranges: Ranges, *, urgent: bool = False, after: object = None) -> Ticket:
        ticket = Ticket(nbytes=ranges_bytes(ranges), urgent=urgent, owner=self)
        stream = self._urgent_stream if urgent else self._prefetch_stream
        with torch.cuda.stream(stream):
            if after is not None:
                stream.wait_event(after)  # compute has let go of the destination
            start = torch.cuda.Event(enable_timing=True)
            start.record(stream)
            for dst, src in ranges:
                dst.copy_(src, non_blocking=True)
            ticket.event = torch.cuda.Event(enable_timing=True)
            ticket.event.record(stream)
        self._copies.append((start, ticket.event))
        self.stats.copies += 1
        self.stats.bytes += ticket.nbytes
        ticket.done.set()  # issued: the host's part is over; completion is the event's business
        return ticket

    def wait(self, ticket: Ticket) -> None:
        if ticket.owner is not self:
            raise ValueError("waiting for a copy this engine did not issue")
        compute = torch.cuda.current_stream(self.device)
        before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        before.record(compute)
        compute.wait_event(ticket.event)  # the device waits; the host does not
        after.record(compute)
        self._stalls.append((before, after, self._phase))
        self.stats.waits += 1

    def landed(self, ticket: Ticket) -> bool:
        """Whether the copy has finished on the device (never blocks)."""
        return ticket.event.query()

    def cancel(self, ticket: Ticket) -> bool:
        """Copies already queued on a stream cannot be withdrawn."""
        return False

    def settle(self, ticket: Ticket) -> torch.cuda.Event:
        """The fence for a buffer a dropped copy may still be writing: that copy's event (the next
        copy into the buffer waits on it on the device; the host does not)."""
        return ticket.event

    def fence(self) -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def set_phase(self, phase: Phase) -> None:
        self._phase = phase

    def current_stats(self) -> CopyStats:
        """The stats, with the device time compute spent stalled on copies (synchronises: for reports)."""
        torch.cuda.synchronize(self.device)
        for before, after, phase in self._stalls:
            stalled = before.elapsed_time(after) / 1e3
            self.stats.exposed_s += stalled
            self.stats.decode_exposed_s += stalled if phase == "decode" else 0.0
        self.stats.busy_s += sum(start.elapsed_time(end) for start, end in self._copies) / 1e3
        self._stalls.clear()
        self._copies.clear()
        return self.stats

    def close(self) -> None:
        torch.cuda.synchronize(self.device)
