"""Ablation (b): the split ratio θ per budget: the U-curve.

θ = 0 caches nothing (every expert is copied whole, the cache only pays for staging); θ = 1 caches
whole experts (few of them). Between, more experts are partly resident and a hit copies only the
bottom. Each budget is split evenly over the MoE layers with one θ, LCP, gate prefetch; panels:
Mixtral-8x7B on its real gsm8k routing, and Qwen1.5-MoE-A2.7B on a synthetic trace with
Mixtral-fitted laws (small experts: a bottom hides behind compute far sooner).

    python experiments/ablate_theta.py          # default size (~1 min)
    python experiments/ablate_theta.py --toy
"""

from __future__ import annotations

if __name__ == "__main__":  # before the imports below (seconds): a Ctrl-C while they load is one line too
    from moepic import interrupts

    interrupts.install_early(prefix="")

from pathlib import Path

from moepic.experiments.ablation import Ablation, Column, script
from moepic.experiments.grid import choices, sweep
from moepic.experiments.plots import metric_plot

HERE = Path(__file__).resolve().parent
THETAS = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
BUDGETS = (0.125, 0.25, 0.5)
MODELS = choices("model", {
    "mixtral-8x7b": [],
    "qwen1.5-moe-a2.7b": ["workload.model_shape=qwen1.5-moe-a2.7b", "workload.source=synthetic", "workload.synthetic.tokens=600"],
})


def plots(records: list[dict], out: Path) -> list[Path]:
    panel = "model" if "model" in records[0]["key"] else None
    common = dict(x="theta", series="budget", panel=panel, xlabel="θ (share of each expert cached)", share_y=False)
    return [
        metric_plot(records, out / "theta_u_curve.png", y="ms_per_token", title="decode latency against θ, per budget",
                    ylabel="ms / token", **common),
        metric_plot(records, out / "theta_exposed.png", y="exposed_copy_ms_per_token", title="exposed copy time against θ",
                    ylabel="exposed copy ms / token", **common),
    ]


ABLATION = Ablation(
    name="theta",
    title="θ sweep per budget (even split, LCP, gate prefetch)",
    axes=(MODELS, sweep("budget", "cache.budget", BUDGETS), sweep("theta", "cache.theta", THETAS)),
    toy_axes=(sweep("budget", "cache.budget", (0.25,)), sweep("theta", "cache.theta", (0.0, 0.5, 1.0))),
    columns=(
        Column("ms_per_token", "ms/token", ".2f"), Column("expert_hit_rate", "hit rate", ".3f"),
        Column("mib_loaded_per_token", "MiB/token", ".1f"), Column("exposed_copy_ms_per_token", "exposed ms", ".2f"),
    ),
    overrides=("configurator=null",),
    ratio=("theta", 0.5),
    plots=plots,
)

if __name__ == "__main__":
    script(ABLATION, HERE / "configs" / "base.yaml", default_out=HERE / "results" / "theta")
