"""Every writer is all or nothing: a read-only folder, a full disk, or a kill part way through the
write leaves the old file as it was and no partial new one (nothing new at the target name, no
temporary file left in the folder); the CLI says so in one line (exit 2), or exits 130 on Ctrl-C.

We run as root, whom chmod stops from nothing: `Fault` simulates a read-only folder and a full disk
by patching the low-level calls (os.open, os.mkdir, os.replace, the file objects' write, fsync) for
paths inside the test's folder only.
"""

from __future__ import annotations

import builtins
import errno
import importlib.util
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moepic.cli import main
from moepic.errors import MoepicError
from moepic.outputs import OutputError, atomic_files, atomic_folder, atomic_output
from moepic.perfmodel.hardware import load_profile, save_profile
from moepic.tracing import RoutingTrace, save_trace
from tests_support import cli_error

ROOT = Path(__file__).resolve().parents[2]
WRITE_MODES = set("wax+")


class Fault:
    """Makes writing inside `folder` fail. kind: "read-only" (creating or renaming anything there
    fails with EACCES), "full" (ENOSPC once `after` bytes have been written there), "killed"
    (KeyboardInterrupt at the same point: Ctrl-C mid-write). With `at_fsync`, fsync there meets
    it too: writers whose bytes Python never sees (safetensors, written natively) meet it there."""

    def __init__(self, monkeypatch, folder, kind: str, after: int = 0, *, at_fsync: bool = True) -> None:
        self.folder, self.kind, self.after = os.path.realpath(folder), kind, after
        self.written, self.fired = 0, False
        real = {name: getattr(os, name) for name in ("open", "mkdir", "replace", "rename", "fdopen", "fsync")}
        real_open = builtins.open

        def os_open(path, flags, *args, **kwargs):
            if kind == "read-only" and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and self.inside(path):
                self.fail()
            return real["open"](path, flags, *args, **kwargs)

        def mkdir(path, *args, **kwargs):
            if kind == "read-only" and self.inside(path):
                self.fail()
            return real["mkdir"](path, *args, **kwargs)

        def renamer(name):
            def rename(src, dst, *args, **kwargs):
                if kind == "read-only" and self.inside(dst):
                    self.fail()
                return real[name](src, dst, *args, **kwargs)

            return rename

        def open_(file, mode="r", *args, **kwargs):
            writes = bool(WRITE_MODES & set(mode)) and self.inside(file)
            if writes and kind == "read-only":
                self.fail()
            f = real_open(file, mode, *args, **kwargs)
            return _Limited(f, self) if writes else f

        def fdopen(fd, mode="r", *args, **kwargs):
            f = real["fdopen"](fd, mode, *args, **kwargs)
            return _Limited(f, self) if WRITE_MODES & set(mode) and self.inside(_fd_path(fd)) else f

        def fsync(fd):
            fd = fd if isinstance(fd, int) else fd.fileno()
            if kind != "read-only" and at_fsync and self.inside(_fd_path(fd)):
                self.fail()
            return real["fsync"](fd)

        for name, fake in (("open", os_open), ("mkdir", mkdir), ("replace", renamer("replace")),
                           ("rename", renamer("rename")), ("fdopen", fdopen), ("fsync", fsync)):
            monkeypatch.setattr(os, name, fake)
        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(io, "open", open_)

    def inside(self, path) -> bool:
        if isinstance(path, int):
            return False
        path = os.path.realpath(os.fspath(path))
        return path == self.folder or path.startswith(self.folder + os.sep)

    def fail(self):
        self.fired = True
        if self.kind == "killed":
            raise KeyboardInterrupt
        code = errno.EACCES if self.kind == "read-only" else errno.ENOSPC
        raise OSError(code, os.strerror(code))


class _Limited:
    """A file object that meets its Fault after the fault's byte budget."""

    def __init__(self, f, fault: Fault) -> None:
        self._f, self._fault = f, fault

    def write(self, data):
        room = self._fault.after - self._fault.written
        if len(data) > room:
            if room > 0:  # the bytes that fit reach the file, as on a real disk
                self._f.write(data[:room])
                self._fault.written += room
            self._fault.fail()
        self._fault.written += len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __iter__(self):
        return iter(self._f)


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones too) → its bytes: old content and no leftovers in one value."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# (kind, after): a refused folder, a disk full at the first byte and part way, Ctrl-C part way.
FAULTS = [("read-only", 0), ("full", 0), ("full", 40), ("killed", 40)]


def _expected(kind: str):
    return KeyboardInterrupt if kind == "killed" else MoepicError


