"""runtime/copy_engine.py: the CPU copy engine lands every copy where it was sent, urgent jobs overtake
queued prefetches, an emulated link holds each copy for at least its modelled time, failures surface
as CopyError without hangs, the worker thread never outlives its engine, and closing is prompt: queued
copies are dropped, not waited for (unit + property).

Timing assertions are lower bounds on emulated link time only, never upper bounds on speed."""

from __future__ import annotations

import gc
import threading
import time
from contextlib import closing

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from moepic.runtime.copy_engine import Link, ThreadCopyEngine, copy_engine_for
from moepic.runtime.copy_protocol import CopyError, Ticket

BOUND_S = 10.0  # a call that has not returned by then is hung


def call_bounded(fn, timeout: float = BOUND_S):
    """fn() on another thread; fails the test if it does not return in time. Returns (result, exception)."""
    outcome: dict = {}

    def target():
        try:
            outcome["result"] = fn()
        except BaseException as e:  # handed back to the test
            outcome["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"call did not return within {timeout} s (hang)"
    return outcome.get("result"), outcome.get("error")


class Gate:
    """A destination whose copy blocks until opened: it holds the worker so later jobs queue behind it."""

    shape = torch.Size([1])  # its source is torch.zeros(1)

    def __init__(self) -> None:
        self.entered, self.opened = threading.Event(), threading.Event()

    def copy_(self, src: torch.Tensor) -> None:
        self.entered.set()
        if not self.opened.wait(timeout=BOUND_S):
            raise TimeoutError("the test never opened the gate")


class Recorder:
    """A destination that copies into `tensor` and logs, in the worker, the order of copies and which
    tickets were already done when its own copy started."""

    def __init__(self, name: str, log: list, tickets: dict, size: int = 4) -> None:
        self.name, self.log, self.tickets = name, log, tickets
        self.tensor = torch.zeros(size)
        self.shape = self.tensor.shape

    def copy_(self, src: torch.Tensor) -> None:
        done = {name for name, t in self.tickets.items() if t.done.is_set()}
        self.log.append((self.name, done))
        self.tensor.copy_(src)


def new_threads(before: set) -> set:
    return {t for t in threading.enumerate() if t not in before}


# -- copies land ------------------------------------------------------------------------------------

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int8, torch.uint8, torch.bool)


def random_tensor(shape, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 100).to(dtype)
    return torch.randint(0, 100, shape, generator=g).to(dtype)


shapes = st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple)


@given(
    dtype=st.sampled_from(DTYPES),
    tickets=st.lists(
        st.lists(st.tuples(shapes, st.integers(0, 3), st.booleans()), min_size=1, max_size=4), min_size=1, max_size=3
    ),
    seed=st.integers(0, 2**31 - 1),
    urgent=st.lists(st.booleans(), min_size=3, max_size=3),
)
def test_copies_land_in_their_ranges_only_and_stats_count_tickets_and_bytes(dtype, tickets, seed, urgent):
    # Each range: a source of random shape (transposed, so non-contiguous, if asked) into a view of one
    # shared flat destination after a gap: after `wait`, every view equals its source and every byte
    # outside the views is untouched.
    g = torch.Generator().manual_seed(seed)
    total = sum(gap + torch.Size(shape).numel() for ranges in tickets for shape, gap, _ in ranges)
    flat = random_tensor((total,), dtype, g)
    expected = flat.clone()
    jobs, offset, nbytes = [], 0, 0
    for ranges in tickets:
        pairs = []
        for shape, gap, transposed in ranges:
            offset += gap
            n = torch.Size(shape).numel()
            src = random_tensor(shape[::-1], dtype, g).t() if transposed and len(shape) == 2 else random_tensor(shape, dtype, g)
            pairs.append((flat[offset : offset + n].view(shape), src))
            expected[offset : offset + n] = src.reshape(-1)
            offset += n
            nbytes += n * src.element_size()
        jobs.append(pairs)
    with closing(ThreadCopyEngine()) as engine:
        submitted = [engine.submit(pairs, urgent=u) for pairs, u in zip(jobs, urgent)]
        for ticket in submitted:
            engine.wait(ticket)
        for pairs in jobs:
            for dst, src in pairs:
                assert torch.equal(dst, src)
        assert torch.equal(flat, expected)
        stats = engine.current_stats()
        assert (stats.copies, stats.bytes, stats.waits) == (len(jobs), nbytes, len(jobs))
        assert sum(t.nbytes for t in submitted) == nbytes


