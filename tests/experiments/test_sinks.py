"""moepic/experiments/sinks.py: where records go (JSONL, CSV, an offline W&B run) and the git SHA they carry."""

from __future__ import annotations

import csv
import json
import re
import subprocess

import pytest

from moepic.experiments.config import WandbConfig
from moepic.experiments.sinks import CsvSink, JsonlSink, WandbSink, flat_row, git_sha

from experiments_support import ROOT

SHA = "0123456789abcdef0123456789abcdef01234567"


def _record(cell: int, key: dict, metrics: dict, layers: int = 2) -> dict:
    return {
        "script": "unit", "cell": cell, "key": key, "system": "moepic-lcp", "backend": "sim", "git_sha": SHA,
        "metrics": metrics,
        "layers": [{"layer": i, "theta": 0.5, "slots": 2 + i, "hit_rate": 0.25 * i, "recall": None} for i in range(layers)],
        "config": {"cache": {"policy": {"name": "lcp", "rho": 0.25}, "theta": [0.5, 0.25]}, "system": "moepic-lcp"},
    }


RECORDS = [
    _record(0, {"policy": "lru", "budget": 0.25}, {"ms_per_token": 12.5, "expert_hit_rate": 0.5, "policy": "lru"}),
    _record(1, {"policy": "lcp", "budget": 0.5}, {"ms_per_token": 1e-3, "expert_hit_rate": None, "tokens": 48, "θ": "½"}),
    _record(2, {"policy": "lfu", "budget": 1}, {"ms_per_token": 7.0, "cache_gib": 2.5}, layers=0),
]


def _write(sink, records) -> None:
    for record in records:
        sink.write(record)
    sink.close()


def test_jsonl_sink_writes_each_record_whole_on_its_own_line(tmp_path):
    path = tmp_path / "deeper" / "results.jsonl"
    _write(JsonlSink(path), RECORDS)
    lines = path.read_text().splitlines()
    assert len(lines) == len(RECORDS)
    assert [json.loads(line) for line in lines] == RECORDS


def test_flat_row_is_the_cell_then_its_key_then_its_metrics():
    row = flat_row(RECORDS[0])
    assert list(row) == ["cell", "system", "policy", "budget", "ms_per_token", "expert_hit_rate"]
    assert row == {"cell": 0, "system": "moepic-lcp", "policy": "lru", "budget": 0.25, "ms_per_token": 12.5,
                   "expert_hit_rate": 0.5}


def test_csv_sink_header_is_every_column_in_first_seen_order_and_one_row_per_record(tmp_path):
    path = tmp_path / "results.csv"
    _write(CsvSink(path), RECORDS)
    columns = list(dict.fromkeys(k for r in RECORDS for k in flat_row(r)))
    assert columns[-3:] == ["tokens", "θ", "cache_gib"]  # metrics only later records have come last
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == columns
    assert rows == [{c: "" if flat_row(r).get(c) is None else str(flat_row(r)[c]) for c in columns} for r in RECORDS]


def test_git_sha_inside_the_repository(tmp_path):
    sha = git_sha(ROOT)
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", sha), sha
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    assert sha.removesuffix("-dirty") == head
    assert git_sha() == sha  # by default: where moepic's code is


def test_git_sha_outside_a_repository_is_unknown(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # git must not find a repository above
    assert git_sha(tmp_path) == "unknown"
    assert git_sha(tmp_path / "missing") == "unknown"


def test_wandb_sink_offline_writes_one_run_per_record(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="the wandb extra is not installed")
    # Offline, silent, and every file under tmp_path (not the home folder).
    for name, value in {
        "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off", "WANDB_DISABLE_GIT": "true",
        "WANDB_DISABLE_CODE": "true", "WANDB_DIR": str(tmp_path / "wandb_dir"), "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"),
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"), "WANDB_DATA_DIR": str(tmp_path / "wandb_data"),
        "WANDB_ARTIFACT_DIR": str(tmp_path / "wandb_artifacts"),
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    directory = tmp_path / "sink"
    group = "unit-test-group-7f3a"
    sink = WandbSink(WandbConfig(enabled=True, mode="offline"), group=group, directory=directory)
    records = RECORDS[:2]
    _write(sink, records)
    # run.finish() may return before wandb's service process has written a run's log to disk;
    # shutting the service down waits for it.
    wandb.teardown()
    runs = sorted(directory.glob("**/offline-run-*"))
    assert len(runs) == len(records) == len(sink.runs)
    assert all(str(run).startswith(str(directory)) for run in sink.runs)
    for run in runs:
        files = list(run.glob("*.wandb"))
        assert len(files) == 1
        data = files[0].read_bytes()
        assert group.encode() in data
        assert SHA.encode() in data


def test_git_sha_is_dirty_for_changed_code_but_not_for_regenerated_results(tmp_path):
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "results").mkdir()
    (tmp_path / "pkg").mkdir()  # git runs where the code is, below the top: pathspecs must not be relative to it
    (tmp_path / "code.py").write_text("a = 1\n")
    (tmp_path / "results" / "table.md").write_text("old\n")
    (tmp_path / "pkg" / "mod.py").write_text("b = 1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "one")
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    (tmp_path / "results" / "table.md").write_text("new\n")
    pkg = tmp_path / "pkg"
    assert git_sha(pkg, results=tmp_path / "results") == sha
    assert git_sha(pkg) == sha + "-dirty"
    (tmp_path / "code.py").write_text("a = 2\n")
    assert git_sha(pkg, results=tmp_path / "results") == sha + "-dirty"
