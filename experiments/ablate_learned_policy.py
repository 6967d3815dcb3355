"""Ablation (g): the learned cache policy against LRU, LFU, LCP and Belady, held out.

`learned` is fit (moepic train-policy's fit) on the *other* shared Mixtral trace than the one it
runs on: trained on humaneval for the gsm8k cells and on gsm8k for the humaneval cells, never on
what it is scored on; `learned-recency` and `learned-recency-frequency` are fit on those feature
groups only, `learned-64-tokens` on the other trace's first 64 tokens (the training-set size).
`learned-generic` is the built-in model, trained on the bundled model's own routing (it has seen no
Mixtral routing at all). The `bundled` rows run the routing the bundled model records here on 8
prompts from kjv-heldout's second half (workload.source recorded: with router inputs, so gate
lookahead runs for real); its learned models are fit on the model's routing of 16 prompts from the
first half, other requests than those scored (the built-in model was trained on that same half, so
there `learned-generic` is `learned` without the shape check). Layout as in ablation (a) (θ 0.5, the
budget split evenly, gate prefetch), so only the replacement decision differs. Under the table: the
share of the hit-rate gap between the best of LRU/LFU/LCP and Belady that each learned model closes.

    python experiments/ablate_learned_policy.py          # both shared traces and the bundled model, A6000 profile (~2 min)
    python experiments/ablate_learned_policy.py --toy    # a synthetic trace (learned: fit on another seed)
"""

from __future__ import annotations

if __name__ == "__main__":  # before the imports below (seconds): a Ctrl-C while they load is one line too
    from moepic import interrupts

    interrupts.install_early(prefix="")

from pathlib import Path

from moepic.experiments.ablation import Ablation, Column, script
from moepic.experiments.grid import choices, sweep
from moepic.experiments.plots import metric_plot
from moepic.policies.learned import ONLINE

HERE = Path(__file__).resolve().parent
SHARED = "../shared/traces/mixtral-8x7b-instruct-fp8"
NAMES = ("gsm8k", "humaneval")
OTHER = {"gsm8k": "humaneval", "humaneval": "gsm8k", "bundled": "bundled-first-half"}
BUDGETS = (0.125, 0.25, 0.5)
# The held-out fits (their files: `_held_out_model`): the feature groups and training tokens of each.
VARIANTS = {
    "learned": {},
    "learned-recency": {"groups": ("recency",)},
    "learned-recency-frequency": {"groups": ("recency", "frequency")},
    "learned-64-tokens": {"tokens": 64},
}
POLICIES = choices("policy", {
    **{name: [f"cache.policy.name={name}"] for name in (*ONLINE, "belady")},
    **{name: ["cache.policy.name=learned"] for name in VARIANTS},
    "learned-generic": ["cache.policy.name=learned"],  # the built-in model
})
TRACES = choices("trace", {
    **{name: [f"workload.trace={SHARED}/{name}_2_routing.jsonl"] for name in NAMES},
    "bundled": ["workload.source=recorded", "workload.model_shape=bundled", "workload.recorded.requests=8",
                "workload.recorded.new_tokens=64"],
})


def model_path(trained_on: str, variant: str) -> Path:
    from moepic.default_model import cache_root

    return cache_root() / "experiments" / "learned-policy" / f"{variant}-trained-on-{trained_on}.json"


def train(toy: bool) -> None:
    """The held-out models: each variant on each shared trace and on the bundled model's first-half routing
    (toy: on a synthetic trace of another seed)."""
    from moepic.policies.learned import train_reuse_model
    from moepic.tracing import load_any_trace
    from moepic.tracing.synthetic import select_tokens

    if toy:
        from moepic.experiments.backends import synthetic_trace
        from moepic.experiments.config import SyntheticConfig, WorkloadConfig
        from moepic.sim.shapes import model_shape

        traces = {"toy-seed-1": synthetic_trace(WorkloadConfig(source="synthetic", synthetic=SyntheticConfig(tokens=96, sequences=2, seed=1)),
                                                model_shape("mixtral-8x7b"))}
    else:
        from moepic.default_model import default_model_dir
        from moepic.experiments.backends import training_routing

        traces = {name: load_any_trace(f"{SHARED}/{name}_2_routing.jsonl", num_experts=8) for name in NAMES}
        traces["bundled-first-half"] = training_routing(str(default_model_dir()))
    for trained_on, trace in traces.items():
        for variant, fit in VARIANTS.items():
            path = model_path(trained_on, variant)
            path.parent.mkdir(parents=True, exist_ok=True)
            used = trace if "tokens" not in fit else select_tokens(trace, slice(0, fit["tokens"]))
            train_reuse_model([used], names=[trained_on], groups=fit.get("groups")).save(path)


def _held_out_model(key: dict) -> list[str]:
    if key["policy"] not in VARIANTS:
        return []
    trained_on = OTHER[key["trace"]] if "trace" in key else "toy-seed-1"
    return [f"cache.policy.path={model_path(trained_on, key['policy'])}"]


def gap_summary(records: list[dict]) -> str:
    """Per trace and budget: the share of the gap to Belady each learned model closes (learned.gap_closed)."""
    from moepic.policies.learned import gap_closed

    lines, cells = ["share of the hit-rate gap to Belady closed (vs the best of LRU/LFU/LCP):"], {}
    for r in records:
        key = (r["key"].get("trace", "toy"), r["key"]["budget"])
        cells.setdefault(key, {})[r["key"]["policy"]] = r["metrics"]["expert_hit_rate"]
    for (trace, budget), rates in cells.items():
        shares = {name: gap_closed(rates, name) for name in (*VARIANTS, "learned-generic")}
        closed = ", ".join(f"{name} {'n/a' if share is None else f'{share:+.0%}'}" for name, share in shares.items())
        best = max(rates[name] for name in ONLINE)
        lines.append(f"  {trace} at {budget:.1%}: best online {best:.3f}, belady {rates['belady']:.3f}; {closed}")
    return "\n".join(lines)


def plots(records: list[dict], out: Path) -> list[Path]:
    share = lambda b: f"{b:.1%}"  # noqa: E731
    panel = "trace" if "trace" in records[0]["key"] else None
    common = dict(x="budget", series="policy", panel=panel, xlabel="expert budget (share of all expert bytes)", x_format=share)
    return [
        metric_plot(records, out / "hit_rate_vs_budget.png", y="expert_hit_rate", title="expert hit rate, learned policy held out",
                    ylabel="hit rate", **common),
        metric_plot(records, out / "latency_vs_budget.png", y="ms_per_token", title="decode latency", ylabel="ms / token", **common),
    ]


ABLATION = Ablation(
    name="learned_policy",
    title="Learned policy (held out) × budgets (θ 0.5, even split, gate prefetch)",
    axes=(TRACES, POLICIES, sweep("budget", "cache.budget", BUDGETS)),
    toy_axes=(POLICIES, sweep("budget", "cache.budget", (0.25,))),
    derive=_held_out_model,
    prepare=train,
    columns=(
        Column("ms_per_token", "ms/token", ".1f"), Column("expert_hit_rate", "hit rate", ".3f"),
        Column("mib_loaded_per_token", "MiB/token", ".1f"), Column("exposed_copy_ms_per_token", "exposed ms", ".1f"),
    ),
    overrides=("configurator=null", "cache.theta=0.5"),
    ratio=("policy", "lcp"),
    summary=gap_summary,
    plots=plots,
)

if __name__ == "__main__":
    script(ABLATION, HERE / "configs" / "base.yaml", default_out=HERE / "results" / "learned_policy")