# --- the writers, called directly ---------------------------------------------------------------


def _trace(tokens: int, seed: int) -> RoutingTrace:
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.permutation(16)[:2] for _ in range(tokens * 6)]).reshape(tokens, 6, 2)
    return RoutingTrace(
        model="fault", moe_layers=tuple(range(6)), num_experts=16, top_k=2, expert_ids_NLK=ids.astype(np.int64),
        weights_NLK=np.full((tokens, 6, 2), 0.5, np.float32), sequence_N=np.zeros(tokens, np.int32),
        position_N=np.arange(tokens, dtype=np.int32), prefill_N=np.arange(tokens) < 2, source="test",
    )


def _write_trace(folder: Path, version: int) -> None:
    save_trace(_trace(8 + version, version), folder / "run.npz")


def _write_predictor(folder: Path, version: int) -> None:
    from moepic.predictors.mlp import save_predictor

    params = {"0->1": {"up.weight": torch.full((4, 3), float(version)), "up.bias": torch.zeros(4)}}
    save_predictor(folder / "mlp", params, {"hidden": 3, "width": 4, "experts": 2, "horizon": 1, "version": version})


def _write_profile(folder: Path, version: int) -> None:
    profile = load_profile("a6000")
    save_profile(type(profile)(**(profile.as_dict() | {"name": f"v{version}"})), folder / "hw.yaml")


def _write_figure(folder: Path, version: int) -> None:
    from moepic.experiments.plots import metric_plot

    records = [{"key": {"x": x}, "metrics": {"y": x * version}} for x in (1, 2, 3)]
    metric_plot(records, folder / "fig.png", x="x", y="y", title="t", xlabel="x", ylabel="y")


def _write_sinks(folder: Path, version: int) -> None:
    from moepic.experiments.sinks import CsvSink, JsonlSink

    record = {"cell": 0, "system": "s", "key": {"v": version}, "metrics": {"m": 1.5 * version}}
    for sink in (JsonlSink(folder / "results.jsonl"), CsvSink(folder / "results.csv")):
        sink.write(record)
        sink.close()


WRITERS = {"trace": _write_trace, "mlp predictor": _write_predictor, "hardware profile": _write_profile,
           "figure": _write_figure, "jsonl and csv sinks": _write_sinks}


@pytest.mark.parametrize("kind,after", FAULTS)
@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_failed_write_leaves_the_old_file_whole_and_nothing_else(tmp_path, monkeypatch, writer, kind, after):
    WRITERS[writer](tmp_path, 1)
    before = snapshot(tmp_path)
    with monkeypatch.context() as patched:
        fault = Fault(patched, tmp_path, kind, after)
        with pytest.raises(_expected(kind)):
            WRITERS[writer](tmp_path, 2)
    assert fault.fired
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_successful_write_replaces_the_old_file(tmp_path, writer):
    """The other half: the fault, not the writer, kept the old content in the test above."""
    WRITERS[writer](tmp_path, 1)
    before = snapshot(tmp_path)
    WRITERS[writer](tmp_path, 2)
    after = snapshot(tmp_path)
    assert after.keys() == before.keys() and after != before


# --- the commands --------------------------------------------------------------------------------


def _cli(capsys, argv: list[str], kind: str) -> str | None:
    """Run `moepic argv` under the fault: one error line and exit 2, or exit 130 on Ctrl-C."""
    if kind == "killed":
        assert main(argv) == 130
        assert capsys.readouterr().err.strip().splitlines()[-1] == "moepic: interrupted"
        return None
    return cli_error(capsys, argv)


@pytest.fixture
def measured(monkeypatch):
    """`moepic profile` without the measuring (seconds): a fixed profile, counted calls."""
    import moepic.runtime.measure

    calls = []

    def measure_profile(**kwargs):
        calls.append(kwargs)
        return load_profile("a6000")

    monkeypatch.setattr(moepic.runtime.measure, "measure_profile", measure_profile)
    return calls


@pytest.mark.parametrize("kind,after", FAULTS)
def test_profile_out_fails_safe(capsys, tmp_path, monkeypatch, measured, kind, after):
    out = tmp_path / "hw.yaml"
    out.write_text("old: profile\n")
    before = snapshot(tmp_path)
    with monkeypatch.context() as patched:
        Fault(patched, tmp_path, kind, after)
        message = _cli(capsys, ["profile", "--device", "cpu", "--quick", "--json", "--out", str(out)], kind)
    assert snapshot(tmp_path) == before
    if kind == "read-only":
        assert message == f"{out}: cannot write the hardware profile (Permission denied)"
        assert not measured  # found before the minutes of measuring
    elif kind == "full":
        assert message == f"{out}: cannot write the hardware profile (No space left on device)"


