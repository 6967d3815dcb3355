"""Ablation (d): the configurator against a uniform split, across budgets ("same latency at half the VRAM").

Per budget, each configurator chooses per-layer cache sizes and θ on the latency model for the
trace: `uniform` gives every layer the same bytes at θ 0.5 (the baseline to beat), `moepic` is the
paper's divide and conquer with a fixed point on θ, `dp` the exact dynamic program. The summary
line reads the VRAM uniform needs to match moepic's latency off the uniform curve.

    python experiments/ablate_configurator.py       # default size (~1 min)
    python experiments/ablate_configurator.py --toy
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moepic.experiments.ablation import Ablation, Column, main
from moepic.experiments.grid import choices, sweep
from moepic.experiments.plots import layer_plot, metric_plot

HERE = Path(__file__).resolve().parent
BUDGETS = (0.0625, 0.125, 0.1875, 0.25, 0.375, 0.5, 0.625, 0.75)
CONFIGURATORS = choices("configurator", {
    "uniform": ["configurator.name=uniform", "configurator.theta=0.5"],
    "moepic": ["configurator.name=moepic"],
    "dp": ["configurator.name=dp"],
})


def matching_budget(records: list[dict], budget: float, ms: float, configurator: str = "uniform") -> float | None:
    """The budget at which `configurator`'s latency (linear between measured budgets) falls to `ms`."""
    curve = sorted((r["key"]["budget"], r["metrics"]["ms_per_token"]) for r in records if r["key"]["configurator"] == configurator)
    budgets, latency = np.array([b for b, _ in curve]), np.array([m for _, m in curve])
    if len(curve) < 2 or not latency.min() <= ms <= latency.max():
        return None
    return float(np.interp(ms, latency[::-1], budgets[::-1]))  # latency falls as the budget grows


def summary(records: list[dict]) -> str:
    lines = ["| budget | moepic ms/token | uniform needs | VRAM ratio |", "| --- | --- | --- | --- |"]
    for r in records:
        if r["key"]["configurator"] != "moepic":
            continue
        budget, ms = r["key"]["budget"], r["metrics"]["ms_per_token"]
        needed = matching_budget(records, budget, ms)
        best = min(r["metrics"]["ms_per_token"] for r in records if r["key"]["configurator"] == "uniform")
        if needed is not None:
            lines.append(f"| {budget:.2%} | {ms:.1f} | {needed:.2%} | {needed / budget:.2f}× |")
        elif ms < best:
            lines.append(f"| {budget:.2%} | {ms:.1f} | never: uniform's best is {best:.1f} ms | – |")
        else:
            lines.append(f"| {budget:.2%} | {ms:.1f} | less than the sweep's least | – |")
    return "VRAM a uniform split needs to match moepic's latency:\n\n" + "\n".join(lines)


def plots(records: list[dict], out: Path) -> list[Path]:
    at = [r for r in records if r["key"]["budget"] == 0.25] or records[: len(CONFIGURATORS.levels)]
    return [
        metric_plot(records, out / "latency_vs_budget.png", x="budget", y="ms_per_token", series="configurator",
                    title="decode latency: configurator vs uniform", xlabel="expert budget (share of all expert bytes)",
                    ylabel="ms / token", x_format=lambda b: f"{b:.1%}"),
        layer_plot(at, out / "allocation_per_layer.png",
                   fields=[("cache_mib", "cache MiB"), ("theta", "θ"), ("hit_rate", "hit rate")],
                   label=lambda r: r["key"]["configurator"], title=f"per-layer budget, θ and hit rate at {at[0]['key']['budget']:.1%}"),
    ]


ABLATION = Ablation(
    name="configurator",
    title="Configurator vs uniform across budgets (LCP, gate prefetch)",
    axes=(CONFIGURATORS, sweep("budget", "cache.budget", BUDGETS)),
    toy_axes=(CONFIGURATORS, sweep("budget", "cache.budget", (0.125, 0.25, 0.5))),
    columns=(
        Column("ms_per_token", "ms/token", ".1f"), Column("expert_hit_rate", "hit rate", ".3f"),
        Column("mib_loaded_per_token", "MiB/token", ".1f"), Column("cache_mib", "cache MiB", ".0f"),
        Column("configure_s", "configure s", ".2f"),
    ),
    ratio=("configurator", "uniform"),
    plots=plots,
    summary=summary,
)

if __name__ == "__main__":
    main(ABLATION, HERE / "configs" / "base.yaml", default_out=HERE / "results" / "configurator")
