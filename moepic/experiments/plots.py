"""Figures written next to an ablation's results (matplotlib, imported here only). Side effects:
each figure file is written whole or not at all (moepic.outputs).

Two kinds cover the ablations: a metric against one axis, a line per level of another (and one
panel per level of a third), and a per-MoE-layer figure, a line per cell. A grouped bar chart
serves the probes: a value per (row, series) in each panel.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from moepic.errors import ConfigError
from moepic.outputs import atomic_output, make_folder


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError('plots need matplotlib: pip install -e ".[plot]"') from None
    return plt


# Lines that coincide (two configurators choosing alike) stay visible: each series its own dash and marker.
STYLES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ((0, (5, 1)), "v"), ((0, (1, 1)), "P"), ((0, (3, 1, 1, 1)), "X"))


def _style(i: int) -> dict:
    line, marker = STYLES[i % len(STYLES)]
    return {"linestyle": line, "marker": marker, "markersize": 4}


def _levels(records: Sequence[dict], axis: str | None) -> list[Any]:
    return list(dict.fromkeys(r["key"][axis] for r in records)) if axis else [None]


def metric_plot(
    records: Sequence[dict], path: Path, *, x: str, y: str, series: str | None = None, panel: str | None = None,
    title: str, xlabel: str, ylabel: str, x_format: Callable[[Any], str] = str, share_y: bool = True,
) -> Path:
    """`metrics[y]` against the axis `x`; a line per level of `series`, a panel per level of `panel`."""
    plt = _pyplot()
    panels = _levels(records, panel)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False, sharey=share_y)
    xs = _levels(records, x)
    for ax, panel_level in zip(axes[0], panels):
        for i, line in enumerate(_levels(records, series)):
            points = {
                r["key"][x]: r["metrics"][y] for r in records
                if (panel is None or r["key"][panel] == panel_level) and (series is None or r["key"][series] == line)
            }
            at = [i for i, level in enumerate(xs) if points.get(level) is not None]
            ax.plot(at, [points[xs[j]] for j in at], label=str(line) if series else None, **_style(i))
        ax.set_xticks(range(len(xs)), [x_format(v) for v in xs])
        ax.set_xlabel(xlabel)
        ax.set_title(f"{panel} {panel_level}" if panel else title, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[0] if not share_y else axes[0][:1]:
        ax.set_ylabel(ylabel)
    if series:
        axes[0][-1].legend(fontsize=8, title=series)
    if panel:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, plt, path)


def layer_plot(
    records: Sequence[dict], path: Path, *, fields: Sequence[tuple[str, str]], label: Callable[[dict], str], title: str,
) -> Path:
    """Per MoE layer: one panel per (field, ylabel) of `layers`, a line per record."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(fields), figsize=(5.2 * len(fields), 3.6), squeeze=False)
    for ax, (field, ylabel) in zip(axes[0], fields):
        for i, record in enumerate(records):
            rows = [(c, row[field]) for c, row in enumerate(record["layers"]) if row.get(field) is not None]
            if rows:
                ax.plot([c for c, _ in rows], [v for _, v in rows], label=label(record), **_style(i))
        ax.set_xlabel("MoE layer")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, plt, path)


def grouped_bars(panels: dict[str, dict[str, Sequence[float | None]]], series: Sequence[str], path: Path, *,
                 title: str, ylabel: str, percent: bool = False) -> Path:
    """One panel per key of `panels`; in each, a group of bars per row, one bar per `series`
    (None: no bar). `percent`: values are shares, labelled as percentages."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), sharey=True, squeeze=False)
    width = 0.8 / len(series)
    for ax, (panel, rows) in zip(axes[0], panels.items()):
        for i, name in enumerate(series):
            xs = [r + (i - (len(series) - 1) / 2) * width for r, values in enumerate(rows.values()) if values[i] is not None]
            ys = [values[i] for values in rows.values() if values[i] is not None]
            ax.bar(xs, ys, width, label=name)
        ax.set_xticks(range(len(rows)), list(rows), rotation=35, ha="right", fontsize=8)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_title(panel, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        if percent:
            ax.yaxis.set_major_formatter(lambda v, _: f"{v:.0%}")
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, plt, path)


def _save(fig, plt, path: Path) -> Path:
    make_folder(path.parent, "figures folder")
    try:
        with atomic_output(path, "figure") as f:  # a failure leaves an older figure, not half a new one
            fig.savefig(f, format=path.suffix.lstrip(".") or "png", dpi=110)
    finally:
        plt.close(fig)
    return path
