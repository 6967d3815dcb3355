"""Ablation (a): cache policies × budgets: hit rate, bytes per token, latency.

Each policy runs on the same layout (θ 0.5, the budget split evenly over the MoE layers, gate
prefetch at the base's recall), so only the replacement decision differs. Belady sees the
future: the bound for any online policy at that layout.

    python experiments/ablate_policies.py                  # the shared Mixtral gsm8k trace, A6000 profile
    python experiments/ablate_policies.py --toy            # a small synthetic trace (seconds)
    python experiments/ablate_policies.py --backend engine # the bundled model through the real engine
"""

from __future__ import annotations

if __name__ == "__main__":  # before the imports below (seconds): a Ctrl-C while they load is one line too
    from moepic import interrupts

    interrupts.install_early(prefix="")

from pathlib import Path

from moepic.experiments.ablation import Ablation, Column, script
from moepic.experiments.grid import choices, sweep
from moepic.experiments.plots import layer_plot, metric_plot

HERE = Path(__file__).resolve().parent
POLICIES = ("lru", "lfu", "lcp", "belady")
BUDGETS = (0.125, 0.25, 0.5)
SHARED = "../shared/traces/mixtral-8x7b-instruct-fp8"
TRACES = choices("trace", {name: [f"workload.trace={SHARED}/{name}_2_routing.jsonl"] for name in ("gsm8k", "humaneval")})


def plots(records: list[dict], out: Path) -> list[Path]:
    share = lambda b: f"{b:.1%}"  # noqa: E731
    panel = "trace" if "trace" in records[0]["key"] else None
    common = dict(x="budget", series="policy", panel=panel, xlabel="expert budget (share of all expert bytes)", x_format=share)
    first_trace = records[0]["key"].get("trace")
    middle = [r for r in records if r["key"]["budget"] == 0.25 and r["key"].get("trace") == first_trace] or records[:1]
    return [
        metric_plot(records, out / "latency_vs_budget.png", y="ms_per_token", title="decode latency by policy", ylabel="ms / token", **common),
        metric_plot(records, out / "hit_rate_vs_budget.png", y="expert_hit_rate", title="expert hit rate by policy", ylabel="hit rate", **common),
        layer_plot(middle, out / "hit_rate_per_layer.png", fields=[("hit_rate", "hit rate")],
                   label=lambda r: r["key"]["policy"], title=f"hit rate per MoE layer at budget {middle[0]['key']['budget']:.1%}" + (f" ({first_trace})" if first_trace else "")),
    ]


ABLATION = Ablation(
    name="policies",
    title="Cache policies × budgets (θ 0.5, even split, gate prefetch)",
    axes=(TRACES, sweep("policy", "cache.policy.name", POLICIES), sweep("budget", "cache.budget", BUDGETS)),
    toy_axes=(sweep("policy", "cache.policy.name", POLICIES), sweep("budget", "cache.budget", BUDGETS)),
    columns=(
        Column("ms_per_token", "ms/token", ".1f"), Column("expert_hit_rate", "hit rate", ".3f"),
        Column("mib_loaded_per_token", "MiB/token", ".1f"), Column("exposed_copy_ms_per_token", "exposed ms", ".1f"),
    ),
    overrides=("configurator=null", "cache.theta=0.5"),
    ratio=("policy", "lcp"),
    plots=plots,
)

if __name__ == "__main__":
    script(ABLATION, HERE / "configs" / "base.yaml", default_out=HERE / "results" / "policies")
