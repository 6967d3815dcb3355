"""runtime/staging.py: a fixed pool of whole-expert buffers handed out FIFO and taken back once, whose
expert views alias the flat buffer, and whose next user first settles a copy still landing in it
(unit + property)."""

from __future__ import annotations

import threading
from collections import deque
from contextlib import closing

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moepic.core.weights import SwiGLUWeights
from moepic.runtime.copy_engine import Link, ThreadCopyEngine
from moepic.runtime.copy_protocol import Ticket
from moepic.runtime.staging import StagingPool

F, B, D = 8, 4, 6  # ffn size, neuron block, hidden


def pool(count: int = 3, dtype: torch.dtype = torch.float32) -> StagingPool:
    like = SwiGLUWeights(torch.zeros(F // B, 2, B, D, dtype=dtype), torch.zeros(F, D, dtype=dtype))
    return StagingPool(count, {0: like}, torch.device("cpu"))


def no_wait(ticket):
    raise AssertionError(f"wait_for_copy called for {ticket} though no copy was pending")


def test_acquire_hands_out_distinct_buffers_until_all_are_taken_then_raises_naming_the_count():
    p = pool(3)
    taken = [p.acquire(no_wait) for _ in range(3)]
    assert [b.index for b in taken] == [0, 1, 2]
    assert len({id(b) for b in taken}) == 3
    assert (p.free, p.in_use, p.peak_in_use) == (0, 3, 3)
    with pytest.raises(RuntimeError, match="all 3 staging buffers are in use"):
        p.acquire(no_wait)
    assert (p.free, p.in_use) == (0, 3)


def test_released_buffers_come_back_in_fifo_order():
    p = pool(3)
    a, b, c = (p.acquire(no_wait) for _ in range(3))
    p.release(c)
    p.release(a)
    assert p.acquire(no_wait) is c
    p.release(b)
    assert [p.acquire(no_wait), p.acquire(no_wait)] == [a, b]
    # Free ones queue behind those never taken: buffer 1 released goes after buffer 2.
    q = pool(3)
    first, second = q.acquire(no_wait), q.acquire(no_wait)
    q.release(first)
    assert [q.acquire(no_wait).index, q.acquire(no_wait).index] == [2, 0]
    assert second.index == 1


def test_releasing_a_buffer_twice_raises_and_leaves_the_pool_unchanged():
    p = pool(2)
    a = p.acquire(no_wait)
    p.release(a)
    with pytest.raises(RuntimeError, match="staging buffer 0 released twice"):
        p.release(a)
    assert (p.free, p.in_use) == (2, 0)
    with pytest.raises(RuntimeError, match="staging buffer 1 released twice"):
        p.release(p.buffers[1])  # never acquired: it is free already
    assert [p.acquire(no_wait), p.acquire(no_wait)] == [p.buffers[1], a]
    with pytest.raises(RuntimeError, match="all 2"):
        p.acquire(no_wait)


OPS = st.tuples(st.sampled_from(["acquire", "release", "release_free"]), st.integers(0, 99))


@given(count=st.integers(1, 5), ops=st.lists(OPS, max_size=40))
def test_pool_matches_a_fifo_model_and_peak_tracks_the_most_in_use(count, ops):
    p = pool(count)
    free, held, peak = deque(range(count)), [], 0
    for op, pick in ops:
        if op == "acquire":
            if not free:
                with pytest.raises(RuntimeError, match=f"all {count} staging buffers are in use"):
                    p.acquire(no_wait)
            else:
                buffer = p.acquire(no_wait)
                assert buffer.index == free.popleft()
                held.append(buffer.index)
        elif op == "release" and held:
            index = held.pop(pick % len(held))
            p.release(p.buffers[index])
            free.append(index)
        elif op == "release_free" and free:
            with pytest.raises(RuntimeError, match="released twice"):
                p.release(p.buffers[free[pick % len(free)]])
        peak = max(peak, len(held))
        assert (p.free, p.in_use, p.peak_in_use) == (len(free), len(held), peak)
    assert sorted([*free, *held]) == list(range(count))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_expert_views_are_views_into_flat_in_the_compute_layout(dtype):
    p = pool(2, dtype)
    for buffer in p.buffers:
        gate_up, down = buffer.expert(0).gate_up_N2BD, buffer.expert(0).down_FD
        assert buffer.flat.shape == (3 * F * D * dtype.itemsize,) and buffer.flat.dtype == torch.uint8
        flat = buffer.flat.view(dtype)  # the bytes as the expert's numbers
        assert gate_up.shape == (F // B, 2, B, D) and down.shape == (F, D)
        assert (buffer.expert(0).block, buffer.expert(0).ffn_size) == (B, F)
        # Writing the flat buffer shows in the views, and writing the views shows in the flat buffer.
        flat.copy_(torch.arange(3 * F * D).to(dtype))
        assert torch.equal(gate_up.reshape(-1), flat[: 2 * F * D])
        assert torch.equal(down.reshape(-1), flat[2 * F * D :])
        gate_up.fill_(-1)
        down.fill_(-2)
        expected = torch.cat([torch.full((2 * F * D,), -1, dtype=dtype), torch.full((F * D,), -2, dtype=dtype)])
        assert torch.equal(flat, expected)
    # Buffers do not share memory.
    a, b = p.buffers
    a.flat.view(dtype).fill_(1)
    b.flat.view(dtype).fill_(2)
    assert torch.all(a.flat.view(dtype) == 1) and torch.all(a.expert(0).down_FD == 1)


def test_a_pending_copy_is_settled_by_the_next_acquire_of_that_buffer_and_only_then():
    p = pool(3)
    a, b, c = (p.acquire(no_wait) for _ in range(3))
    ticket = Ticket(nbytes=1, urgent=False, owner=None)
    calls = []

    def wait_for_copy(t):
        calls.append((t, p.in_use))  # in_use not yet counted: called before the buffer is handed out

    p.release(b, pending=ticket)
    p.release(a)
    assert calls == []  # release does not wait
    assert p.acquire(wait_for_copy) is b
    assert calls == [(ticket, 1)] and calls[0][0] is ticket
    assert b.pending is None
    assert p.acquire(wait_for_copy) is a
    assert len(calls) == 1  # a had nothing pending
    p.release(b)
    p.release(c)
    assert p.acquire(wait_for_copy) is b  # settled once: not waited for again
    assert p.acquire(wait_for_copy) is c
    assert len(calls) == 1


def test_release_records_the_fence():
    p = pool(1)
    a = p.acquire(no_wait)
    fence = object()
    p.release(a, fence=fence)
    assert a.fence is fence and a.pending is None


def test_acquire_of_a_buffer_a_dropped_prefetch_still_writes_waits_for_that_copy_to_land():
    # A gate holds the copy worker so the prefetch into the buffer cannot have run when it is
    # released; acquire must block on engine.wait until the gate opens and the copy lands.
    class Gate:
        shape = torch.Size([1])

        def __init__(self) -> None:
            self.entered, self.opened = threading.Event(), threading.Event()

        def copy_(self, src) -> None:
            self.entered.set()
            self.opened.wait(timeout=10)

    p = pool(1)
    with closing(ThreadCopyEngine(Link(gbps=1.0, latency_us=1_000))) as engine:
        gate = Gate()
        engine.submit([(gate, torch.zeros(1))])
        assert gate.entered.wait(10)
        buffer = p.acquire(engine.wait)
        src = torch.arange(3 * F * D, dtype=torch.float32)
        ticket = engine.submit([(buffer.flat.view(torch.float32), src)])
        p.release(buffer, pending=ticket)  # a wasted prefetch: nobody waited for it
        assert not ticket.done.is_set()
        opener = threading.Timer(0.05, gate.opened.set)
        opener.start()
        try:
            again = p.acquire(engine.wait)
        finally:
            opener.join()
        assert again is buffer
        assert ticket.done.is_set()
        assert torch.equal(buffer.flat.view(torch.float32), src)
        assert engine.current_stats().waits == 1
