"""Ablation (f): batch size × cache policies × budgets: hit rate, latency per stream, throughput

Continuous batching decodes B requests at once: one step routes a token of every running stream
and loads the union of their experts once (moepic/sim/steps.py). The shared traces' two long
sequences are cut into requests of 8 decode tokens (`workload.stream_tokens`), so up to 16 run side
by side: routing within a request stays real, while requests that run together are neighbouring
windows of the same two problems. Each cell keeps the layout of the policies ablation (θ 0.5, the
budget split evenly, gate prefetch at the base's recall, predictions merged by votes over a
step's tokens); Belady sees the future in the order the batch routes it.

    python experiments/ablate_batch.py                     # both shared Mixtral traces, A6000 profile
    python experiments/ablate_batch.py --toy               # a small synthetic trace (seconds)
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
BATCHES = (1, 2, 4, 8, 16)
POLICIES = ("lcp", "lru", "lfu", "belady")
BUDGETS = (0.25, 0.5)
STREAM_TOKENS = 8
SHARED = "../shared/traces/mixtral-8x7b-instruct-fp8"
TRACES = choices("trace", {name: [f"workload.trace={SHARED}/{name}_2_routing.jsonl"] for name in ("gsm8k", "humaneval")})


def _reference(record: dict, records: list[dict]) -> dict | None:
    """The batch-1 cell with every other level alike."""
    want = {**record["key"], "batch": 1}
    return next((r for r in records if r["key"] == want), None)


def side_by_side(records: list[dict]) -> str:
    """Per (trace, policy, budget): hit rate and throughput (× batch 1) at every batch, in one row."""
    batches = sorted({r["key"]["batch"] for r in records})
    others = [k for k in records[0]["key"] if k != "batch"]
    groups = list(dict.fromkeys(tuple(r["key"][k] for k in others) for r in records))
    lines = ["Hit rate · tokens/s × batch 1 (all streams together) · ms/token per stream × batch 1, by batch size:", "",
             "| " + " | ".join([*others, *(f"B={b}" for b in batches)]) + " |", "|" + " --- |" * (len(others) + len(batches))]
    for group in groups:
        cells = []
        for b in batches:
            record = next((r for r in records if r["key"]["batch"] == b and tuple(r["key"][k] for k in others) == group), None)
            reference = record and _reference(record, records)
            if record is None or reference is None:
                cells.append("–")
                continue
            m, m1 = record["metrics"], reference["metrics"]
            cells.append(f"{m['expert_hit_rate']:.3f} · {m['tokens_per_s'] / m1['tokens_per_s']:.2f}× · "
                         f"{m['ms_per_token'] / m1['ms_per_token']:.2f}×")
        lines.append("| " + " | ".join([*(str(v) for v in group), *cells]) + " |")
    return "\n".join(lines)


def plots(records: list[dict], out: Path) -> list[Path]:
    panel = "budget" if len({r["key"]["budget"] for r in records}) > 1 else None
    traces = list(dict.fromkeys(r["key"].get("trace") for r in records))
    figures = []
    for trace in traces:
        mine = [r for r in records if r["key"].get("trace") == trace]
        suffix, named = (f"_{trace}", f" ({trace})") if trace else ("", "")
        common = dict(x="batch", series="policy", panel=panel, xlabel="batch (streams decoded together)")
        figures += [
            metric_plot(mine, out / f"throughput_vs_batch{suffix}.png", y="tokens_per_s", title=f"tokens/s, all streams{named}",
                        ylabel="tokens / s", **common),
            metric_plot(mine, out / f"hit_rate_vs_batch{suffix}.png", y="expert_hit_rate",
                        title=f"hit rate per (step, expert) load{named}", ylabel="hit rate", **common),
        ]
    return figures


ABLATION = Ablation(
    name="batch",
    title=f"Batch size × cache policies × budgets (θ 0.5, even split, gate prefetch; requests of {STREAM_TOKENS} decode tokens)",
    axes=(TRACES, sweep("policy", "cache.policy.name", POLICIES), sweep("budget", "cache.budget", BUDGETS),
          sweep("batch", "workload.batch", BATCHES)),
    toy_axes=(sweep("policy", "cache.policy.name", ("lcp", "belady")), sweep("budget", "cache.budget", (0.25,)),
              sweep("batch", "workload.batch", (1, 4))),
    columns=(
        Column("expert_hit_rate", "hit rate", ".3f"), Column("ms_per_token", "ms/token (stream)", ".0f"),
        Column("ms_per_step", "ms/step", ".0f"), Column("tokens_per_s", "tokens/s", ".2f"),
        Column("mib_loaded_per_token", "MiB/token", ".0f"),
    ),
    overrides=("configurator=null", "cache.theta=0.5", f"workload.stream_tokens={STREAM_TOKENS}"),
    ratio=("batch", 1),
    plots=plots,
    summary=side_by_side,
)

if __name__ == "__main__":
    script(ABLATION, HERE / "configs" / "base.yaml", default_out=HERE / "results" / "batch")
