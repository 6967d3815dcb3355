"""Running the app under uvicorn until Ctrl-C or SIGTERM, which drain it. Side effects: a socket,
signal handlers, the event loop.

    1st SIGINT / SIGTERM ─▶ the listening socket closes; requests in flight finish (their streams
                            too) for up to `drain_s`, then are cancelled; the process exits 0
    2nd signal           ─▶ stop now: requests in flight are cancelled (still exit 0: nothing is lost
                            that the clients did not see end)

uvicorn re-raises a signal it caught once it has shut down, which would end a cleanly drained
server with 130 or 143; here the drain is the normal end of a server, so it is not re-raised.
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


class _DrainingServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def on_signal(signum: int, frame) -> None:
            if self.should_exit:
                self.force_exit = True
                return
            self.should_exit = True
            name = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
            print(f"moepic: {name}: draining (requests in flight finish; again to stop now)", file=sys.stderr, flush=True)

        previous = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


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
    sock.set_inheritable(True)
    return sock


def run_server(app, sock: socket.socket, *, drain_s: float) -> None:
    """Serve `app` on `sock` until a signal drains it (see the module's docstring)."""
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=max(drain_s, 0.001))
    asyncio.run(_DrainingServer(config).serve(sockets=[sock]))


def url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
