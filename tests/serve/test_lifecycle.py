"""A server's start and end: SIGTERM and Ctrl-C drain it (exit 0), a second one or the drain's time
limit cancels what is left; mistakes at start-up are one line; a failed step fails its requests
with a 500 and the server says it is down instead of serving wrong numbers."""

from __future__ import annotations

import signal
import socket
import threading

import httpx
import pytest

from moepic.cli import main
from moepic.default_model import default_model_dir
from moepic.serve.process import ServerProcess
from serve_support import wait_for
from tests_support import cli_error


def _stream_in_background(url: str, max_tokens: int) -> tuple[threading.Thread, list[str], threading.Event]:
    """A streamed completion read by a thread: its data lines, and an event set at the first one."""
    lines, started = [], threading.Event()

    def read() -> None:
        body = {"model": "kjv-moe-tiny", "prompt": "And God said", "max_tokens": max_tokens, "temperature": 0, "stream": True}
        try:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
                for line in response.iter_lines():
                    if line.startswith("data:"):
                        lines.append(line)
                        started.set()
        except httpx.HTTPError as e:  # the server closed it: recorded, for the test to look at
            lines.append(f"closed: {type(e).__name__}")
        started.set()

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread, lines, started


def _refuses_connections(url: str) -> bool:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.socket() as sock:
        return sock.connect_ex((host, int(port))) != 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_drains_the_server_the_stream_in_flight_finishes_and_it_exits_0(signum):
    server = ServerProcess("--budget", "0.25")
    try:
        chat = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "kjv-moe-tiny", "messages": [{"role": "user", "content": "a"}]})
        assert chat.status_code == 400 and chat.json()["error"]["code"] == "no_chat_template"
        thread, lines, started = _stream_in_background(server.url, 400)
        assert started.wait(60)
        server.process.send_signal(signum)
        wait_for(lambda: _refuses_connections(server.url), what="the listening socket closing")
        thread.join(120)
        assert lines[-1] == "data: [DONE]" and len(lines) == 400 + 1  # every token, then the end
        code = server.process.wait(60)  # on its own: no second signal
    finally:
        server.stop(signal.SIGKILL)
    assert code == 0, server.stderr
    assert "draining" in server.stderr and "stopped cleanly" in server.stderr


def test_requests_still_running_when_the_drain_time_is_up_are_cancelled_and_it_still_exits_0():
    server = ServerProcess("--drain-s", "0.5")
    try:
        thread, lines, started = _stream_in_background(server.url, 1000)
        assert started.wait(60)
        server.process.send_signal(signal.SIGTERM)
        thread.join(60)
        assert not thread.is_alive() and "data: [DONE]" not in lines  # cut short, not finished
        code = server.process.wait(60)  # on its own: no second signal
    finally:
        server.stop(signal.SIGKILL)
    assert code == 0, server.stderr
    assert "Traceback" not in server.stderr


def test_start_up_mistakes_are_one_line(capsys, tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        message = cli_error(capsys, ["serve", "--port", str(taken.getsockname()[1])])
    finally:
        taken.close()
    assert "cannot listen on 127.0.0.1" in message
    trace = tmp_path / "own.npz"
    assert main(["generate", "--prompt-ids", "1,2,3", "--max-new-tokens", "4", "--record-trace", str(trace), "--json"]) == 0
    message = cli_error(capsys, ["serve", "--port", "0", "--budget", "0.25", "--policy", "belady", f"cache.policy.trace={trace}"])
    assert message.startswith("cache.policy 'belady' reads a recorded trace of the run's own routing")
    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).symlink_to(default_model_dir() / name)
    assert "moepic serve needs the model's tokenizer" in cli_error(capsys, ["serve", "--model", str(folder), "--port", "0"])
    assert "--port: expected an integer in [0, 65535], got '70000'" in cli_error(capsys, ["serve", "--port", "70000"])
    assert cli_error(capsys, ["serve", "--port", "0", "sampling.temperature=0.5"]).startswith(
        "sampling.temperature has no effect on moepic serve")


def test_a_failed_step_fails_its_requests_with_500_and_the_server_reports_itself_down():
    from fastapi.testclient import TestClient

    from moepic.checkpoint.load import load_model
    from moepic.runtime.scheduler import Scheduler
    from moepic.serve.app import build_app
    from moepic.serve.metrics import ServeMetrics
    from moepic.serve.requests import ServedModel
    from moepic.serve.worker import ServeWorker
    from moepic.tokenizer import TextCodec

    model = load_model(str(default_model_dir()))
    scheduler = Scheduler(model)

    def broken_step():
        raise RuntimeError("the device fell off the bus")

    scheduler.step = broken_step
    worker = ServeWorker(scheduler)
    served = ServedModel(name="kjv", codec=TextCodec.from_folder(default_model_dir()), template=None,
                         context=model.spec.max_position_embeddings, vocab_size=model.spec.vocab_size)
    worker.start()
    try:
        with TestClient(build_app(served, worker, ServeMetrics(worker))) as client:
            failed = client.post("/v1/completions", json={"model": "kjv", "prompt": "And God said", "max_tokens": 3})
            assert failed.status_code == 500 and "the device fell off the bus" in failed.json()["error"]["message"]
            assert client.get("/health").status_code == 503
            refused = client.post("/v1/completions", json={"model": "kjv", "prompt": "And God said", "max_tokens": 3})
            assert refused.status_code == 503 and "cannot generate any more" in refused.json()["error"]["message"]
            assert "moepic_up 0.0" in client.get("/metrics").text
    finally:
        worker.stop()
