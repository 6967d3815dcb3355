"""What the process does on Ctrl-C and SIGTERM. Side effects: signal handlers, signal masks, a
watchdog thread, and (only as a last resort) ending the process.

    while starting      ─▶ the process ends at once, with one line (nothing has started to clean up)
    1st SIGINT / SIGTERM ─▶ KeyboardInterrupt (Terminated for SIGTERM) raised in the main thread
                            │  the run unwinds through its `finally` blocks: temporary files go,
                            │  copy workers and worker processes are stopped, queued work is dropped;
                            │  the program prints one line and `leave`s: the atexit handlers run
                            │  (worker processes' semaphores, ...), then os._exit skips the rest of
                            │  the interpreter's teardown (seconds with torch loaded, for nothing)
                            └▶ watchdog: if the process is still alive GRACE_S later, it ends it
    2nd signal          ─▶ the process ends at once (os._exit), without unwinding further

So a user never waits on a hung Ctrl-C, and the common case still cleans up after itself. Exit
codes follow the shell's convention, 128 + the signal: 130 for SIGINT, 143 for SIGTERM.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
import time
import typing
from collections.abc import Iterator

GRACE_S = 3.0  # unwinding longer than this after a signal is a hang: end the process
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every `except KeyboardInterrupt` cleanup runs for it too."""


_received: int | None = None  # the first signal this process got, once it got one
_deferred: list[int] | None = None  # inside signals_blocked: the signals that came meanwhile


def interruption(error: BaseException) -> int | None:
    """The exit code if `error` ends the run because of an interrupt, else None: a KeyboardInterrupt,
    or any error raised once a signal came (C extensions turn a KeyboardInterrupt raised inside them
    into errors of their own: safetensors' ValueError, say; and a cancelled copy fails its waiter)."""
    if _received is not None and isinstance(error, (Exception, KeyboardInterrupt)):
        return 128 + _received
    if isinstance(error, KeyboardInterrupt):
        return 128 + (signal.SIGTERM if isinstance(error, Terminated) else signal.SIGINT)
    return None


def message(code: int) -> str:
    """The line for an interrupt's exit code."""
    return "terminated" if code == 128 + signal.SIGTERM else "interrupted"


def _end_now(code: int) -> None:
    with contextlib.suppress(Exception):  # the main thread may be mid-write on these very streams
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def _watchdog(code: int) -> None:
    time.sleep(GRACE_S)
    _end_now(code)


def _on_signal(signum: int, frame) -> None:
    global _received
    if _deferred is not None:  # workers are being started (signals_blocked): act once they are
        _deferred.append(signum)
        return
    code = 128 + signum
    if _received is not None:  # a second signal: the user wants out now, cleanup or not
        _end_now(code)
    _received = signum
    threading.Thread(target=_watchdog, args=(code,), name="moepic-exit-watchdog", daemon=True).start()
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def leave(code: int) -> None:
    """After a signal, end the process now, with `code`; without one (a KeyboardInterrupt raised by
    other means, as in tests), return and let the caller exit normally."""
    if _received is not None:
        finish(code)


def finish(code: int) -> typing.NoReturn:
    """End a program that is done: its atexit handlers (worker pools, W&B, ...), flushed streams, then
    os._exit. The interpreter's own teardown is skipped: seconds with torch loaded, and a window in
    which Python has put the default handlers back, so that a Ctrl-C landing there killed the
    process without a word (exit -2 instead of its code)."""
    with contextlib.suppress(BaseException):  # a signal meanwhile ends the process itself, with one line
        atexit._run_exitfuncs()
    _end_now(code)


def install() -> None:
    """Handle SIGINT and SIGTERM as above from now on (main thread only: elsewhere a no-op)."""
    if threading.current_thread() is threading.main_thread():
        for signum in SIGNALS:
            signal.signal(signum, _on_signal)


def install_early(prefix: str = "moepic: ") -> None:
    """For a program's first lines, before its slow imports (torch: seconds): a signal while they
    load ends the process at once with one line, instead of a KeyboardInterrupt traceback from
    inside an import. `handled()` takes over for the work itself."""

    def on_signal_while_starting(signum: int, frame) -> None:
        with contextlib.suppress(Exception):
            sys.stderr.write(f"{prefix}{'terminated' if signum == signal.SIGTERM else 'interrupted'}\n")
        _end_now(128 + signum)

    for signum in SIGNALS:
        signal.signal(signum, on_signal_while_starting)


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """`install()` for the length of a command, then the previous handlers again, unless a signal
    came: then ours stay, so a second Ctrl-C while the process exits still ends it at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
    install()
    try:
        yield
    finally:
        if _received is None:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


@contextlib.contextmanager
def signals_blocked() -> Iterator[None]:
    """While this thread starts worker processes: SIGINT and SIGTERM are blocked in it, so a child
    inherits the mask and a Ctrl-C sent to the whole process group (what a terminal does) cannot hit
    it while it imports, before `ignore_signals_in_worker` ran; and this process's own handler (see
    `handled`) holds its reaction until the block ends. A KeyboardInterrupt raised mid-start would
    leave a child with its start-up data half written, to fail reading it and print a traceback of
    its own. The first signal that came meanwhile is acted on at the end (the starts are short)."""
    global _deferred
    _deferred = []
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        came, _deferred = _deferred, None
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if came:
            _on_signal(came[0], None)


def ignore_signals_in_worker() -> None:
    """A worker process's initializer: its parent decides when it stops (and kills it), so a Ctrl-C
    to the process group must not raise a KeyboardInterrupt (and print its traceback) in here."""
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
