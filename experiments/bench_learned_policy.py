"""Benchmark: what the learned policy costs and saves in the real engine (bundled model, CPU).

A script, not a test. In one run:

1. Policy cost: one layer step's `update` + `priority`, µs (median of 3 passes over 2,000 random
   steps), at 8 and 128 experts, for LRU, LFU, LCP and learned; times MoE layers = the cost per token.
2. The engine, one table per emulated link speed (--link-gbps, comma-separated): the bundled model
   offloaded at --budget (θ 0.5), greedy decode of held-out KJV prompts (kjv-heldout's second half;
   the built-in learned model was trained on the first), per policy: decode ms/token (medians of
   --repeats runs, policies alternated run by run after one warm-up), decode hit rate, and the
   ms/token against LCP. Every run's tokens are checked against the first policy's (they must be
   identical: policies change speed, never numbers).
3. Mixtral-8x7B: the decode time the held-out learned policy saves in the simulator (A6000; from
   experiments/results/learned_policy/results.jsonl, ablation (g), where present) against the best
   of LRU/LFU/LCP, beside its own CPU cost per token (32 MoE layers × the µs of a layer step at 8
   experts), which the simulator does not charge.

Run:  python experiments/bench_learned_policy.py [--repeats 5] [--budget 0.25] [--link-gbps 0.5,0.15]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from moepic.checkpoint.load import load_model
from moepic.datasets import dataset_path
from moepic.default_model import default_model_dir
from moepic.policies import POLICIES
from moepic.policies.base import LayerStep
from moepic.policies.learned import ONLINE
from moepic.runtime.copy_engine import Link
from moepic.runtime.generation import generate
from moepic.runtime.offload import offloaded_experts
from moepic.tokenizer import TextCodec

NAMES = ("lcp", "lru", "learned")
RESULTS = Path(__file__).resolve().parent / "results" / "learned_policy"
MIXTRAL_MOE_LAYERS = 32


def policy_cost(num_experts: int, names=(*ONLINE, "learned"), steps: int = 2000) -> dict[str, float]:
    """µs per layer step (update + priority) of each policy, median of 3 passes."""
    rng = np.random.default_rng(0)
    layer_steps = [LayerStep(layer=0, clock=s, tokens=1, counts_E=(rng.random(num_experts) < 2 / num_experts).astype(np.int64))
                   for s in range(steps)]
    out = {}
    for name in names:
        policy, passes = POLICIES.build(POLICIES[name].config()), []
        for _ in range(3):
            state, start = policy.init(0, num_experts), time.perf_counter()
            for step in layer_steps:
                state = policy.update(state, step)
                policy.priority(state)
            passes.append((time.perf_counter() - start) / steps * 1e6)
        out[name] = statistics.median(passes)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--link-gbps", default="0.5,0.15", help="emulated link speeds, GB/s, comma-separated")
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=48)
    args = parser.parse_args()
    folder = default_model_dir()
    model = load_model(str(folder), offload_experts=True)
    moe_layers = len(model.spec.moe_layers)
    text = dataset_path("kjv-heldout").read_text(encoding="utf-8")
    ids = TextCodec.from_folder(folder).encode(text[len(text) // 2 :])
    prompts = [ids[i * 997 : i * 997 + 32] for i in range(args.requests)]

    def run(name: str, link: Link) -> tuple[float, float, list[list[int]]]:
        experts = offloaded_experts(model, args.budget, 0.5, POLICIES[name].config(), link=link)
        tokens, decode_s, steps = [], 0.0, 0
        try:
            for prompt in prompts:  # one engine for the requests, as a server keeps its cache
                result = generate(model, prompt, max_new_tokens=args.new_tokens, eos_ids=(), experts=experts)
                tokens.append(result.token_ids)
                decode_s, steps = decode_s + result.stats.decode_s, steps + result.stats.tokens - 1
            return decode_s / steps, experts.report()["decode_expert_hit_rate"], tokens
        finally:
            experts.close()

    costs = {E: policy_cost(E) for E in (8, 128)}
    print(f"bundled model · torch {torch.__version__} · {torch.get_num_threads()} threads · {args.requests} requests × "
          f"{args.new_tokens} tokens · offloaded at {args.budget:.0%}, θ 0.5 · medians of {args.repeats}")
    for gbps in (float(g) for g in args.link_gbps.split(",")):
        link = Link(gbps=gbps, latency_us=10)
        expected = run(NAMES[0], link)[2]  # the warm-up, and the tokens every policy must give
        times, hits = {n: [] for n in NAMES}, {}
        for repeat in range(args.repeats):
            for name in NAMES[repeat % len(NAMES):] + NAMES[: repeat % len(NAMES)]:
                seconds, hits[name], tokens = run(name, link)
                if tokens != expected:
                    raise SystemExit(f"{name}: tokens differ from {NAMES[0]}'s")
                times[name].append(seconds)
        print(f"\nlink {gbps} GB/s")
        print(f"{'policy':>8} {'µs/layer step E=8':>18} {'E=128':>7} {'µs/token here':>14} {'hit rate':>9} {'ms/token':>9} "
              f"{'vs lcp':>7}  all runs (ms)")
        base = statistics.median(times["lcp"])
        for name in NAMES:
            ms = statistics.median(times[name])
            print(f"{name:>8} {costs[8][name]:>18.1f} {costs[128][name]:>7.1f} {costs[8][name] * moe_layers:>14.0f} "
                  f"{hits[name]:>9.1%} {ms * 1e3:>9.3f} {ms / base:>6.2f}×  " + " ".join(f"{t * 1e3:.2f}" for t in times[name]))
    print_simulated_saving(costs[8])


def print_simulated_saving(us_per_layer_step: dict[str, float]) -> None:
    """Table 3: ablation (g)'s simulated Mixtral ms/token, learned against the best online policy,
    less the learned policy's extra CPU time over that policy's (µs per layer step at 8 experts)."""
    import json

    path = RESULTS / "results.jsonl"
    if not path.is_file():
        print(f"\n(no {path}: run experiments/ablate_learned_policy.py for the simulated saving)")
        return
    cells = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        key = record["key"]
        cells.setdefault((key["trace"], key["budget"]), {})[key["policy"]] = record["metrics"]["ms_per_token"]
    print(f"\nMixtral-8x7B, simulated A6000 (ablation g), ms/token: learned against the best of LRU/LFU/LCP; "
          f"extra CPU: its policy time over that one's ({MIXTRAL_MOE_LAYERS} layer steps a token)")
    print(f"{'trace':>10} {'budget':>7} {'best online':>16} {'learned':>9} {'saved':>7} {'extra CPU':>10} {'net':>7}")
    for (trace, budget), ms in sorted(cells.items()):
        if trace not in ("gsm8k", "humaneval"):
            continue
        best = min(ONLINE, key=ms.__getitem__)
        extra = (us_per_layer_step["learned"] - us_per_layer_step[best]) * MIXTRAL_MOE_LAYERS / 1e3
        saved = ms[best] - ms["learned"]
        print(f"{trace:>10} {budget:>7.1%} {f'{best} {ms[best]:.1f}':>16} {ms['learned']:>9.1f} {saved:>7.1f} "
              f"{extra:>10.2f} {saved - extra:>7.1f}")


if __name__ == "__main__":
    main()
