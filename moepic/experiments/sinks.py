"""Where records go: one small interface; JSONL and CSV always, W&B when enabled. Side effects.

A record is one cell: {"script", "cell", "key", "system", "backend", "git_sha", "metrics",
"layers", "config"}. wandb is imported only inside `WandbSink`. The JSONL and CSV files are written
at `close`, whole or not at all (moepic.outputs): a failure leaves older results intact.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
from pathlib import Path
from typing import Protocol

from moepic.errors import ConfigError
from moepic.experiments.config import WandbConfig
from moepic.outputs import make_folder, write_text_atomic


class MetricSink(Protocol):
    def write(self, record: dict) -> None:
        ...

    def close(self) -> None:
        ...


def git_sha(where: Path | None = None, *, results: Path | None = None) -> str:
    """The commit the code ran at (`-dirty` with uncommitted changes outside `results`, the folder
    results are written to: regenerating committed results is not a change to the code); "unknown"
    outside git."""
    cwd = str(where or Path(__file__).parent)

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()

    try:
        sha, top = git("rev-parse", "HEAD"), Path(git("rev-parse", "--show-toplevel"))
        exclude = []
        if results is not None and results.resolve().is_relative_to(top.resolve()):
            exclude = [f":(top,exclude){results.resolve().relative_to(top.resolve())}"]
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", str(top), *exclude)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


class JsonlSink:
    """Every record whole, one JSON object per line; the file is written at close."""

    def __init__(self, path: Path) -> None:
        make_folder(path.parent, "results folder")
        self.path, self.lines = path, []

    def write(self, record: dict) -> None:
        self.lines.append(json.dumps(record) + "\n")  # key order kept: a cell's axes in grid order

    def close(self) -> None:
        write_text_atomic(self.path, "results", "".join(self.lines))


def flat_row(record: dict) -> dict:
    """A record's table row: the cell's key, then its scalar metrics."""
    return {"cell": record["cell"], "system": record["system"], **record["key"], **record["metrics"]}


class CsvSink:
    """One row per cell (key and scalar metrics); written at close, when every column is known."""

    def __init__(self, path: Path) -> None:
        make_folder(path.parent, "results folder")
        self.path, self.rows = path, []

    def write(self, record: dict) -> None:
        self.rows.append(flat_row(record))

    def close(self) -> None:
        columns = list(dict.fromkeys(k for row in self.rows for k in row))
        text = io.StringIO(newline="")  # the csv module writes its own line ends
        writer = csv.DictWriter(text, fieldnames=columns)
        writer.writeheader()
        writer.writerows(self.rows)
        write_text_atomic(self.path, "results table", text.getvalue())


class WandbSink:
    """One W&B run per cell, grouped by script: the resolved config and git SHA as the run config,
    scalar metrics as the summary (dashboard columns), per-layer figures as a table and as steps."""

    def __init__(self, config: WandbConfig, *, group: str, directory: Path) -> None:
        try:
            import wandb
        except ImportError:
            raise ConfigError('wandb.enabled needs wandb: pip install -e ".[wandb]"') from None
        self.wandb, self.config, self.group = wandb, config, group
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.runs: list[str] = []

    def write(self, record: dict) -> None:
        wandb = self.wandb
        name = " ".join(f"{k}={v}" for k, v in record["key"].items()) or record["system"]
        run = wandb.init(
            project=self.config.project, entity=self.config.entity, group=self.group, job_type=record["backend"],
            name=name, dir=str(self.directory), mode=os.environ.get("WANDB_MODE", self.config.mode),
            config={**record["config"], "git_sha": record["git_sha"], "cell": record["key"]}, reinit="create_new",
        )
        layers = record["layers"]
        columns = list(layers[0]) if layers else []
        for row in layers:  # per-layer curves: step = the MoE layer's position
            run.log({f"layer/{k}": v for k, v in row.items() if isinstance(v, (int, float)) and v is not None})
        run.log({"layers": wandb.Table(columns=columns, data=[[row[c] for c in columns] for row in layers])})
        run.summary.update({k: v for k, v in record["metrics"].items() if v is not None})
        self.runs.append(run.dir)
        run.finish()

    def close(self) -> None:
        self.wandb.teardown()  # waits for the run files to be written (offline too)
