"""Benchmark: aggregate decode throughput of batched generation (runtime/scheduler.py) against the
same requests generated one after another, on the bundled model, all-resident and offloaded.

A script, not a test. 16 requests (prompts of 8-40 tokens cut from kjv-heldout, 32 new tokens
each, greedy); for each batch size, `generate_batch` in chunks of that size, against sequential
`generate`; every repeat runs every cell once, in an order rotated each repeat; one warm-up first.
Tokens/s counts generated tokens over wall time (prefills included). Every request's tokens are
checked against its sequential run (they must be identical).

Run:  python experiments/bench_batch.py [--repeats 5] [--budget 0.25]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from moepic.checkpoint.load import load_model
from moepic.datasets import dataset_path
from moepic.default_model import default_model_dir
from moepic.policies import POLICIES
from moepic.runtime.generation import generate
from moepic.runtime.offload import offloaded_experts
from moepic.runtime.scheduler import Request, generate_batch
from moepic.tokenizer import TextCodec

BATCHES = (1, 2, 4, 8, 16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--budget", type=float, default=0.25)
    args = parser.parse_args()
    folder = default_model_dir()
    ids = TextCodec.from_folder(folder).encode(dataset_path("kjv-heldout").read_text(encoding="utf-8"))
    requests = [Request(prompt_ids=ids[i * 97 : i * 97 + 8 + (i * 7) % 33], max_new_tokens=args.tokens, eos_ids=())
                for i in range(args.requests)]
    models = {"resident": load_model(folder), "offloaded": load_model(folder, offload_experts=True)}

    def source(mode: str):
        return None if mode == "resident" else offloaded_experts(models[mode], args.budget, 0.5, POLICIES["lcp"].config())

    def sequential(mode: str) -> list[list[int]]:
        experts = source(mode)
        return [generate(models[mode], r.prompt_ids, max_new_tokens=r.max_new_tokens, eos_ids=(), experts=experts).token_ids
                for r in requests]

    def batched(mode: str, size: int) -> list[list[int]]:
        experts, out = source(mode), []
        for start in range(0, len(requests), size):
            out += [r.token_ids for r in generate_batch(models[mode], requests[start : start + size], experts=experts)]
        return out

    cells = [(mode, 0) for mode in models] + [(mode, b) for mode in models for b in BATCHES]
    expected = {mode: sequential(mode) for mode in models}  # the warm-up, and every cell's reference
    runs = {cell: [] for cell in cells}
    for repeat in range(args.repeats):
        for cell in cells[repeat % len(cells):] + cells[: repeat % len(cells)]:
            mode, size = cell
            start = time.perf_counter()
            got = sequential(mode) if size == 0 else batched(mode, size)
            runs[cell].append(args.requests * args.tokens / (time.perf_counter() - start))
            if got != expected[mode]:
                raise SystemExit(f"{mode} batch {size}: tokens differ from the sequential run")
    print(f"bundled model · torch {torch.__version__} · {torch.get_num_threads()} threads · {args.requests} requests × "
          f"{args.tokens} tokens · offloaded at {args.budget:.0%}, lcp, θ 0.5 · medians of {args.repeats}")
    print(f"{'mode':<10} {'batch':>6} {'tokens/s':>9} {'vs sequential':>14}  all runs")
    for mode in models:
        base = statistics.median(runs[mode, 0])
        for size in (0, *BATCHES):
            tps = statistics.median(runs[mode, size])
            label = "seq" if size == 0 else str(size)
            print(f"{mode:<10} {label:>6} {tps:>9.1f} {tps / base:>13.2f}×  " + " ".join(f"{v:.0f}" for v in runs[mode, size]))


if __name__ == "__main__":
    main()