def test_ticket_records_its_size_and_urgency():
    with closing(ThreadCopyEngine()) as engine:
        int8 = torch.ones(5, dtype=torch.int8)
        ticket = engine.submit([(torch.zeros(3, 2), torch.ones(3, 2)), (torch.zeros_like(int8), int8)], urgent=True)
        engine.wait(ticket)
        assert (ticket.nbytes, ticket.urgent, ticket.owner, ticket.error) == (3 * 2 * 4 + 5, True, engine, None)


# -- ordering ---------------------------------------------------------------------------------------


def test_urgent_job_overtakes_queued_prefetches_which_then_run_in_submission_order():
    log: list = []
    tickets: dict[str, Ticket] = {}
    with closing(ThreadCopyEngine(Link(gbps=0.1, latency_us=5_000))) as engine:
        gate = Gate()
        tickets["in_flight"] = engine.submit([(gate, torch.zeros(1))])
        assert gate.entered.wait(BOUND_S)  # the worker holds this job: everything below queues behind it
        recorders = {name: Recorder(name, log, tickets) for name in ("p1", "p2", "p3", "urgent")}
        for name in ("p1", "p2", "p3"):
            tickets[name] = engine.submit([(recorders[name], torch.full((4,), 1.0))])
        tickets["urgent"] = engine.submit([(recorders["urgent"], torch.full((4,), 2.0))], urgent=True)
        gate.opened.set()
        _, error = call_bounded(lambda: engine.wait(tickets["urgent"]))
        assert error is None
        for name in ("p1", "p2", "p3"):
            engine.wait(tickets[name])
    assert [name for name, _ in log] == ["urgent", "p1", "p2", "p3"]
    # When the urgent copy started, only the job already in flight had completed.
    assert log[0][1] == {"in_flight"}
    assert torch.equal(recorders["urgent"].tensor, torch.full((4,), 2.0))


def test_urgent_jobs_keep_their_submission_order_among_themselves():
    log: list = []
    tickets: dict[str, Ticket] = {}
    with closing(ThreadCopyEngine()) as engine:
        gate = Gate()
        engine.submit([(gate, torch.zeros(1))])
        assert gate.entered.wait(BOUND_S)
        for name, urgent in (("p1", False), ("u1", True), ("p2", False), ("u2", True), ("u3", True)):
            tickets[name] = engine.submit([(Recorder(name, log, tickets), torch.ones(4))], urgent=urgent)
        gate.opened.set()
        for ticket in tickets.values():
            engine.wait(ticket)
    assert [name for name, _ in log] == ["u1", "u2", "u3", "p1", "p2"]


# -- the emulated link ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gbps", "latency_us", "numel"),
    [(0.1, 0.0, 2**18), (1000.0, 20_000.0, 16), (0.2, 5_000.0, 2**17)],
    ids=["bandwidth-bound-1MB", "latency-bound", "both"],
)
def test_emulated_link_holds_each_copy_for_at_least_latency_plus_bytes_over_bandwidth(gbps, latency_us, numel):
    link = Link(gbps=gbps, latency_us=latency_us)
    n = 3
    srcs = [torch.full((numel,), float(i)) for i in range(n)]
    dsts = [torch.zeros(numel) for _ in range(n)]
    each_s = latency_us * 1e-6 + numel * 4 / (gbps * 1e9)  # the model, computed here, not by Link
    with closing(ThreadCopyEngine(link)) as engine:
        start = time.perf_counter()
        tickets = [engine.submit([(d, s)]) for d, s in zip(dsts, srcs)]
        for t in tickets:
            engine.wait(t)
        elapsed = time.perf_counter() - start
    # One link: the copies are held one after another, never overlapped.
    assert elapsed >= 0.9 * n * each_s
    assert all(torch.equal(d, s) for d, s in zip(dsts, srcs))


def test_a_1mb_copy_at_0_1_gbps_takes_at_least_9ms():
    with closing(ThreadCopyEngine(Link(gbps=0.1))) as engine:
        dst, src = torch.zeros(2**18), torch.ones(2**18)  # 1 MiB of float32
        start = time.perf_counter()
        engine.wait(engine.submit([(dst, src)]))
        assert time.perf_counter() - start >= 0.009
        assert torch.equal(dst, src)


def test_link_seconds_is_latency_plus_bytes_over_bandwidth():
    assert Link(gbps=2.0, latency_us=5.0).seconds(4 * 10**9) == pytest.approx(2.000005)
    assert Link(gbps=1.0).seconds(0) == 0.0


