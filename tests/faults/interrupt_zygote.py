"""A process that imports moepic (and torch) once, then forks one child per request: each child runs
a command exactly as `python -m moepic` (or `python SCRIPT`) would, minus the seconds of imports.
Used by test_interrupts.py to afford dozens of real processes on two cores.

Protocol, one JSON object a line. In: {"id", "argv", "script" (or null), "cwd", "env", "out", "err"}.
Out: {"ready": true} once imported; {"id", "pid"} per child started; {"pid", "code"} per child ended
(its exit status, -N if killed by signal N). Each child leads its own process group (a terminal's
Ctrl-C reaches a whole group; the test sends it so). stdin at EOF ends the zygote.

Written with os.read / os.write and one thread, so that a fork never copies a held lock.
"""

import json
import os
import select
import sys

import moepic.checkpoint.load  # noqa: F401 (imported ahead, for the children)
import moepic.cli
import moepic.commands.generate  # noqa: F401
import moepic.commands.profile  # noqa: F401
import moepic.commands.train_predictor  # noqa: F401
import moepic.experiments.ablation  # noqa: F401
import moepic.runtime.generation  # noqa: F401
import moepic.runtime.offload  # noqa: F401
from moepic import interrupts


def _send(message: dict) -> None:
    os.write(1, (json.dumps(message) + "\n").encode())


def _child(request: dict) -> None:
    """Become the command; never returns (SystemExit unwinds out of the zygote's loop, so the
    interpreter exits as a real process would)."""
    os.setsid()
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                            (2, request["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        opened = os.open(path, flags, 0o644)
        os.dup2(opened, fd)
        os.close(opened)
    sys.stdout = open(1, "w", encoding="utf-8", closefd=False)  # noqa: SIM115 (fresh objects: no copied state)
    sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", buffering=1, closefd=False)  # noqa: SIM115
    os.chdir(request["cwd"])
    os.environ.update(request["env"])
    if request["script"] is None:
        interrupts.install_early()  # what moepic/__main__.py does first
        sys.argv = ["moepic", *request["argv"]]
        interrupts.finish(moepic.cli.main(request["argv"]))  # what moepic/__main__.py does last
    import runpy

    sys.argv = [request["script"], *request["argv"]]
    runpy.run_path(request["script"], run_name="__main__")
    sys.exit(0)


def _reap() -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _send({"pid": pid, "code": os.waitstatus_to_exitcode(status)})


def main() -> None:
    _send({"ready": True})
    pending = b""
    while True:
        readable, _, _ = select.select([0], [], [], 0.02)
        if readable:
            chunk = os.read(0, 1 << 16)
            if not chunk:
                return
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                request = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    _child(request)
                _send({"id": request["id"], "pid": pid})
        _reap()


if __name__ == "__main__":
    main()
