"""An ablation script's machinery: its grid, run where asked, written to every sink, tabled and plotted.

A script under `experiments/` declares an `Ablation` (axes, table columns, plots, and the overrides
for its default and toy sizes) and calls `main`. The command line is the same for all of them:

    python experiments/ablate_X.py [--system NAME] [--backend sim|engine] [--executor local|ray]
        [--workers N] [--ray-address ADDR] [--wandb] [--toy] [--out DIR] [key=value ...]

`key=value` overrides apply to every cell (before the axes' own). The output folder gets
results.jsonl (every record whole), results.csv (one row per cell), table.md and the figures, as
one set: checked writable before any cell runs, and replacing the previous set only once all of it
is written (moepic.outputs.atomic_files), so a failure leaves the previous results whole.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import attrs

from moepic import interrupts, progress
from moepic.errors import MoepicError
from moepic.experiments.config import load_experiment
from moepic.experiments.executors import run_cells
from moepic.experiments.grid import Axis, expand
from moepic.experiments.sinks import CsvSink, JsonlSink, MetricSink, WandbSink, git_sha
from moepic.outputs import atomic_files, check_writable, make_folder, write_text_atomic
from moepic.structure import unstructure


# --toy: a small synthetic trace of the base's model shape (seconds per grid; what the tests run).
TOY_WORKLOAD = ("workload.source=synthetic", "workload.synthetic.tokens=48", "workload.synthetic.sequences=2")
# --backend engine: the bundled model generates the recorded workload (workload.recorded).
ENGINE_WORKLOAD = ("workload.source=recorded", "workload.model_shape=bundled")


@attrs.frozen
class Column:
    metric: str
    header: str
    format: str = ".2f"


@attrs.frozen(kw_only=True)
class Ablation:
    name: str  # the W&B group, and the default output folder's name
    title: str
    # The grid's axes, or a function that builds them when the script runs (not at import), for
    # levels that depend on the environment, such as a path under the cache folder.
    axes: tuple[Axis, ...] | Callable[[], tuple[Axis, ...]]
    columns: tuple[Column, ...]
    overrides: tuple[str, ...] = ()  # the script's own defaults, on top of the base config
    toy: tuple[str, ...] = TOY_WORKLOAD  # --toy: a tiny workload, for the tests
    toy_axes: tuple[Axis, ...] | Callable[[], tuple[Axis, ...]] | None = None  # --toy: fewer levels
    engine: tuple[str, ...] = ENGINE_WORKLOAD  # --backend engine: what the engine runs
    ratio: tuple[str, Any] | None = None  # ms/token relative to this (axis, level), same other levels
    plots: Callable[[list[dict], Path], list[Path]] = lambda records, out: []
    summary: Callable[[list[dict]], str] | None = None  # text under the table (a derived result)
    keep: Callable[[dict], bool] | None = None  # which combinations of the axes' levels to run (default: all)
    derive: Callable[[dict], Sequence[str]] | None = None  # overrides that depend on several levels
    prepare: Callable[[bool], None] | None = None  # before the cells run (given --toy): e.g. train a predictor they load

    def grid(self, toy: bool) -> tuple[Axis, ...]:
        """The axes a run uses: the toy ones with --toy (where the script has them), built now."""
        axes = self.toy_axes if toy and self.toy_axes is not None else self.axes
        return axes() if callable(axes) else axes


@attrs.frozen
class Report:
    out: Path
    records: list[dict]
    table: str
    figures: list[Path]


def parser(ablation: Ablation, default_out: Path) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=ablation.title)
    p.add_argument("overrides", nargs="*", help="key=value for every cell, e.g. workload.hardware=h100-pcie")
    p.add_argument("--base", help="base experiment config (default: experiments/configs/base.yaml)")
    p.add_argument("--system", help="a named system (moepic compare's baselines) or a system YAML overlaid on the base")
    p.add_argument("--backend", choices=("sim", "engine"), help="simulate (default) or run the real engine")
    p.add_argument("--executor", choices=("local", "ray"), help="local worker processes (default) or a Ray cluster")
    p.add_argument("--workers", type=int, help="local worker processes (default: the CPU count)")
    p.add_argument("--ray-address", help="Ray cluster address (RAY_ADDRESS wins; default: the latest `ray start` here, else a new local instance)")
    p.add_argument("--wandb", action="store_true", help="also log one W&B run per cell (offline unless wandb.mode=online)")
    p.add_argument("--toy", action="store_true", help="a tiny workload and grid (seconds; what the tests run)")
    p.add_argument("--out", type=Path, default=default_out, help=f"output folder (default: {default_out})")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--allow-env", action="store_true", help="let configs read environment variables with ${oc.env:NAME}")
    return p


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    flags = {"backend": "backend", "executor": "executor.kind", "workers": "executor.workers", "ray_address": "executor.address"}
    out = [f"{key}={getattr(args, flag)}" for flag, key in flags.items() if getattr(args, flag) is not None]
    return out + (["wandb.enabled=true"] if args.wandb else [])


def run(ablation: Ablation, base: Path, argv: Sequence[str] | None = None, *, default_out: Path) -> Report:
    args = parser(ablation, default_out).parse_args(argv)
    base = args.base or base
    user = [*_flag_overrides(args), *args.overrides]
    overrides = [*ablation.overrides, *(ablation.toy if args.toy else ()), *user]
    # The engine runs its own workload: its overrides go under the user's (who may tune them).
    if load_experiment(base, args.system, overrides, allow_env=args.allow_env).backend == "engine":
        overrides = [*ablation.overrides, *(ablation.toy if args.toy else ()), *ablation.engine, *user]
    cells = expand(
        base, ablation.grid(args.toy), overrides, args.system, keep=ablation.keep, derive=ablation.derive, allow_env=args.allow_env
    )
    out = make_folder(args.out, "results folder")
    check_writable(out / "results.jsonl", "results")  # before the cells run, not after
    if ablation.prepare is not None:
        ablation.prepare(args.toy)
    first = cells[0].config
    executor = first.executor
    if first.backend == "engine" and executor.kind == "local" and executor.workers != 1:
        executor = attrs.evolve(executor, workers=1)  # cells timed side by side would share the cores
    results = run_cells(cells, executor, desc=ablation.name, progress=not args.no_progress)
    sha = git_sha(results=out.parent)  # experiments/results/NAME: any ablation's committed results
    records = [
        {"script": ablation.name, "cell": cell.index, "key": cell.key, "system": cell.config.system, "backend": cell.config.backend,
         "git_sha": sha, **result, "config": unstructure(cell.config)}
        for cell, result in zip(cells, results)
    ]
    table = markdown_table(ablation, records)
    if ablation.summary is not None:
        table += "\n\n" + ablation.summary(records)
    header = (f"{ablation.title}\n\n{len(records)} cells, backend {first.backend}, git {sha[:12]}{sha[40:]}, "
              f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs\n\n")
    # Every file of the set is new or (on any failure) every one is the previous run's: a table
    # never sits beside figures or results of another run.
    with atomic_files(out, "results") as staging:
        sinks: list[MetricSink] = [JsonlSink(staging / "results.jsonl"), CsvSink(staging / "results.csv")]
        _write_all(sinks, records)
        write_text_atomic(staging / "table.md", "table", header + table + "\n")
        staged = ablation.plots(records, staging)
        write_text_atomic(staging / "figures.json", "figure list", json.dumps([str(f.relative_to(staging)) for f in staged]) + "\n")
    figures = [out / f.relative_to(staging) for f in staged]
    if first.wandb.enabled:  # wandb writes its own run folders, under out/wandb
        _write_all([WandbSink(first.wandb, group=ablation.name, directory=out / "wandb")], records)
    return Report(out, records, table, figures)


def _write_all(sinks: Sequence[MetricSink], records: Sequence[dict]) -> None:
    for sink in sinks:
        for record in records:
            sink.write(record)
        sink.close()


def script(ablation: Ablation, base: Path, *, default_out: Path) -> NoReturn:
    """An ablation script's `__main__`: `main` on the command line, then the process ends by
    `interrupts.finish` (no interpreter teardown for a Ctrl-C to land in and kill without a word)."""
    main(ablation, base, default_out=default_out)
    interrupts.finish(0)


def main(ablation: Ablation, base: Path, argv: Sequence[str] | None = None, *, default_out: Path) -> Report:
    """`run`, with the table printed and a user's mistake as one line on stderr (no traceback);
    Ctrl-C stops the cells and exits 130 (SIGTERM: 143), see moepic/interrupts.py."""
    try:
        with interrupts.handled():
            report = run(ablation, base, argv, default_out=default_out)
    except (Exception, KeyboardInterrupt) as e:
        code = interrupts.interruption(e)  # Ctrl-C / SIGTERM, or what it caused
        if code is None and not isinstance(e, MoepicError):
            raise
        progress.end_line()
        if code is None:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        print(interrupts.message(code), file=sys.stderr)
        interrupts.leave(code)
        raise SystemExit(code) from None
    print(report.table)
    print(f"\nwrote {report.out}/: results.jsonl, results.csv, table.md, " + ", ".join(f.name for f in report.figures))
    return report


def markdown_table(ablation: Ablation, records: Sequence[dict]) -> str:
    axes = list(records[0]["key"]) if records else []
    headers = [*axes, *(c.header for c in ablation.columns)]
    if ablation.ratio:
        headers.append(f"× {ablation.ratio[0]} {ablation.ratio[1]}")
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    for record in records:
        cells = [_label(record["key"][a]) for a in axes]
        cells += [_number(record["metrics"].get(c.metric), c.format) for c in ablation.columns]
        if ablation.ratio:
            cells.append(_number(ratio_to(record, records, *ablation.ratio), ".2f"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratio_to(record: dict, records: Sequence[dict], axis: str, level: Any, metric: str = "ms_per_token") -> float | None:
    """`record`'s metric over that of the record with `axis` at `level` and every other axis alike."""
    want = {**record["key"], axis: level}
    reference = next((r for r in records if r["key"] == want), None)
    if reference is None or not reference["metrics"].get(metric):
        return None
    return record["metrics"][metric] / reference["metrics"][metric]


def _label(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _number(value: Any, fmt: str) -> str:
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    return format(value, fmt)