@given(gbps=st.floats(max_value=0.0, allow_nan=False), latency_us=st.floats(min_value=0.0, allow_nan=False, allow_infinity=False))
def test_link_with_non_positive_bandwidth_is_rejected(gbps, latency_us):
    with pytest.raises(ValueError, match="bandwidth must be > 0"):
        Link(gbps=gbps, latency_us=latency_us)


@given(gbps=st.floats(min_value=1e-6, max_value=1e6), latency_us=st.floats(max_value=-1e-9, allow_nan=False))
def test_link_with_negative_latency_is_rejected(gbps, latency_us):
    with pytest.raises(ValueError, match="latency ≥ 0"):
        Link(gbps=gbps, latency_us=latency_us)


# -- engine selection -------------------------------------------------------------------------------


@pytest.mark.parametrize("link", [None, Link(gbps=4.0, latency_us=10.0)])
def test_copy_engine_for_cpu_is_a_thread_engine_with_the_given_link(link):
    with closing(copy_engine_for(torch.device("cpu"), link)) as engine:
        assert isinstance(engine, ThreadCopyEngine)
        assert engine.link is link
        dst = torch.zeros(3)
        engine.wait(engine.submit([(dst, torch.arange(3.0))]))
        assert torch.equal(dst, torch.arange(3.0))


def test_copy_engine_for_cuda_refuses_an_emulated_link():
    with pytest.raises(ValueError, match="emulated link is for CPU runs"):
        copy_engine_for(torch.device("cuda"), Link(gbps=1.0))


def test_cpu_fence_is_none():
    with closing(ThreadCopyEngine()) as engine:
        assert engine.fence() is None


# -- tickets, close ---------------------------------------------------------------------------------


def test_waiting_for_another_engines_ticket_raises_value_error():
    with closing(ThreadCopyEngine()) as a, closing(ThreadCopyEngine()) as b:
        dst = torch.zeros(2)
        ticket = a.submit([(dst, torch.ones(2))])
        with pytest.raises(ValueError, match="did not issue"):
            b.wait(ticket)
        assert b.current_stats().waits == 0
        a.wait(ticket)  # its own engine still can
        assert torch.equal(dst, torch.ones(2))


def test_close_drops_queued_jobs_and_returns_promptly_even_on_a_slow_link():
    # At 1 kB/s each 8 MB job would hold the link for hours: close must not wait for them.
    before = set(threading.enumerate())
    engine = ThreadCopyEngine(Link(gbps=1e-6))
    workers = new_threads(before)
    assert len(workers) == 1
    srcs = [torch.full((2**21,), float(i)) for i in range(5)]
    dsts = [torch.zeros(2**21) for _ in srcs]
    tickets = [engine.submit([(d, s)], urgent=i == 3) for i, (d, s) in enumerate(zip(dsts, srcs))]
    start = time.perf_counter()
    _, error = call_bounded(engine.close)
    assert error is None
    assert time.perf_counter() - start < 2.0
    assert not any(w.is_alive() for w in workers)
    assert all(t.done.is_set() for t in tickets)
    # The job the worker had taken, if any, was copied (its emulated hold cut short); the rest never ran.
    assert sum(not t.cancelled for t in tickets) <= 1
    for ticket, dst, src in zip(tickets, dsts, srcs):
        if ticket.cancelled:
            assert torch.equal(dst, torch.zeros_like(dst))
            assert not engine.landed(ticket)
            with pytest.raises(CopyError, match="copying 8388608 bytes failed: not run: the copy engine was closed first"):
                engine.wait(ticket)
        else:
            assert torch.equal(dst, src)
            engine.wait(ticket)  # a finished ticket can still be waited for after close


def test_close_after_every_ticket_was_waited_for_keeps_every_copy_and_stat():
    with closing(ThreadCopyEngine(Link(gbps=1.0, latency_us=2_000))) as engine:
        srcs = [torch.full((8,), float(i)) for i in range(4)]
        dsts = [torch.zeros(8) for _ in srcs]
        tickets = [engine.submit([(d, s)], urgent=i == 2) for i, (d, s) in enumerate(zip(dsts, srcs))]
        for t in tickets:
            engine.wait(t)
    assert all(torch.equal(d, s) for d, s in zip(dsts, srcs))
    stats = engine.current_stats()
    assert (stats.copies, stats.bytes, stats.waits) == (4, 4 * 32, 4)
    assert not any(t.cancelled or t.error for t in tickets)


