"""Ablation (e): hardware: the host link at PCIe 3, 4 and 5, for the named systems.

The A6000 profile's compute with its host link replaced by PCIe 3.0, 4.0 and 5.0 x16 effective
rates (pinned copies: about half of each generation's doubling is lost to protocol overhead at
small transfers, so 12 / 25 / 50 GB/s), per budget. How much each system gains from a faster link
says how much of its latency is copying.

    python experiments/ablate_hardware.py           # default size (~1 min)
    python experiments/ablate_hardware.py --toy

Simulator only: the engine copies over this machine's own link (emulated at cache.link_gbps).
"""

from __future__ import annotations

if __name__ == "__main__":  # before the imports below (seconds): a Ctrl-C while they load is one line too
    from moepic import interrupts

    interrupts.install_early(prefix="")

from pathlib import Path

from moepic.experiments.ablation import Ablation, Column, script
from moepic.experiments.grid import choices, sweep, systems
from moepic.experiments.plots import metric_plot

HERE = Path(__file__).resolve().parent
LINKS = {"pcie3": 12.0, "pcie4": 25.0, "pcie5": 50.0}
SYSTEMS = ("on-demand-lru", "pre-gated", "adapmoe", "moe-infinity", "moepic", "oracle")
BUDGETS = (0.125, 0.25, 0.5)


def plots(records: list[dict], out: Path) -> list[Path]:
    return [
        metric_plot(records, out / "latency_vs_link.png", x="link", y="ms_per_token", series="system", panel="budget",
                    title="decode latency against the host link", xlabel="host link", ylabel="ms / token"),
        metric_plot(records, out / "latency_vs_budget.png", x="budget", y="ms_per_token", series="system", panel="link",
                    title="decode latency against the budget, per system", xlabel="expert budget (share of all expert bytes)",
                    ylabel="ms / token", x_format=lambda b: f"{b:.1%}"),
    ]


ABLATION = Ablation(
    name="hardware",
    title="Host link PCIe 3 / 4 / 5 (A6000 compute) × systems × budgets",
    axes=(
        sweep("budget", "cache.budget", BUDGETS), systems(SYSTEMS),
        choices("link", {name: [f"workload.link_gbps={gbps}"] for name, gbps in LINKS.items()}),
    ),
    toy_axes=(sweep("budget", "cache.budget", (0.25,)), systems(("on-demand-lru", "moepic")),
              choices("link", {name: [f"workload.link_gbps={gbps}"] for name, gbps in LINKS.items()})),
    columns=(
        Column("ms_per_token", "ms/token", ".1f"), Column("exposed_copy_ms_per_token", "exposed ms", ".1f"),
        Column("expert_hit_rate", "hit rate", ".3f"), Column("policy", "policy", "s"),
    ),
    ratio=("link", "pcie4"),
    plots=plots,
)

if __name__ == "__main__":
    script(ABLATION, HERE / "configs" / "base.yaml", default_out=HERE / "results" / "hardware")
