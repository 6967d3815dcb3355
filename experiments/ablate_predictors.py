"""Ablation (c): predictors × horizon: recall, exposed copy time, predictor cost.

The predictors must run for real, so the workload is recorded here: the bundled model generates
from held-out KJV prompts (the second half of the text) with its router inputs kept, and the
simulator replays gate lookahead and the mlp on them; `--backend engine` runs the same requests
through the real engine instead. The mlp is trained once (cached) on the first half of the text.
The host link is slowed to 0.5 GB/s so that a whole-expert copy takes about 3× a layer's
compute, the paper's regime (at PCIe 4 this model's copies hide behind anything).
Layout fixed (θ 0.5, even split, LCP) so only prediction differs; a deeper horizon also takes
staging buffers from the cache (k′ per layer ahead).

    python experiments/ablate_predictors.py      # default size (~1 min, plus ~20 s to train the mlp once)
    python experiments/ablate_predictors.py --toy
    python experiments/ablate_predictors.py --backend engine   # measured on this CPU, emulated link
"""

from __future__ import annotations

if __name__ == "__main__":  # before the imports below (seconds): a Ctrl-C while they load is one line too
    from moepic import interrupts

    interrupts.install_early(prefix="")

import sys
from pathlib import Path

from moepic.experiments.ablation import Ablation, Column, script
from moepic.experiments.grid import choices, sweep
from moepic.experiments.plots import layer_plot, metric_plot

HERE = Path(__file__).resolve().parent
HORIZONS = (1, 2, 3)
BUDGETS = (0.25, 0.5)


def mlp_dir(toy: bool) -> Path:
    from moepic.default_model import cache_root

    return cache_root() / "experiments" / ("mlp-kjv-h3-toy" if toy else "mlp-kjv-h3")


def train_mlp(toy: bool) -> None:
    """The mlp predictor for the bundled model, horizon 3, on the first half of the held-out text."""
    from moepic.datasets import DATASETS
    from moepic.commands.train_predictor import run_train_predictor

    out = mlp_dir(toy)
    if (out / "predictor.json").is_file():
        return
    out.mkdir(parents=True, exist_ok=True)
    text = DATASETS["kjv-heldout"].read_text()
    first_half = out / "train.txt"
    first_half.write_text(text[: len(text) // 2])
    print(f"training the mlp predictor into {out} …", file=sys.stderr)
    size = dict(max_tokens=512, epochs=20, width=16) if toy else dict(max_tokens=8000)
    run_train_predictor(None, traces=[], text_file=str(first_half), out=str(out), horizon=max(HORIZONS), progress=not toy, **size)


def predictors(toy: bool):
    return choices("predictor", {
        "none": ["cache.predictor.name=none"],
        "gate_lookahead": ["cache.predictor.name=gate_lookahead"],
        "mlp": ["cache.predictor.name=mlp", f"cache.predictor.path={mlp_dir(toy)}"],
        "oracle": ["cache.predictor.name=oracle"],
    })


def plots(records: list[dict], out: Path) -> list[Path]:
    predicting = [r for r in records if r["key"]["predictor"] != "none"]
    panel = "budget" if "budget" in records[0]["key"] else None
    common = dict(x="horizon", series="predictor", panel=panel, xlabel="horizon (MoE layers ahead)")
    first = [r for r in predicting if r["key"]["horizon"] == 1 and r["key"].get("budget") == predicting[0]["key"].get("budget")]
    return [
        metric_plot(predicting, out / "recall_vs_horizon.png", y="prediction_recall", title="recall (union over sources)",
                    ylabel="recall", **common),
        metric_plot(records, out / "latency_vs_horizon.png", y="ms_per_token", title="decode latency",
                    ylabel="ms / token", **common),
        metric_plot(records, out / "exposed_vs_horizon.png", y="exposed_copy_ms_per_token", title="exposed copy time",
                    ylabel="exposed copy ms / token", **common),
        layer_plot(first, out / "recall_per_layer.png",
                   fields=[("recall", "recall, one layer ahead")], label=lambda r: r["key"]["predictor"],
                   title="recall per MoE layer"),
    ]


def _keep(key: dict) -> bool:
    return key["predictor"] != "none" or key["horizon"] == 1  # no predictor: nothing ahead to vary


def _horizon(key: dict) -> list[str]:
    return [] if key["predictor"] == "none" else [f"cache.predictor.horizon={key['horizon']}"]


ABLATION = Ablation(
    name="predictors",
    title="Predictors × horizon per budget (bundled model, recorded KJV routing, 0.5 GB/s link, θ 0.5, LCP)",
    # Built when the script runs: the mlp's folder is under the cache folder of that moment
    # (MOEPIC_CACHE_DIR), which a test or a user may set after importing this script.
    axes=lambda: (sweep("budget", "cache.budget", BUDGETS), predictors(False), choices("horizon", {h: [] for h in HORIZONS})),
    toy_axes=lambda: (sweep("budget", "cache.budget", (0.25,)), predictors(True), choices("horizon", {h: [] for h in (1, 2)})),
    keep=_keep,
    derive=_horizon,
    columns=(
        Column("ms_per_token", "ms/token", ".3f"), Column("exposed_copy_ms_per_token", "exposed ms", ".3f"),
        Column("prediction_recall", "recall", ".3f"), Column("prediction_precision", "precision", ".3f"),
        Column("predictor_ms_per_token", "predictor ms", ".3f"), Column("expert_hit_rate", "hit rate", ".3f"),
        Column("cache_mib", "cache MiB", ".1f"),
    ),
    overrides=(
        "workload.source=recorded", "workload.model_shape=bundled", "workload.link_gbps=0.5",
        "workload.recorded.requests=8", "workload.recorded.new_tokens=48",
        "configurator=null", "cache.theta=0.5",
    ),
    toy=("workload.recorded.requests=2", "workload.recorded.new_tokens=8", "workload.recorded.prompt_tokens=16"),
    # The workload is already what the engine runs; its link is this CPU's, emulated at the base's
    # cache.link_gbps (0.15 GB/s: a whole expert ≈ 3× a layer's compute here).
    engine=("workload.link_gbps=null",),
    prepare=train_mlp,
    ratio=("predictor", "oracle"),
    plots=plots,
)

if __name__ == "__main__":
    script(ABLATION, HERE / "configs" / "base.yaml", default_out=HERE / "results" / "predictors")