def test_the_finalizer_running_in_the_worker_thread_stops_the_queue_without_joining_itself():
    # When the worker drops a finished job it may drop the last reference to the engine (a ticket's
    # owner): the engine's finalizer then runs in the worker thread, where a join would raise
    # "cannot join current thread".
    from moepic.runtime import copy_engine

    outcome: list = []
    queue = copy_engine._LinkQueue(None, copy_engine.CopyStats())

    def worker_body():
        try:
            copy_engine._stop(queue, threading.current_thread())
            outcome.append("returned")
        except BaseException as e:  # handed to the test
            outcome.append(e)

    worker = threading.Thread(target=worker_body, daemon=True)
    worker.start()
    worker.join(BOUND_S)
    assert not worker.is_alive()
    assert outcome == ["returned"]
    assert queue.closed


def test_close_ends_the_worker_even_after_a_lost_wake_up():
    # What a KeyboardInterrupt inside Condition.notify() leaves behind: a stale waiter at the head of
    # the condition's list, which a plain notify() would wake instead of the worker.
    engine = ThreadCopyEngine()
    worker = engine._worker
    deadline = time.monotonic() + BOUND_S
    while not engine._queue.wake._waiters and time.monotonic() < deadline:  # the worker waits for work
        time.sleep(0.01)
    with engine._queue.wake:
        stale = threading.Lock()
        stale.acquire()
        engine._queue.wake._waiters.appendleft(stale)
    _, error = call_bounded(engine.close, timeout=5.0)
    assert error is None
    assert not worker.is_alive()


@pytest.mark.parametrize("kind", ["urgent", "prefetch"])
def test_an_emulated_copy_in_progress_stops_holding_the_link_on_close(kind):
    with closing(ThreadCopyEngine(Link(gbps=1e-6))) as engine:  # 1 kB/s
        dst = torch.zeros(2**16)
        ticket = engine.submit([(dst, torch.ones(2**16))], urgent=kind == "urgent")  # 256 kB: ~4 minutes held
        deadline = time.monotonic() + BOUND_S
        while engine._queue.jobs or engine._queue.urgent:  # the worker has taken it
            assert time.monotonic() < deadline
            time.sleep(0.01)
        start = time.perf_counter()
        _, error = call_bounded(engine.close)
        assert error is None and time.perf_counter() - start < 2.0
    assert ticket.done.is_set() and not ticket.cancelled and ticket.error is None
    assert torch.equal(dst, torch.ones(2**16))


def test_submit_after_close_raises_copy_error_and_close_is_idempotent():
    engine = ThreadCopyEngine()
    engine.close()
    with pytest.raises(CopyError, match="closed"):
        engine.submit([(torch.zeros(2), torch.ones(2))])
    engine.close()


def test_wait_raises_instead_of_hanging_when_the_worker_is_gone():
    # The only way to hold a ticket the worker will never run: one it never received (the public
    # Ticket class, built by hand) on an engine whose worker has stopped.
    engine = ThreadCopyEngine()
    engine.close()
    orphan = Ticket(nbytes=8, urgent=False, owner=engine)
    _, error = call_bounded(lambda: engine.wait(orphan))
    assert isinstance(error, CopyError)
    assert "worker died" in str(error)


# -- failures ---------------------------------------------------------------------------------------


def test_failed_copy_surfaces_from_wait_as_copy_error_naming_its_bytes_and_refuses_later_work():
    with closing(ThreadCopyEngine(Link(gbps=1.0, latency_us=1_000))) as engine:
        gate = Gate()
        engine.submit([(gate, torch.zeros(1))])
        assert gate.entered.wait(BOUND_S)
        ok_dst = torch.zeros(3)
        # 12 + 12 bytes, the second range's copy raises; urgent, so it runs before both jobs queued after it.
        bad = engine.submit([(ok_dst, torch.ones(3)), (torch.zeros(3), torch.ones(3).as_subclass(ExplodingSource))], urgent=True)
        behind = [torch.zeros(4), torch.zeros(4)]
        queued = [engine.submit([(behind[0], torch.ones(4))]), engine.submit([(behind[1], torch.ones(4))], urgent=True)]
        gate.opened.set()

        _, error = call_bounded(lambda: engine.wait(bad))
        assert isinstance(error, CopyError)
        assert "copying 24 bytes failed" in str(error)
        assert isinstance(error.__cause__, OSError)
        assert bad.done.is_set() and bad.error is error.__cause__

        for ticket in queued:  # queued behind the failure: completed with an error, never run
            _, error = call_bounded(lambda t=ticket: engine.wait(t))
            assert isinstance(error, CopyError)
            assert "copying 16 bytes failed" in str(error) and "an earlier copy failed" in str(error)
        assert all(torch.equal(b, torch.zeros(4)) for b in behind)

        with pytest.raises(CopyError, match="stopped after a failed copy"):
            engine.submit([(torch.zeros(1), torch.ones(1))])
        stats = engine.current_stats()
        assert (stats.copies, stats.bytes) == (1, 4)  # only the gate job succeeded
    assert all(t.done.is_set() for t in [bad, *queued])


