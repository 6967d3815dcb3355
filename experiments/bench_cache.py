"""Benchmark: expert-cache policies by hit rate and bytes moved, and the engine's cost at full budget.

A script, not a test. Two tables in one run:

1. Trace replay. Each routing trace is replayed token by token through the same residency planner
   the engine uses (moepic/cache/replay.py), for every policy × budget × θ. A cell shows the hit rate
   (activated experts whose cached part was resident) and the host→device MiB per token. Budgets are
   global (cache + staging, as `--budget` means on the CLI), as fractions of all routed-expert bytes.
   Traces: the real Mixtral-8x7B traces in ../shared/traces (skipped with a note when absent; sized
   as bf16 Mixtral experts) and the bundled model's own routing of held-out KJV text.
   `static` is profiled on a *different* trace (the other Mixtral dataset; other KJV chunks), as a
   deployment would be; `belady` sees the replayed trace's future: the upper bound.
2. Engine decode time on the bundled model (CPU): dense vs offloaded configurations, alternated
   run by run with a warm-up first; medians over --repeats. Target at 100 % budget: ≤ 1.10× dense.

Run:  python experiments/bench_cache.py                 (full)
      python experiments/bench_cache.py --quick         (smoke: fewer cells, tokens, repeats)
      python experiments/bench_cache.py --plot hit_rates.png --json results.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from moepic.cache.layout import plan_layout
from moepic.cache.replay import replay_trace
from moepic.cache.stats import total
from moepic.checkpoint.load import load_model
from moepic.core.spec import ModelSpec, MoESpec, RopeSpec, RouterSpec
from moepic.default_model import default_model_dir
from moepic.policies import POLICIES, build_policy
from moepic.policies.belady import BeladyPolicy
from moepic.policies.static import StaticPolicy
from moepic.runtime.generation import generate
from moepic.runtime.offload import offloaded_experts
from moepic.tracing import RoutingTrace
from moepic.tracing.jsonl import load_jsonl_trace

SHARED_TRACES = Path(__file__).resolve().parents[1].parent / "shared" / "traces" / "mixtral-8x7b-instruct-fp8"
ORDER = ("lru", "lfu", "lcp", "random", "static", "belady")
POLICY_NAMES = [n for n in ORDER if n in POLICIES] + sorted(set(POLICIES) - set(ORDER))

# Mixtral-8x7B's routed experts (the traces carry routing only; the sizes are the real model's).
MIXTRAL = ModelSpec(
    model_type="mixtral", vocab_size=32000, hidden_size=4096, num_heads=32, num_kv_heads=8, head_dim=128,
    norm_eps=1e-5, rope=RopeSpec(theta=1e6), layer_kinds=("moe",) * 32,
    moe=MoESpec(num_experts=8, top_k=2, expert_ffn=14336, router=RouterSpec(kind="softmax_topk", renormalize=True)),
)


def policy(name: str, trace: RoutingTrace, profile: RoutingTrace):
    if name == "belady":
        return BeladyPolicy(future=trace)
    if name == "static":
        return StaticPolicy(profile=profile)
    return build_policy(POLICIES[name].config())


def traces(quick: bool) -> list[tuple[str, ModelSpec, int, RoutingTrace, RoutingTrace]]:
    """(label, spec, dtype bytes, trace, static's profile trace)."""
    out = []
    files = sorted(SHARED_TRACES.glob("*.jsonl")) if SHARED_TRACES.is_dir() else []
    if len(files) >= 2:
        loaded = {f.name.split("_")[0]: load_jsonl_trace(f) for f in files[:2]}
        (a, ta), (b, tb) = loaded.items()
        out += [(f"mixtral {a}", MIXTRAL, 2, ta, tb), (f"mixtral {b}", MIXTRAL, 2, tb, ta)]
    else:
        print(f"note: {SHARED_TRACES} not found: the Mixtral rows are skipped")
    model = load_model(default_model_dir())
    from moepic.analysis.route_text import trace_text
    from moepic.tokenizer import TextCodec

    text = (Path(__file__).resolve().parents[1] / "moepic" / "data" / "kjv-heldout.txt").read_text()
    codec = TextCodec.from_folder(default_model_dir())
    tokens = 512 if quick else 2048
    half = len(text) // 2
    own, _ = trace_text(model, codec, text[:half], chunk=256, max_tokens=tokens)
    profile, _ = trace_text(model, codec, text[half:], chunk=256, max_tokens=tokens)
    out.append(("kjv-moe-tiny kjv-heldout", model.spec, model.dtype.itemsize, own, profile))
    return out


def replay_table(quick: bool) -> tuple[str, list[dict]]:
    budgets = (0.125, 0.5) if quick else (0.125, 0.25, 0.5)
    thetas = (0.5, 1.0) if quick else (0.25, 0.5, 1.0)
    sources = traces(quick)
    rows, results = [], []
    cells = len(sources) * len(budgets) * len(thetas) * len(POLICY_NAMES)
    with tqdm(total=cells, desc="replaying", unit="cell", leave=False) as bar:
        for label, spec, dtype_bytes, trace, profile in sources:
            for budget in budgets:
                for theta in thetas:
                    layout = plan_layout(spec, dtype_bytes=dtype_bytes, budget=budget, theta=theta)
                    cells_text = []
                    for name in POLICY_NAMES:
                        stats = total(replay_trace(trace, layout, policy(name, trace, profile)))
                        mib = stats.bytes_loaded / trace.num_tokens / 2**20
                        # What caching saves: bytes still loaded, as a share of loading every activated expert whole.
                        loaded_share = stats.bytes_loaded / (stats.activations * layout.layers[0].expert_bytes)
                        results.append(dict(trace=label, budget=budget, theta=theta, policy=name,
                                            hit_rate=stats.hit_rate, mib_per_token=mib, loaded_share=loaded_share,
                                            slots=layout.layers[0].slots, theta_used=layout.layers[0].theta))
                        cells_text.append(f"{stats.hit_rate:6.1%} {mib:8.1f}")
                        bar.update(1)
                    slots = f"{layout.layers[0].slots}/{layout.layers[0].num_experts}"
                    rows.append(f"{label:26} {budget:6.1%} {layout.layers[0].theta:5.2f} {slots:>5} | " + " | ".join(cells_text))
    header = f"{'trace':26} {'budget':>6} {'θ':>5} {'slots':>5} | " + " | ".join(f"{n:^15}" for n in POLICY_NAMES)
    sub = " " * 46 + "| " + " | ".join(f"{'hit':>6} {'MiB/tok':>8}" for _ in POLICY_NAMES)
    return "\n".join([header, sub, "-" * len(header), *rows]), results


ENGINE_CONFIGS = (("dense", None, None), ("100 %, θ=1", 1.0, 1.0), ("50 %, θ=0.5", 0.5, 0.5), ("25 %, θ=0.5", 0.25, 0.5))


def engine_table(repeats: int, new_tokens: int) -> tuple[str, list[dict]]:
    model = load_model(default_model_dir(), offload_experts=True)
    prompt = list(range(300, 364))
    times = {label: [] for label, _, _ in ENGINE_CONFIGS}
    hit = {}

    def run(budget, theta):
        experts = None if budget is None else offloaded_experts(model, budget, theta, POLICIES["lcp"].config())
        result = generate(model, prompt, max_new_tokens=new_tokens, eos_ids=(), experts=experts)
        return result.stats.decode_s_per_token, experts

    for label, budget, theta in ENGINE_CONFIGS:  # warm-up
        run(budget, theta)
    with tqdm(total=repeats * len(ENGINE_CONFIGS), desc="timing", unit="run", leave=False) as bar:
        for r in range(repeats):
            order = ENGINE_CONFIGS if r % 2 == 0 else ENGINE_CONFIGS[::-1]
            for label, budget, theta in order:
                seconds, experts = run(budget, theta)
                times[label].append(seconds)
                if experts is not None:
                    hit[label] = experts.report()["decode_expert_hit_rate"]
                bar.update(1)
    dense = statistics.median(times["dense"])
    lines = [f"{'configuration (lcp)':22} {'ms/token':>9} {'× dense':>8} {'hit rate':>9}", "-" * 51]
    results = []
    for label, _, _ in ENGINE_CONFIGS:
        median = statistics.median(times[label])
        rate = f"{hit[label]:9.1%}" if label in hit else f"{'':>9}"
        lines.append(f"{label:22} {median * 1e3:9.3f} {median / dense:8.3f} {rate}")
        results.append(dict(config=label, ms_per_token=median * 1e3, ratio=median / dense, hit_rate=hit.get(label)))
    return "\n".join(lines), results


def plot(results: list[dict], path: str) -> None:
    """Per trace: the share of expert bytes still loaded vs budget, one line per (θ, policy).

    Bytes, not hit rates, because a partial hit at small θ still loads most of the expert."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({r["trace"] for r in results})
    thetas = sorted({r["theta"] for r in results})
    fig, axes = plt.subplots(1, len(labels), figsize=(5 * len(labels), 4), squeeze=False)
    colors = dict(zip(thetas, ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    styles = {"lru": ":", "lcp": "-", "belady": "--"}
    for ax, label in zip(axes[0], labels):
        for theta in thetas:
            for name, style in styles.items():
                points = sorted(
                    (r["budget"], r["loaded_share"]) for r in results if (r["trace"], r["theta"], r["policy"]) == (label, theta, name)
                )
                ax.plot([100 * b for b, _ in points], [100 * v for _, v in points], style, marker="o",
                        color=colors[theta], label=f"θ={theta} {name}")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("budget (% of all expert bytes, incl. staging)")
        ax.set_ylabel("expert bytes still loaded (%)")
        ax.set_ylim(0, 105)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, ncol=2)
    fig.suptitle("Host→device traffic left by the cache (lower is better)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def machine_line() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average {load:.2f} at the end"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer cells, tokens and repeats (a smoke test)")
    parser.add_argument("--repeats", type=int, help="timed engine runs per configuration (default 7; quick 3)")
    parser.add_argument("--tokens", type=int, help="new tokens per engine run (default 64; quick 16)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--plot", help="also draw hit rate vs budget to this image (needs matplotlib)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 7)
    tokens = args.tokens or (16 if args.quick else 64)
    replay_text, replay_results = replay_table(args.quick)
    print("Hit rate and host→device MiB per token, by policy (trace replay through the engine's planner)")
    print(replay_text)
    print()
    engine_text, engine_results = engine_table(repeats, tokens)
    print(f"Engine decode time, bundled model, {tokens} new tokens after a 64-token prompt; medians of {repeats} runs")
    print(engine_text)
    print(machine_line())
    if args.json:
        Path(args.json).write_text(json.dumps({"replay": replay_results, "engine": engine_results}, indent=1))
    if args.plot:
        plot(replay_results, args.plot)


if __name__ == "__main__":
    main()