def test_a_disk_already_full_is_found_before_measuring(capsys, tmp_path, monkeypatch, measured):
    """An empty probe file fits on a full disk, so the check asks the file system for free blocks."""
    real_statvfs = os.statvfs

    def statvfs(path):
        stat = real_statvfs(path)
        if os.path.realpath(path) != os.path.realpath(tmp_path):
            return stat
        return os.statvfs_result((*stat[:3], 0, 0, *stat[5:]))  # f_bfree, f_bavail: no block left

    monkeypatch.setattr(os, "statvfs", statvfs)
    out = tmp_path / "hw.yaml"
    message = cli_error(capsys, ["profile", "--device", "cpu", "--quick", "--json", "--out", str(out)])
    assert message == f"{out}: cannot write the hardware profile (No space left on device)"
    assert not measured and list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def bundled_trace(tmp_path_factory) -> Path:
    """A small trace of the bundled model's shape (configure reads it; --predictor none needs no hidden states)."""
    path = tmp_path_factory.mktemp("trace") / "run.npz"
    save_trace(_trace(24, 0), path)
    return path


@pytest.mark.parametrize("kind,after", FAULTS)
def test_configure_out_fails_safe(capsys, tmp_path, monkeypatch, bundled_trace, kind, after):
    out = tmp_path / "cache.yaml"
    out.write_text("old: config\n")
    before = snapshot(tmp_path)
    argv = ["configure", "--json", "--budget", "0.5", "--hardware", "a6000", "--predictor", "none",
            "--trace", str(bundled_trace), "--out", str(out)]
    if kind == "read-only":  # found before the hit-rate curves
        import moepic.configurators.base

        monkeypatch.setattr(moepic.configurators.base, "configure_on_trace", lambda *a, **k: pytest.fail("curves computed"))
    with monkeypatch.context() as patched:
        Fault(patched, tmp_path, kind, after)
        message = _cli(capsys, argv, kind)
    assert snapshot(tmp_path) == before
    if kind != "killed":
        reason = "Permission denied" if kind == "read-only" else "No space left on device"
        assert message == f"{out}: cannot write the config ({reason})"


@pytest.fixture
def mixtral(checkpoint_dir) -> str:
    return str(checkpoint_dir("mixtral"))


GENERATE = ["generate", "--json", "--greedy", "--prompt-ids", "1,2,3", "--max-new-tokens", "4", "--budget", "0.5"]


@pytest.mark.parametrize("kind,after", [("read-only", 0), ("full", 0), ("full", 400), ("killed", 400)])
def test_token_log_fails_safe(capsys, tmp_path, monkeypatch, mixtral, kind, after):
    """At the first line and part way through the run (400 bytes: the third token's line of four)."""
    log = tmp_path / "tokens.jsonl"
    log.write_text('{"old": "log"}\n')
    before = snapshot(tmp_path)
    with monkeypatch.context() as patched:
        fault = Fault(patched, tmp_path, kind, after)
        message = _cli(capsys, [*GENERATE, "--model", mixtral, "--token-log", str(log)], kind)
    assert fault.fired
    assert snapshot(tmp_path) == before
    if kind != "killed":
        reason = "Permission denied" if kind == "read-only" else "No space left on device"
        assert message == f"{log}: cannot write the token log ({reason})"


def test_token_log_appears_only_when_the_run_completes(capsys, tmp_path, monkeypatch, mixtral):
    log = tmp_path / "tokens.jsonl"
    seen = []
    import moepic.runtime.token_log

    real_call = moepic.runtime.token_log.TokenLog.__call__

    def call(self, token_id):
        seen.append((log.exists(), sorted(p.name for p in tmp_path.iterdir())))
        return real_call(self, token_id)

    monkeypatch.setattr(moepic.runtime.token_log.TokenLog, "__call__", call)
    capsys.readouterr()
    assert main([*GENERATE, "--model", mixtral, "--token-log", str(log)]) == 0
    assert seen and not any(exists for exists, _ in seen)  # never visible half written
    assert all(len(names) == 1 and names[0].startswith(".tokens.jsonl.") for _, names in seen)
    assert len(log.read_text().splitlines()) == len(seen) and sorted(p.name for p in tmp_path.iterdir()) == ["tokens.jsonl"]


