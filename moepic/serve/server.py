"""Running the server until Ctrl-C or SIGTERM, which drain it: uvicorn's event loop in a thread,
the worker (the model's steps) on the main thread. Side effects: a socket, a thread, signal handlers.

    1st SIGINT / SIGTERM ─▶ the listening socket closes; requests in flight finish (their streams
                            too) for up to `drain_s`, then are cancelled; the worker stops after
                            the HTTP side has; the process exits 0
    2nd signal           ─▶ stop now: requests in flight are cancelled (still exit 0: nothing is
                            lost that the clients did not see end)

Why the model on the main thread: torch's OpenMP team belongs to the thread that first used it
(the one that loaded the model); a second thread's team on the same cores waits on sleeping
workers at every small op (serve/worker.py). Why not uvicorn's own signal handling (it handles none
off the main thread anyway): it re-raises a signal once it has shut down, which would end a cleanly
drained server with 130 or 143; here the drain is a server's normal end.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
import threading

import uvicorn

from moepic.errors import ConfigError
from moepic.serve.worker import ServeWorker


def listening_socket(bind: str, port: int) -> socket.socket:
    """A socket bound to `bind`:`port` (0: any free port), or a ConfigError saying why not."""
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((bind, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"serve.bind/serve.port: cannot listen on {bind}:{port} ({e.strerror or e})") from None
    sock.listen(2048)
    return sock


def url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve_until_signalled(app, sock: socket.socket, worker: ServeWorker, *, drain_s: float) -> None:
    """Serve `app` on `sock` while `worker` steps on this thread, until a signal drains both (see
    the module's docstring). Call it from the main thread."""
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=max(drain_s, 0.001))
    server = uvicorn.Server(config)  # in a thread: it installs no signal handlers of its own

    def http() -> None:
        try:
            asyncio.run(server.serve(sockets=[sock]))
        finally:
            worker.request_stop()  # the HTTP side is done: nobody waits for another token

    thread = threading.Thread(target=http, name="moepic-serve-http", daemon=True)
    with _drain_on_signals(server):
        thread.start()
        try:
            worker.run()
        finally:
            server.should_exit = True  # the worker ended on its own (a bug): take the HTTP side down too
            thread.join()


@contextlib.contextmanager
def _drain_on_signals(server: uvicorn.Server):
    def on_signal(signum: int, frame) -> None:
        if server.should_exit:
            server.force_exit = True
            return
        server.should_exit = True
        name = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
        print(f"moepic: {name}: draining (requests in flight finish; again to stop now)", file=sys.stderr, flush=True)

    previous = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