class ExplodingSource(torch.Tensor):
    """A source tensor whose copy raises inside the worker."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.copy_:
            raise OSError("host page vanished")
        return super().__torch_function__(func, types, args, kwargs or {})


def test_a_source_whose_copy_raises_fails_its_ticket_without_hanging():
    src = torch.ones(5, dtype=torch.float64).as_subclass(ExplodingSource)
    with closing(ThreadCopyEngine()) as engine:
        ticket = engine.submit([(torch.zeros(5, dtype=torch.float64), src)])
        _, error = call_bounded(lambda: engine.wait(ticket))
        assert isinstance(error, CopyError)
        assert "copying 40 bytes failed" in str(error) and "host page vanished" in str(error)
        with pytest.raises(CopyError):
            engine.submit([(torch.zeros(1), torch.ones(1))])


# -- exposed time -----------------------------------------------------------------------------------


def test_exposed_time_grows_by_the_wait_for_a_slow_copy_and_counts_as_decode_only_in_decode():
    link_s = 0.06
    with closing(ThreadCopyEngine(Link(gbps=1.0, latency_us=link_s * 1e6))) as engine:
        stats = engine.current_stats()
        for phase in ("prefill", "decode", "prefill"):
            engine.set_phase(phase)
            exposed, decode = stats.exposed_s, stats.decode_exposed_s
            submitted = time.perf_counter()
            ticket = engine.submit([(torch.zeros(4), torch.ones(4))])
            start = time.perf_counter()
            engine.wait(ticket)
            end = time.perf_counter()
            grown = engine.current_stats().exposed_s - exposed
            # The copy cannot finish before submitted + link_s, so waiting started at `start` took at
            # least the rest of it (20 ms slack for the thread being descheduled); and it is measured
            # inside the wait, so never more than the wall time around it.
            assert grown >= link_s - (start - submitted) - 0.02
            assert grown <= end - start
            if phase == "decode":
                assert stats.decode_exposed_s - decode == pytest.approx(grown)
            else:
                assert stats.decode_exposed_s == decode
        assert stats.waits == 3
        assert stats.decode_exposed_s > 0


# -- interleavings (stateful) -----------------------------------------------------------------------


class Interleavings(RuleBasedStateMachine):
    """Random submit (urgent or not) / wait over a few equal-size buffers, under the staging discipline
    (a buffer is written again only after the copy into it was waited for)."""

    SIZE = 16

    def __init__(self) -> None:
        super().__init__()
        self.engine = ThreadCopyEngine(Link(gbps=1.0, latency_us=200))
        self.buffers = [torch.full((self.SIZE,), -1.0, dtype=torch.float64) for _ in range(4)]
        self.settled = [b.clone() for b in self.buffers]  # what each idle buffer must hold
        self.in_flight: list[tuple[Ticket, list[tuple[int, slice, torch.Tensor]]]] = []
        self.all_tickets: list[Ticket] = []
        self.serial = 0

    def busy(self) -> set[int]:
        return {i for _, parts in self.in_flight for i, _, _ in parts}

    @precondition(lambda self: len(self.busy()) < len(self.buffers))
    @rule(data=st.data(), urgent=st.booleans())
    def submit(self, data, urgent):
        free = [i for i in range(len(self.buffers)) if i not in self.busy()]
        targets = data.draw(st.lists(st.sampled_from(free), min_size=1, max_size=2, unique=True), label="buffers")
        parts, ranges = [], []
        for i in targets:
            a = data.draw(st.integers(0, self.SIZE - 1), label="start")
            b = data.draw(st.integers(a + 1, self.SIZE), label="end")
            self.serial += 1
            src = torch.arange(b - a, dtype=torch.float64) + 1000.0 * self.serial  # unique to this copy
            parts.append((i, slice(a, b), src))
            ranges.append((self.buffers[i][a:b], src))
        ticket = self.engine.submit(ranges, urgent=urgent)
        self.in_flight.append((ticket, parts))
        self.all_tickets.append(ticket)

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data())
    def wait(self, data):
        ticket, parts = self.in_flight.pop(data.draw(st.integers(0, len(self.in_flight) - 1), label="which"))
        self.engine.wait(ticket)
        for i, where, src in parts:
            assert torch.equal(self.buffers[i][where], src), f"copy {where} into buffer {i} lost or misdirected"
            self.settled[i][where] = src

    @invariant()
    def idle_buffers_are_never_touched(self):
        for i in set(range(len(self.buffers))) - self.busy():
            assert torch.equal(self.buffers[i], self.settled[i])

    def teardown(self):
        self.engine.close()
        assert all(t.done.is_set() for t in self.all_tickets)
        pending = {id(t) for t, _ in self.in_flight}
        assert all(t.error is None and not t.cancelled for t in self.all_tickets if id(t) not in pending)
        assert self.engine.current_stats().copies == sum(not t.cancelled for t in self.all_tickets)
        for ticket, parts in self.in_flight:  # never waited for: close let them finish or dropped them whole
            for i, where, src in parts:
                if ticket.cancelled:
                    assert isinstance(ticket.error, CopyError)
                    assert torch.equal(self.buffers[i][where], self.settled[i][where])
                else:
                    assert ticket.error is None and torch.equal(self.buffers[i][where], src)


Interleavings.TestCase.settings = settings(stateful_step_count=25)
TestInterleavings = Interleavings.TestCase


# -- lifetime ---------------------------------------------------------------------------------------


def test_a_dropped_engine_stops_its_worker_thread():
    before = set(threading.enumerate())
    count = threading.active_count()

    def use_and_drop() -> set:
        engine = ThreadCopyEngine(Link(gbps=1.0, latency_us=100))
        dst = torch.zeros(4)
        engine.wait(engine.submit([(dst, torch.ones(4))]))
        assert torch.equal(dst, torch.ones(4))
        return new_threads(before)  # `engine` and its ticket go out of scope here: no close

    workers = use_and_drop()
    assert len(workers) == 1
    gc.collect()
    deadline = time.monotonic() + 1.0
    while any(w.is_alive() for w in workers) and time.monotonic() < deadline:
        time.sleep(0.01)
        gc.collect()
    assert not any(w.is_alive() for w in workers)
    assert threading.active_count() <= count


def test_a_range_whose_shapes_differ_is_refused_at_submit_instead_of_broadcasting():
    with closing(ThreadCopyEngine()) as engine:
        with pytest.raises(ValueError, match=r"destination shape \(3, 3\) differs from source \(3,\)"):
            engine.submit([(torch.zeros(3, 3), torch.ones(3))])
        with pytest.raises(ValueError, match="differs from source"):
            engine.submit([(torch.zeros(2), torch.ones(3))])


def test_a_queued_prefetch_can_be_withdrawn_and_then_never_copies():
    with closing(ThreadCopyEngine()) as engine:
        gate = Gate()
        running = engine.submit([(gate, torch.zeros(1))])
        assert gate.entered.wait(BOUND_S)
        dst = torch.zeros(4)
        queued = engine.submit([(dst, torch.ones(4))])
        assert engine.cancel(queued) and queued.cancelled and queued.done.is_set()
        assert not engine.cancel(running)  # started: it runs to the end
        with pytest.raises(ValueError, match="cancelled"):
            engine.wait(queued)
        gate.opened.set()
        engine.wait(running)
    assert torch.equal(dst, torch.zeros(4)) and engine.current_stats().copies == 1


def test_waiting_for_a_queued_prefetch_moves_it_ahead_of_the_other_prefetches():
    log, tickets = [], {}
    with closing(ThreadCopyEngine()) as engine:
        gate = Gate()
        engine.submit([(gate, torch.zeros(1))])
        assert gate.entered.wait(BOUND_S)
        for name in ("a", "b", "c"):
            tickets[name] = engine.submit([(Recorder(name, log, tickets), torch.ones(4))])
        waiter = threading.Thread(target=engine.wait, args=(tickets["c"],))
        waiter.start()
        time.sleep(0.05)  # let the wait promote "c" before the gate opens
        gate.opened.set()
        waiter.join(BOUND_S)
        for t in tickets.values():
            engine.wait(t)
    assert [entry[0] for entry in log][:1] == ["c"]
