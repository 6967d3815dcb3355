"""`moepic serve` as a child process: started on a free port, its announced URL, stopped by a
signal. For scripts that drive a server (experiments/bench_serve.py, the serve tests). Side
effects: a process, a thread reading its stderr."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading

from moepic.errors import MoepicError

ANNOUNCED = re.compile(r"moepic: serving .* at (http://\S+) ")


class ServerProcess:
    """`moepic serve ARGS --port 0`; `url` once it listens; `stderr` as it comes."""

    def __init__(self, *args: str, start_s: float = 180.0) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "moepic", "serve", "--port", "0", *args],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        announced = threading.Event()

        def read() -> None:
            for line in self.process.stderr:
                self.lines.append(line)
                if ANNOUNCED.match(line):
                    announced.set()
            announced.set()  # it ended before announcing anything

        threading.Thread(target=read, name="moepic-serve-stderr", daemon=True).start()
        if not announced.wait(start_s) or self.process.poll() is not None:
            self.process.kill()
            raise MoepicError(f"moepic serve did not start within {start_s:g} s:\n{self.stderr}")
        self.url = next(m.group(1) for line in self.lines if (m := ANNOUNCED.match(line)))

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Send `signum` (unless it has exited) and wait: its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise MoepicError(f"moepic serve did not stop within {timeout:g} s:\n{self.stderr}") from None
