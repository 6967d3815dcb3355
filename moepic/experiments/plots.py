"""Figures written next to an ablation's results (matplotlib, imported here only). Side effects.

Two kinds cover the ablations: a metric against one axis, a line per level of another (and one
panel per level of a third), and a per-MoE-layer figure, a line per cell.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from moepic.errors import ConfigError


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError('plots need matplotlib: pip install -e ".[plot]"') from None
    return plt


def _levels(records: Sequence[dict], axis: str | None) -> list[Any]:
    return list(dict.fromkeys(r["key"][axis] for r in records)) if axis else [None]


def metric_plot(
    records: Sequence[dict], path: Path, *, x: str, y: str, series: str | None = None, panel: str | None = None,
    title: str, xlabel: str, ylabel: str, x_format: Callable[[Any], str] = str, y_scale: float = 1.0,
) -> Path:
    """`metrics[y]` against the axis `x`; a line per level of `series`, a panel per level of `panel`."""
    plt = _pyplot()
    panels = _levels(records, panel)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False, sharey=True)
    xs = _levels(records, x)
    for ax, panel_level in zip(axes[0], panels):
        for line in _levels(records, series):
            points = {
                r["key"][x]: r["metrics"][y] for r in records
                if (panel is None or r["key"][panel] == panel_level) and (series is None or r["key"][series] == line)
            }
            at = [i for i, level in enumerate(xs) if points.get(level) is not None]
            ax.plot(at, [points[xs[i]] * y_scale for i in at], marker="o", label=str(line) if series else None)
        ax.set_xticks(range(len(xs)), [x_format(v) for v in xs])
        ax.set_xlabel(xlabel)
        ax.set_title(f"{panel} {panel_level}" if panel else title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
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
        for record in records:
            rows = [row for row in record["layers"] if row.get(field) is not None]
            if rows:
                ax.plot([i for i, row in enumerate(record["layers"]) if row.get(field) is not None],
                        [row[field] for row in rows], marker=".", label=label(record))
        ax.set_xlabel("MoE layer")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, plt, path)


def _save(fig, plt, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
