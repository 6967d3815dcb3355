"""`moepic train-predictor --out`: a folder that cannot be written is found before training, and a
write that fails part way (a full disk, a read-only folder, Ctrl-C) leaves the old predictor as it
was and no partial new one. The faults are injected by monkeypatching the writers (tests run as
root, which a read-only chmod does not stop)."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch

from moepic.checkpoint.load import load_model
from moepic.cli import main
from moepic.runtime.generation import generate
from moepic.tracing import save_trace
from moepic.tracing.recorder import RoutingRecorder
from tests_support import cli_error

FAST = ["--width", "4", "--epochs", "2", "--valid", "0.5"]


@pytest.fixture(scope="module")
def setup(checkpoint_dir, tmp_path_factory):
    """(model folder, a trace with router inputs)."""
    folder = checkpoint_dir("mixtral")
    model = load_model(folder, dtype=torch.float32)
    recorder = RoutingRecorder(model.spec, record_hidden=True)
    generate(model, [1, 17, 5, 42, 8, 33], max_new_tokens=40, eos_ids=(), tap=recorder)
    trace = tmp_path_factory.mktemp("trace") / "hidden.npz"
    save_trace(recorder.trace(), trace)
    return str(folder), str(trace)


def _argv(setup, out) -> list[str]:
    model, trace = setup
    return ["train-predictor", "--model", model, "--trace", trace, "--out", str(out), *FAST, "--json"]


def _snapshot(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _leftovers(parent) -> list[str]:
    """Hidden temporary files or folders a failed write left behind, anywhere below `parent`."""
    return [name for _, dirs, files in os.walk(parent) for name in dirs + files if name.startswith(".")]


@pytest.fixture
def old_predictor(setup, tmp_path, capsys):
    """A predictor trained into tmp_path/p (with a file of the user's beside it), and its bytes."""
    out = tmp_path / "p"
    capsys.readouterr()
    assert main(_argv(setup, out)) == 0
    (out / "notes.txt").write_text("mine")
    return out, _snapshot(out)


def _failing_write(exc: BaseException, after_bytes: int = 16):
    """A writer that puts some bytes down, then fails as a full disk or an interrupted run would."""

    def write(path, data: bytes) -> None:
        with open(path, "wb") as f:
            f.write(data[:after_bytes])
        raise exc

    return write


@pytest.mark.parametrize(
    "exc,reason",
    [(OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
     (OSError(errno.EACCES, "Permission denied"), "Permission denied")],
)
def test_a_failed_write_keeps_the_old_predictor_and_leaves_no_partial_one(capsys, monkeypatch, setup, old_predictor, exc, reason):
    out, before = old_predictor
    monkeypatch.setattr("moepic.predictors.mlp._write_bytes", _failing_write(exc))
    message = cli_error(capsys, _argv(setup, out))
    assert message == f"{out}: cannot write the predictor ({reason})"
    assert _snapshot(out) == before
    assert _leftovers(out.parent) == []


def test_ctrl_c_while_writing_keeps_the_old_predictor_and_leaves_no_partial_one(capsys, monkeypatch, setup, old_predictor):
    out, before = old_predictor
    monkeypatch.setattr("moepic.predictors.mlp._write_bytes", _failing_write(KeyboardInterrupt()))
    capsys.readouterr()
    assert main(_argv(setup, out)) == 130
    assert _snapshot(out) == before
    assert _leftovers(out.parent) == []


def test_a_failed_write_of_a_new_folder_leaves_no_folder(capsys, monkeypatch, setup, tmp_path):
    out = tmp_path / "new"
    monkeypatch.setattr("moepic.predictors.mlp._write_bytes", _failing_write(OSError(errno.ENOSPC, "No space left on device")))
    assert cli_error(capsys, _argv(setup, out)) == f"{out}: cannot write the predictor (No space left on device)"
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_found_when_flushing_leaves_the_old_predictor(capsys, monkeypatch, setup, old_predictor):
    out, before = old_predictor

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("moepic.outputs.os.fsync", fsync)  # the bytes were buffered; the disk is full on flush
    assert cli_error(capsys, _argv(setup, out)) == f"{out}: cannot write the predictor (No space left on device)"
    monkeypatch.undo()
    assert _snapshot(out) == before
    assert _leftovers(out.parent) == []


@pytest.mark.parametrize("existing", [False, True])
def test_an_unwritable_folder_is_found_before_any_training(capsys, monkeypatch, setup, tmp_path, existing):
    out = tmp_path / "p"
    if existing:
        out.mkdir()

    def no_training(*args, **kwargs):
        raise AssertionError("trained before checking the output folder")

    def read_only(*args, **kwargs):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr("moepic.commands.train_predictor.train_pair", no_training)
    monkeypatch.setattr("moepic.checkpoint.load.load_model", no_training)
    monkeypatch.setattr("moepic.outputs.tempfile.mkstemp", read_only)
    where = out / "predictor.json" if existing else out
    assert cli_error(capsys, _argv(setup, out)) == f"{where}: cannot write the predictor (Permission denied)"


def test_a_file_where_the_folder_should_be_is_found_before_any_training(capsys, setup, tmp_path):
    out = tmp_path / "p"
    out.write_text("not a folder")
    message = cli_error(capsys, _argv(setup, out))
    assert message == f"{out}: cannot write the predictor (a file of that name exists; it is written as a folder)"
    assert out.read_text() == "not a folder"


def test_a_missing_parent_folder_is_found_before_any_training(capsys, setup, tmp_path):
    out = tmp_path / "nowhere" / "p"
    assert cli_error(capsys, _argv(setup, out)) == f"{out}: cannot write the predictor (folder {out.parent} does not exist)"


def test_a_successful_write_replaces_the_predictor_and_keeps_the_users_other_files(capsys, setup, old_predictor):
    out, before = old_predictor
    capsys.readouterr()
    assert main([*_argv(setup, out)[:-1], "--width", "5", "--json"]) == 0
    assert json.loads((out / "predictor.json").read_text())["width"] == 5
    assert (out / "notes.txt").read_text() == "mine"
    assert _snapshot(out)["predictor.safetensors"] != before["predictor.safetensors"]
    assert _leftovers(out.parent) == []
