"""runtime/copy_protocol.py: both copy engines implement the one `CopyEngine` protocol with its exact
signatures, a ticket's `done` means what the protocol says in each (the CUDA engine run here over fake
streams and events), and the offloading engine uses nothing of its copy engine but the protocol."""

from __future__ import annotations

import ast
import contextlib
import inspect
import threading
from contextlib import closing
from pathlib import Path

import pytest
import torch

from moepic.runtime import offload
from moepic.runtime.copy_cuda import CudaCopyEngine
from moepic.runtime.copy_engine import Link, ThreadCopyEngine
from moepic.runtime.copy_protocol import CopyEngine, CopyError

PROTOCOL_METHODS = sorted(name for name, member in vars(CopyEngine).items() if inspect.isfunction(member) and not name.startswith("_"))
ENGINES = [ThreadCopyEngine, CudaCopyEngine]


def _parameters(function) -> list[tuple[str, inspect._ParameterKind, object]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


def test_the_protocol_has_the_methods_the_offloading_engine_needs():
    assert PROTOCOL_METHODS == ["cancel", "close", "current_stats", "fence", "landed", "set_phase", "settle", "submit", "wait"]


@pytest.mark.parametrize("engine", ENGINES, ids=lambda cls: cls.__name__)
@pytest.mark.parametrize("method", PROTOCOL_METHODS)
def test_each_engine_defines_every_protocol_method_with_the_protocols_parameters(engine, method):
    assert CopyEngine in engine.__mro__  # declared, not duck-typed
    assert method in vars(engine), f"{engine.__name__} inherits the protocol's empty {method}"
    assert _parameters(vars(engine)[method]) == _parameters(getattr(CopyEngine, method))


def test_the_offloading_engine_uses_only_the_protocol_of_its_copy_engine():
    tree = ast.parse(Path(offload.__file__).read_text())
    used = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Attribute) and node.value.attr == "copies"
        and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"
    }
    assert used and used <= set(PROTOCOL_METHODS), sorted(used - set(PROTOCOL_METHODS))


# -- `done` on the CPU: set once the worker has copied, failed or dropped the copy --------------------


def held_source(values: torch.Tensor, started: threading.Event, release: threading.Event) -> torch.Tensor:
    """`values` as a source whose copy, once the worker starts it, waits for `release`."""

    class Held(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if func is torch.Tensor.copy_:
                started.set()
                release.wait(10)
            return super().__torch_function__(func, types, args, kwargs or {})

    return values.as_subclass(Held)


def test_cpu_ticket_is_done_only_once_the_worker_has_copied_it_and_then_it_has_landed():
    started, release = threading.Event(), threading.Event()
    with closing(ThreadCopyEngine()) as engine:
        dst = torch.zeros(4)
        ticket = engine.submit([(dst, held_source(torch.arange(4.0), started, release))])
        assert started.wait(10)
        assert not ticket.done.is_set() and not engine.landed(ticket)  # in progress
        release.set()
        assert ticket.done.wait(10)
        assert engine.landed(ticket) and ticket.error is None and not ticket.cancelled
        assert torch.equal(dst, torch.arange(4.0))
        engine.wait(ticket)


def test_cpu_ticket_withdrawn_or_dropped_is_done_cancelled_and_never_lands():
    started, release = threading.Event(), threading.Event()
    engine = ThreadCopyEngine(Link(gbps=1e-6))  # each copy then holds the link for hours
    try:
        first = engine.submit([(torch.zeros(4), held_source(torch.ones(4), started, release))])
        assert started.wait(10)  # the worker has taken it: the next ones queue behind it
        withdrawn = engine.submit([(torch.zeros(4), torch.ones(4))])
        dropped = engine.submit([(torch.zeros(4), torch.ones(4))])
        assert engine.cancel(withdrawn)
        assert withdrawn.done.is_set() and withdrawn.cancelled and withdrawn.error is None
        assert not engine.landed(withdrawn) and not dropped.done.is_set()
        release.set()
    finally:
        engine.close()
    assert dropped.done.is_set() and dropped.cancelled and isinstance(dropped.error, CopyError)
    assert not engine.landed(dropped)
    assert first.done.is_set() and engine.landed(first)  # copied; close cut its emulated hold short


def test_cpu_ticket_of_a_failed_copy_is_done_with_its_error_and_never_lands():
    class Broken(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if func is torch.Tensor.copy_:
                raise RuntimeError("bad page")
            return super().__torch_function__(func, types, args, kwargs or {})

    with closing(ThreadCopyEngine()) as engine:
        ticket = engine.submit([(torch.zeros(2), torch.ones(2).as_subclass(Broken))])
        assert ticket.done.wait(10)
        assert isinstance(ticket.error, RuntimeError) and not ticket.cancelled and not engine.landed(ticket)
        with pytest.raises(CopyError, match="bad page"):
            engine.wait(ticket)


# -- `done` on CUDA: set once the copies are issued; landing is the device's ---------------------------


class FakeEvent:
    def __init__(self, enable_timing: bool = False) -> None:
        self.finished = False
        self.recorded_on = None

    def record(self, stream=None) -> None:
        self.recorded_on = stream

    def query(self) -> bool:
        return self.finished

    def elapsed_time(self, end: FakeEvent) -> float:
        return 2.0  # ms


class FakeStream:
    def __init__(self, device=None, priority: int = 0) -> None:
        self.priority = priority
        self.waited_on: list = []

    def wait_event(self, event) -> None:
        self.waited_on.append(event)


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda's streams and events replaced by fakes: copies of CPU tensors run at once, events
    finish when the test says so."""
    compute = FakeStream()
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    return compute


def test_cuda_ticket_is_done_once_issued_and_lands_when_its_event_has_finished(fake_cuda):
    engine = CudaCopyEngine(torch.device("cuda"))
    dst = torch.zeros(3)
    ticket = engine.submit([(dst, torch.ones(3))], urgent=True)
    assert ticket.done.is_set() and ticket.error is None and not ticket.cancelled
    assert not engine.landed(ticket)  # issued, not finished: `done` does not say it arrived
    ticket.event.finished = True
    assert engine.landed(ticket)
    engine.wait(ticket)
    assert fake_cuda.waited_on == [ticket.event]  # the compute stream waits; the host did not
    assert not engine.cancel(ticket) and not ticket.cancelled


def test_cuda_stall_time_counts_as_decode_only_after_set_phase_decode(fake_cuda):
    engine = CudaCopyEngine(torch.device("cuda"))
    for phase in ("prefill", "decode", "decode"):
        engine.set_phase(phase)
        engine.wait(engine.submit([(torch.zeros(1), torch.ones(1))]))
    stats = engine.current_stats()
    assert stats.waits == 3
    assert stats.exposed_s == pytest.approx(3 * 2e-3)  # FakeEvent: 2 ms each
    assert stats.decode_exposed_s == pytest.approx(2 * 2e-3)