def test_an_unwritable_trace_or_log_is_found_before_the_model_loads(capsys, tmp_path, monkeypatch, mixtral):
    import moepic.checkpoint.load

    monkeypatch.setattr(moepic.checkpoint.load, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    with monkeypatch.context() as patched:
        Fault(patched, tmp_path, "read-only")
        for flag, what in (("--record-trace", "trace"), ("--token-log", "token log")):
            path = tmp_path / "out"
            assert cli_error(capsys, [*GENERATE, "--model", mixtral, flag, str(path)]) == (
                f"{path}: cannot write the {what} (Permission denied)"
            )
    assert cli_error(capsys, [*GENERATE, "--model", mixtral, "--token-log", str(tmp_path / "no" / "t.jsonl")]) == (
        f"{tmp_path / 'no' / 't.jsonl'}: cannot write the token log (folder {tmp_path / 'no'} does not exist)"
    )
    assert list(tmp_path.iterdir()) == []


# --- an ablation's results, and make_results -------------------------------------------------------


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"ablate_{name}_faults", ROOT / "experiments" / f"ablate_{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fake_cells(monkeypatch):
    """The theta ablation's machinery with the cells' results made up (the writing is under test,
    not the simulator): each run's metrics differ from the last one's."""
    import moepic.experiments.ablation as ablation

    runs = []

    def run_cells(cells, executor, *, desc, progress=True):
        runs.append(len(cells))
        return [{"metrics": {"ms_per_token": 1.0 + i + len(runs), "exposed_copy_ms_per_token": 0.5 * len(runs)}, "layers": []}
                for i, _ in enumerate(cells)]

    monkeypatch.setattr(ablation, "run_cells", run_cells)
    monkeypatch.setattr(ablation, "git_sha", lambda **kwargs: "0" * 40)
    return runs


@pytest.mark.parametrize("kind,after", [*FAULTS, ("full", "figure"), ("killed", "figure")])
def test_ablation_results_are_replaced_as_one_set_or_not_at_all(capsys, tmp_path, monkeypatch, fake_cells, kind, after):
    """after "figure": the text files written whole, the disk full (or Ctrl-C) in the first figure."""
    from moepic.experiments.ablation import main as ablation_main

    theta = _script("theta")
    base = ROOT / "experiments" / "configs" / "base.yaml"
    out = tmp_path / "theta"
    argv = ["--toy", "--workers", "1", "--no-progress", "--out", str(out)]
    ablation_main(theta.ABLATION, base, argv, default_out=out)
    assert {"results.jsonl", "results.csv", "table.md", "figures.json", "theta_u_curve.png"} <= snapshot(out).keys()
    before = snapshot(tmp_path)
    capsys.readouterr()
    at_fsync = after != "figure"
    if after == "figure":
        after = sum(len(before[f"theta/{name}"]) for name in ("results.jsonl", "results.csv", "table.md")) + 100
    with monkeypatch.context() as patched:
        fault = Fault(patched, out, kind, after, at_fsync=at_fsync)
        with pytest.raises(SystemExit) as exit_:
            ablation_main(theta.ABLATION, base, argv, default_out=out)
        err = capsys.readouterr().err
        if kind == "killed":
            assert exit_.value.code == 130 and err == "interrupted\n"
        else:
            assert exit_.value.code == 2
            reason = "Permission denied" if kind == "read-only" else "No space left on device"
            assert err.count("\n") == 1 and err.startswith(f"error: {out}/") and err.endswith(f"({reason})\n"), err
    assert fault.fired
    assert snapshot(tmp_path) == before
    assert len(fake_cells) == (1 if kind == "read-only" else 2)  # read-only: found before the cells ran


def test_ablation_rerun_replaces_every_file_of_the_set(tmp_path, fake_cells):
    from moepic.experiments.ablation import run

    theta = _script("theta")
    base = ROOT / "experiments" / "configs" / "base.yaml"
    out = tmp_path / "theta"
    argv = ["--toy", "--workers", "1", "--no-progress", "--out", str(out)]
    run(theta.ABLATION, base, argv, default_out=out)
    (out / "notes.txt").write_text("mine")  # not the ablation's: left alone
    first = snapshot(out)
    report = run(theta.ABLATION, base, argv, default_out=out)
    second = snapshot(out)
    assert first.keys() == second.keys()
    assert second["notes.txt"] == b"mine" and second["results.jsonl"] != first["results.jsonl"]
    assert [f.parent for f in report.figures] == [out] * len(report.figures)
    assert json.loads(second["figures.json"]) == [f.name for f in report.figures]


@pytest.mark.parametrize("kind,after", [("read-only", 0), ("full", 40), ("killed", 40)])
def test_make_results_leaves_the_readme_whole(tmp_path, monkeypatch, kind, after):
    spec = importlib.util.spec_from_file_location("make_results_faults", ROOT / "experiments" / "make_results.py")
    make_results = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_results)
    readme = tmp_path / "README.md"
    readme.write_text(f"# old\n{make_results.BEGIN}\nold section\n{make_results.END}\ntail\n")
    monkeypatch.setattr(make_results, "README", readme)
    monkeypatch.setattr(make_results, "RESULTS", tmp_path / "results")
    make_results.main(["--skip-run", "--only", "theta"])  # a first, good run
    assert "_Not run yet._" in readme.read_text() and readme.read_text().endswith("tail\n")
    before = snapshot(tmp_path)
    with monkeypatch.context() as patched:
        Fault(patched, tmp_path, kind, after)
        with pytest.raises(_expected(kind)):
            make_results.main(["--skip-run", "--only", "theta"])
    assert snapshot(tmp_path) == before


