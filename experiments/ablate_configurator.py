"""Ablation (d): the configurator against a uniform split, across budgets ("same latency at half the VRAM").

Per budget, each configurator chooses per-layer cache sizes and θ on the latency model for the
trace: `uniform` gives every layer the same bytes at θ 0.5 (the baseline to beat; `uniform-whole`
the same at θ 1, whole experts, a harder one at large budgets), `moepic` is the paper's divide and
conquer with a fixed point on θ, `dp` the exact dynamic program. The summary reads the VRAM a
uniform split needs to match moepic's latency off the uniform curves.

    python experiments/ablate_configurator.py       # default size (~1 min)
    python experiments/ablate_configurator.py --toy
"""

from __future__ import annotations

if __name__ == "__main__":  # before the imports below (seconds): a Ctrl-C while they load is one line too
    from moepic import interrupts

    interrupts.install_early(prefix="")

from pathlib import Path

import numpy as np

from moepic.experiments.ablation import Ablation, Column, script
from moepic.experiments.grid import choices, sweep
from moepic.experiments.plots import layer_plot, metric_plot

HERE = Path(__file__).resolve().parent
BUDGETS = (0.0625, 0.125, 0.1875, 0.25, 0.375, 0.5, 0.625, 0.75)
CONFIGURATORS = choices("configurator", {
    "uniform": ["configurator.name=uniform", "configurator.theta=0.5"],
    "uniform-whole": ["configurator.name=uniform", "configurator.theta=1.0"],  # whole experts, even split
    "moepic": ["configurator.name=moepic"],
    "dp": ["configurator.name=dp"],
})
UNIFORM = ("uniform", "uniform-whole")


def curve(records: list[dict], configurators: tuple[str, ...]) -> list[tuple[float, float]]:
    """(budget, ms/token) of the fastest of `configurators` at each budget."""
    best: dict[float, float] = {}
    for r in records:
        if r["key"]["configurator"] in configurators:
            budget, ms = r["key"]["budget"], r["metrics"]["ms_per_token"]
            best[budget] = min(ms, best.get(budget, ms))
    return sorted(best.items())


def matching_budget(points: list[tuple[float, float]], ms: float, budget: float) -> str:
    """The budget at which the curve (linear between measured budgets) falls to `ms`, and its ratio to `budget`."""
    budgets, latency = np.array([b for b, _ in points]), np.array([m for _, m in points])
    if ms < latency.min():
        return f"never (its best: {latency.min():.1f} ms)"
    if len(points) < 2 or ms > latency.max():
        return "below the sweep"
    needed = float(np.interp(ms, latency[::-1], budgets[::-1]))  # latency falls as the budget grows
    return f"{needed:.2%} ({needed / budget:.2f}×)"


def summary(records: list[dict]) -> str:
    """The VRAM a uniform split needs for moepic's latency: at θ 0.5, and at its better θ (0.5 or 1) per budget."""
    half, either = curve(records, ("uniform",)), curve(records, UNIFORM)
    lines = ["| budget | moepic ms/token | uniform θ 0.5 needs | best uniform (θ 0.5 or 1) needs |", "| --- | --- | --- | --- |"]
    for budget, ms in curve(records, ("moepic",)):
        lines.append(f"| {budget:.2%} | {ms:.1f} | {matching_budget(half, ms, budget)} | {matching_budget(either, ms, budget)} |")
    return "VRAM a uniform split needs to match moepic's latency (read off its curve):\n\n" + "\n".join(lines)


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
    script(ABLATION, HERE / "configs" / "base.yaml", default_out=HERE / "results" / "configurator")
