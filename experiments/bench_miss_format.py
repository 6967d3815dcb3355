"""Benchmark: misses served from a low-bit copy (`cache.miss_format`, HOBBIT-style), what it costs in
quality and what it saves in bytes and time.

1. Quality and bytes, measured (the bundled model on this CPU): kjv-heldout scored a token at a
   time through the offloading engine (analysis/perplexity.py), as generation feeds it. Rows: the
   resident model, its int4 self (every expert low-bit), the engine at each budget without and
   with an int4 miss format. Columns: perplexity and its change, top-1 agreement with the
   resident model, the share of expert computations served low-bit (misses / activations), and
   the MiB a token moved host → device (demand, prefetches and the full-precision tops filled
   behind).
2. Time, simulated (Mixtral-8x7B, A6000 profile, the shared routing traces, 25 % of the expert
   bytes): LRU with a gate-lookahead prefetch (θ 1, mixtral-offloading's shape), LCP at θ 0.5 and
   moepic configured by its latency model (which prices the miss format), each without and with an
   int4 miss format.

Run:  python experiments/bench_miss_format.py [--max-tokens 3000] [--json FILE] [--plot FILE.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import attrs
import torch

from moepic.analysis.perplexity import score
from moepic.checkpoint.load import load_model
from moepic.core.moe import ResidentExperts
from moepic.datasets import dataset_path
from moepic.default_model import default_model_dir
from moepic.policies import POLICIES
from moepic.quant import build_format
from moepic.runtime.offload import offloaded_experts
from moepic.tokenizer import TextCodec

INT4 = {"name": "int4", "group_size": 64}
TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces" / "mixtral-8x7b-instruct-fp8"


def quality(max_tokens: int, window: int, budgets: list[float], theta: float) -> dict:
    folder = default_model_dir()
    ids = TextCodec.from_folder(folder).encode(dataset_path("kjv-heldout").read_text(encoding="utf-8"))[:max_tokens]
    model, fmt = load_model(folder), build_format(INT4)
    rows = {}
    reference = score(model, ids, window, experts=ResidentExperts(model.weights), desc="resident")
    rows["resident bf16"] = _row(reference, reference)
    int4 = load_model(folder, expert_format=fmt)
    rows["resident int4 (every expert low-bit)"] = _row(score(int4, ids, window, experts=ResidentExperts(int4.weights), desc="int4"),
                                                       reference, low_bit_share=1.0)
    policy = POLICIES.default_config()
    for budget in budgets:
        for miss in (None, fmt):
            engine = offloaded_experts(model, budget, theta, policy, miss_format=miss)
            label = f"offloaded {budget:.0%}" + (" + int4 misses" if miss else "")
            scored = score(model, ids, window, experts=engine, desc=label)
            report = engine.report()
            moved = engine.host_to_device_bytes / len(ids)  # every token fed through the engine
            rows[label] = _row(scored, reference, low_bit_share=report["misses"] / report["activations"] if miss else 0.0,
                               mib_per_token=moved / 2**20, hit_rate=report["expert_hit_rate"])
    return {"tokens": reference.tokens, "window": window, "theta": theta, "policy": policy.name, "rows": rows}


def _row(scored, reference, **extra) -> dict:
    return {"perplexity": scored.perplexity, "change": scored.perplexity / reference.perplexity - 1,
            "top1": scored.agreement(reference)} | extra


def simulated(recall: float) -> dict:
    from moepic.perfmodel.hardware import load_profile
    from moepic.sim.baseline import load_baseline
    from moepic.sim.run import Testbed, run_setup
    from moepic.sim.shapes import model_shape
    from moepic.tracing import load_any_trace

    traces = sorted(TRACES.glob("*.jsonl"))
    if not traces:
        return {}
    shape, hw = model_shape("mixtral-8x7b"), load_profile("a6000")
    lru = load_baseline("lru-prefetch")
    setups = {"lru-prefetch θ 1": lru, "lcp θ 0.5 + prefetch": attrs.evolve(lru, theta=0.5, policy=POLICIES.default_config()),
              "moepic (configured)": load_baseline("moepic")}
    out = {}
    for path in traces:
        trace = load_any_trace(path, num_experts=shape.spec.moe.num_experts)
        testbed = Testbed(trace=trace, shape=shape, hw=hw, budget=0.25, recall=recall)
        rows = {}
        for name, setup in setups.items():
            for miss in (None, INT4):
                run = run_setup(attrs.evolve(setup, miss_format=None if miss is None else build_format(miss).config), testbed)
                s = run.result.summary()
                tokens = max(1, trace.num_tokens)  # every token's copies, the prompts' too
                moved = run.result.demand_bytes + run.result.prefetch_bytes + run.result.miss_fill_bytes
                rows[name + (" + int4 misses" if miss else "")] = {
                    "ms_per_token": s["ms_per_token"], "hit_rate": s["expert_hit_rate"],
                    "mib_per_token": moved / tokens / 2**20, "fill_mib_per_token": run.result.miss_fill_bytes / tokens / 2**20}
        out[path.stem] = rows
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=3000)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--theta", type=float, default=0.5)
    parser.add_argument("--recall", type=float, default=0.85, help="gate lookahead's stand-in recall (simulated part)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path, help="save the bytes and the simulated ms/token as bar charts here")
    args = parser.parse_args()
    torch.manual_seed(0)
    measured = quality(args.max_tokens, args.window, args.budgets, args.theta)
    print(f"Bundled model, kjv-heldout, {measured['tokens']} tokens scored a token at a time (windows of {measured['window']}), "
          f"policy {measured['policy']}, θ {measured['theta']} (CPU, measured)")
    print(f"{'setup':<40} {'ppl':>8} {'Δ':>8} {'top-1':>7} {'low-bit':>8} {'hit rate':>9} {'MiB/token':>10}")
    for name, r in measured["rows"].items():
        print(f"{name:<40} {r['perplexity']:>8.3f} {r['change']:>+8.2%} {r['top1']:>7.1%} {r.get('low_bit_share', 0):>8.1%} "
              f"{r.get('hit_rate', 1.0):>9.1%} {r.get('mib_per_token', 0.0):>10.3f}")
    sim = simulated(args.recall)
    for trace, rows in sim.items():
        print(f"\nMixtral-8x7B on a6000 (simulated), {trace}, 25 % of the expert bytes, recall {args.recall}")
        print(f"{'setup':<36} {'ms/token':>9} {'hit rate':>9} {'MiB/token':>10} {'of it, fills':>13}")
        for name, r in rows.items():
            print(f"{name:<36} {r['ms_per_token']:>9.1f} {r['hit_rate']:>9.1%} {r['mib_per_token']:>10.0f} "
                  f"{r['fill_mib_per_token']:>13.0f}")
    if not sim:
        print(f"\n(simulated part skipped: no traces under {TRACES})")
    if args.json:
        args.json.write_text(json.dumps({"measured": measured, "simulated": sim}, indent=2) + "\n")
    if args.plot:
        plot(measured, sim, args.plot)


def plot(measured: dict, sim: dict, path: Path) -> None:
    """MiB a token moved, measured (bundled model), and ms/token per setup, simulated (each trace)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    offloaded = {name: r for name, r in measured["rows"].items() if "mib_per_token" in r}
    fig, axes = plt.subplots(1, 1 + len(sim), figsize=(6 * (1 + len(sim)), 4), squeeze=False)
    ax = axes[0][0]
    ax.barh(list(offloaded), [r["mib_per_token"] for r in offloaded.values()], color="tab:green")
    ax.invert_yaxis()
    ax.set_xlabel("MiB moved a token (bundled model, measured)")
    for ax, (trace, rows) in zip(axes[0][1:], sim.items()):
        colors = ["tab:orange" if "int4 misses" in name else "tab:blue" for name in rows]
        ax.barh(list(rows), [r["ms_per_token"] for r in rows.values()], color=colors)
        ax.invert_yaxis()
        ax.set_xlabel("ms / token (Mixtral-8x7B, A6000, simulated)")
        ax.set_title(trace)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