# --- moepic.outputs itself ---------------------------------------------------------------------------


def _fresh(tmp_path: Path) -> Path:
    return Path(tempfile.mkdtemp(dir=tmp_path))  # hypothesis reuses tmp_path across examples


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=40)
@given(old=st.one_of(st.none(), st.binary(max_size=64)), new=st.binary(max_size=300), cut=st.integers(0, 400),
       kind=st.sampled_from(["full", "killed"]), chunk=st.integers(1, 64))
def test_atomic_output_fails_safe_at_any_byte(tmp_path, old, new, cut, kind, chunk):
    folder = _fresh(tmp_path)
    target = folder / "out.bin"
    if old is not None:
        target.write_bytes(old)
    before = snapshot(folder)
    with pytest.MonkeyPatch.context() as patched:
        fault = Fault(patched, folder, kind, after=cut)
        try:
            with atomic_output(target, "output") as f:
                for start in range(0, len(new), chunk):
                    f.write(new[start:start + chunk])
        except (OutputError, KeyboardInterrupt) as e:
            assert isinstance(e, OutputError if kind == "full" else KeyboardInterrupt)
            assert fault.fired
        else:
            pytest.fail("fsync meets the fault even when every byte fits")
    assert snapshot(folder) == before


@settings(max_examples=30)
@given(old=st.one_of(st.none(), st.binary(max_size=64)), new=st.binary(max_size=300))
def test_atomic_output_writes_exactly_the_new_content(tmp_path_factory, old, new):
    folder = tmp_path_factory.mktemp("ok")
    target = folder / "out.bin"
    if old is not None:
        target.write_bytes(old)
    with atomic_output(target, "output") as f:
        f.write(new)
    assert snapshot(folder) == {"out.bin": new}


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=30)
@given(files=st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), st.binary(max_size=40), min_size=1),
       cut=st.integers(0, 200), kind=st.sampled_from(["full", "killed", "raise"]), nested=st.booleans())
def test_atomic_folder_and_atomic_files_keep_the_old_set_whole(tmp_path, files, cut, kind, nested):
    folder = _fresh(tmp_path)
    (folder / "set").mkdir()
    (folder / "set" / "a").write_bytes(b"old a")
    (folder / "set" / "keep").write_bytes(b"not in the new set")
    before = snapshot(folder)
    for writer in (lambda: atomic_folder(folder / "set", "set"), lambda: atomic_files(folder / "set", "set")):
        with pytest.MonkeyPatch.context() as patched:
            if kind != "raise":
                Fault(patched, folder, kind, after=cut)
            with pytest.raises((OutputError, KeyboardInterrupt, ValueError)):
                with writer() as staging:
                    for name, content in files.items():
                        path = staging / "sub" / name if nested else staging / name
                        path.parent.mkdir(exist_ok=True)
                        path.write_bytes(content)
                    if kind == "raise":
                        raise ValueError("a bug part way")
        assert snapshot(folder) == before


def test_atomic_folder_keeps_the_old_folder_when_the_swap_fails(tmp_path, monkeypatch):
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "a").write_text("old")
    real_replace = os.replace

    def replace(src, dst):
        if Path(src).name.endswith(".part"):  # the new folder's rename, after the old one moved aside
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OutputError, match="cannot write the set"):
        with atomic_folder(tmp_path / "set", "set") as staging:
            (staging / "a").write_text("new")
    assert snapshot(tmp_path) == {"set/a": b"old"}
