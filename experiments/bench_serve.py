"""Load test of `moepic serve`: concurrent clients against real server processes, one per batch
size, on the bundled model with offloading on; throughput and latency against batch size 1.

A script, not a test. 32 clients (asyncio + httpx) each send 8 completions one after another
(prompts of 8-40 tokens cut from kjv-heldout, up to 8-32 new tokens, greedy), so 256 requests
per run. Every answer is checked against the request's solo `generate` run in this process (all
experts resident): its text, its token count; every request is answered exactly once. The servers
run side by side and every repeat visits each once, in an order rotated each repeat (the machine
is shared: alternating keeps the noise out of the ratios); a warm-up run first. Tokens/s: tokens
generated over the run's wall time; latency: a request's, from send to its whole answer.

Run:  python experiments/bench_serve.py [--repeats 3] [--budget 0.25] [--batches 1,4,8,16]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import httpx
import torch

from moepic.checkpoint.load import load_model
from moepic.datasets import dataset_path
from moepic.default_model import default_model_dir
from moepic.runtime.generation import generate
from moepic.serve.process import ServerProcess
from moepic.tokenizer import TextCodec


def workload(clients: int, per_client: int) -> list[tuple[list[int], int]]:
    """(prompt ids, max tokens) of every request, client-major."""
    ids = TextCodec.from_folder(default_model_dir()).encode(dataset_path("kjv-heldout").read_text(encoding="utf-8"))
    return [(ids[i * 61 : i * 61 + 8 + (i * 7) % 33], 8 + (i * 5) % 25) for i in range(clients * per_client)]


async def load(url: str, requests: list[tuple[list[int], int]], clients: int) -> tuple[float, list[float], dict[int, dict]]:
    """Wall time, each request's latency, and each request's answer by its index."""
    answers: dict[int, dict] = {}
    latencies: list[float] = []
    per_client = len(requests) // clients

    async def client(c: int, http: httpx.AsyncClient) -> None:
        for i in range(c * per_client, (c + 1) * per_client):
            prompt, max_tokens = requests[i]
            sent = time.perf_counter()
            response = await http.post(f"{url}/v1/completions", json={
                "model": "kjv-moe-tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
            latencies.append(time.perf_counter() - sent)
            response.raise_for_status()
            if i in answers:
                raise SystemExit(f"request {i} answered twice")
            answers[i] = response.json()

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(c, http) for c in range(clients)))
        return time.perf_counter() - start, latencies, answers


def check(answers: dict[int, dict], expected: list[tuple[str, int]], batch: int) -> int:
    """Every request answered once, with its solo run's text and token count: the tokens generated."""
    if sorted(answers) != list(range(len(expected))):
        raise SystemExit(f"batch {batch}: {len(expected) - len(answers)} requests lost")
    for i, answer in answers.items():
        if (answer["choices"][0]["text"], answer["usage"]["completion_tokens"]) != expected[i]:
            raise SystemExit(f"batch {batch}: request {i} differs from its solo run")
    return sum(n for _, n in expected)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--per-client", type=int, default=8)
    parser.add_argument("--budget", default="0.25")
    parser.add_argument("--batches", default="1,8,16")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    requests = workload(args.clients, args.per_client)
    model, codec = load_model(str(default_model_dir())), TextCodec.from_folder(default_model_dir())
    solo = [generate(model, p, max_new_tokens=n).token_ids for p, n in requests]
    expected = [(codec.decode(ids), len(ids)) for ids in solo]
    servers = {b: ServerProcess("--budget", args.budget, "--max-batch", str(b), "--max-queue", str(args.clients)) for b in batches}
    try:
        runs: dict[int, list[tuple[float, float, float]]] = {b: [] for b in batches}
        for repeat in range(-1, args.repeats):  # -1: the warm-up
            order = batches[repeat % len(batches):] + batches[: repeat % len(batches)]
            for b in order:
                wall, latencies, answers = asyncio.run(load(servers[b].url, requests, args.clients))
                tokens = check(answers, expected, b)
                if repeat >= 0:
                    latencies.sort()
                    runs[b].append((tokens / wall, latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99)]))
    finally:
        for server in servers.values():
            server.stop()
    print(f"moepic serve · bundled model · torch {torch.__version__} · {torch.get_num_threads()} threads here · "
          f"{args.clients} clients × {args.per_client} requests (8-32 tokens, greedy) · offloaded at {args.budget} · "
          f"medians of {args.repeats}")
    print(f"{'max batch':>9} {'tokens/s':>9} {'vs batch 1':>11} {'p50 s':>7} {'p99 s':>7}  tokens/s of each run")
    base = statistics.median(r[0] for r in runs[batches[0]])
    for b in batches:
        tps, p50, p99 = (statistics.median(r[k] for r in runs[b]) for k in range(3))
        print(f"{b:>9} {tps:>9.1f} {tps / base:>10.2f}× {p50:>7.2f} {p99:>7.2f}  " + " ".join(f"{r[0]:.0f}" for r in runs[b]))


if __name__ == "__main__":
    main()
