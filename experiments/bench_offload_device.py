"""Benchmark: offloaded decoding of a Mixtral-shaped model with random weights, on any device.

A script, not a test, prepared for a GPU machine (it also runs on the CPU with a small shape, which
is how it is checked). It builds a random Mixtral-shaped model straight into moepic's weight tree
(no checkpoint on disk; weights drawn on the device, routed experts packed in pinned host memory on
CUDA), then feeds it 64 random prompt tokens and --tokens more one at a time (a random model's greedy
output soon repeats one token, which would route every step alike): the dense all-resident model
(when it fits: `--dense`), and the offloading engine at each --budgets × --thetas × --predictors ×
--hybrid modes. One table: decode ms/token, × dense, exposed copy ms/token (device-side stall time
on CUDA), hit rate, recall, and for hybrid runs the experts and bottoms the host computed (prompt
included) and its busy ms per decoded token. A copy-only run's argmax at every step must equal the
dense run's (it raises otherwise); a hybrid run sums partial results on two processors, so in bf16
an argmax may differ where random weights leave near-flat logits: `same` counts the steps that agree.

Run:  python experiments/bench_offload_device.py --device cuda --layers 8            (Mixtral-8x7B shape, 8 of 32 layers)
      python experiments/bench_offload_device.py --device cuda --layers 4 --hybrid off,auto,host-only
      python experiments/bench_offload_device.py --device cpu --quick                  (small shape, a smoke test)
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from moepic.cache.placement import check_mode
from moepic.core.model import KVCache, forward
from moepic.policies import POLICIES
from moepic.predictors.gate_lookahead import GateLookaheadConfig
from moepic.runtime.host_pricing import run_pricing
from moepic.runtime.offload import offloaded_experts
from moepic.runtime.random_model import MixtralShape, random_models


def replay(model, tokens: Sequence[int], prompt_len: int, experts=None) -> tuple[float, list[int]]:
    """Prefill tokens[:prompt_len], then decode the rest one at a time, fed (not generated): a random
    model's greedy output soon repeats one token, which would route every step alike and flatter
    any cache. Returns decode seconds per token and each step's argmax (read each step, as
    generation reads its next id)."""
    device = model.device
    cache = KVCache.allocate(model, len(tokens))
    if experts is not None:
        experts.begin_request()
    with torch.inference_mode():
        logits_TV, cache = forward(model, torch.tensor(tokens[:prompt_len], device=device), cache, experts, logits_for="last")
        argmaxes = [int(logits_TV[-1].argmax())]
        start = time.perf_counter()
        for token in tokens[prompt_len:]:
            logits_TV, cache = forward(model, torch.tensor([token], device=device), cache, experts, logits_for="last")
            argmaxes.append(int(logits_TV[-1].argmax()))
        seconds = time.perf_counter() - start
    return seconds / (len(tokens) - prompt_len), argmaxes


def agreeing(a: Sequence[int], b: Sequence[int]) -> int:
    return sum(x == y for x, y in zip(a, b))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small shape and few tokens (a smoke test)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--ffn", type=int, default=14336)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budgets", default="0.25,0.5", help="comma-separated budget fractions")
    parser.add_argument("--thetas", default="0,0.4,1", help="comma-separated split ratios")
    parser.add_argument("--predictors", default="none,gate_lookahead", help="comma-separated: none, gate_lookahead")
    parser.add_argument("--hybrid", default="off", help="comma-separated hybrid modes: off, auto, host-only")
    parser.add_argument("--host", help="host profile (name or YAML) that prices `auto` on CUDA; default: measured now")
    parser.add_argument("--host-threads", type=int, help="host worker threads (default: the engine's)")
    parser.add_argument("--dense", action=argparse.BooleanOptionalAction, default=True, help="also time the all-resident model")
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.ffn, args.heads, args.kv_heads, args.vocab = 4, 256, 512, 4, 2, 1000
        args.tokens, args.repeats = 8, 1
    device = torch.device(args.device)
    tokens = torch.randint(args.vocab, (64 + args.tokens,), generator=torch.Generator().manual_seed(1)).tolist()
    budgets = [float(b) for b in args.budgets.split(",")]
    thetas = [float(t) for t in args.thetas.split(",")]
    predictors = args.predictors.split(",")
    modes = [check_mode(m, costs_given=True) for m in args.hybrid.split(",")]  # auto is priced below
    pricing = None
    if "auto" in modes:
        host = args.host if device.type == "cuda" else None
        pricing = run_pricing(device, 2, host=host, link=None, threads=args.host_threads, note=print)

    shape = MixtralShape(args.layers, args.hidden, args.ffn, args.heads, args.kv_heads, args.vocab)
    dense_model, model = random_models(shape, device, dense=args.dense)
    dense_s, dense_tokens = None, None
    if dense_model is not None:
        replay(dense_model, tokens[:66], 64)
        runs = [replay(dense_model, tokens, 64) for _ in range(args.repeats)]
        dense_s, dense_tokens = statistics.median(r[0] for r in runs), runs[0][1]
        del dense_model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rows = []
    cells = [(b, t, p, m) for b in budgets for t in thetas for p in predictors for m in modes]
    for budget, theta, predictor, mode in tqdm(cells, desc="offloaded runs", leave=False):
        times, report, same = [], None, None
        for _ in range(args.repeats + 1):  # the first run warms up
            config = GateLookaheadConfig() if predictor == "gate_lookahead" else None
            engine = offloaded_experts(
                model, budget, theta, POLICIES["lcp"].config(), config, hybrid=mode,
                pricing=pricing if mode == "auto" else None, host_threads=args.host_threads if mode != "off" else None,
            )
            try:
                seconds, argmaxes = replay(model, tokens, 64, engine)
                report = engine.report()
            finally:
                engine.close()
            times.append(seconds)
            if dense_tokens is not None:
                same = agreeing(argmaxes, dense_tokens)
                if mode == "off" and argmaxes != dense_tokens:
                    raise AssertionError(f"budget {budget}, θ {theta}, {predictor}: argmaxes differ from the dense model's")
        rows.append((budget, theta, predictor, mode, statistics.median(times[1:]), report, same))

    described = f"{args.layers} layers, D={args.hidden}, F={args.ffn}, 8 experts top-2, bf16"
    print(f"Random Mixtral-shaped model ({described}) on {device}; {args.tokens} random tokens decoded after 64; medians of {args.repeats}")
    if dense_s is not None:
        print(f"dense all-resident: {dense_s * 1e3:.2f} ms/token")
    print(
        f"{'budget':>6} {'θ':>4} {'predictor':>15} {'hybrid':>9} | {'ms/token':>8} {'× dense':>8} {'exposed':>8} "
        f"{'hit':>6} {'recall':>7} {'host exp':>8} {'host bot':>8} {'host ms':>8} {'same':>5}"
    )
    for budget, theta, predictor, mode, seconds, report, same in rows:
        ratio = f"{seconds / dense_s:8.2f}" if dense_s else f"{'-':>8}"
        recall = report["prediction_recall"]
        host, bottoms = report.get("host_experts", 0), report.get("host_bottoms", 0)
        host_ms = (report.get("decode_host_s_per_token") or 0.0) * 1e3
        print(
            f"{budget:6.0%} {theta:4.1f} {predictor:>15} {mode:>9} | {seconds * 1e3:8.2f} {ratio} "
            f"{report['decode_exposed_copy_s_per_token'] * 1e3:8.2f} {report['decode_expert_hit_rate']:6.1%} "
            f"{'' if recall is None else f'{recall:6.1%}':>7} {host:8d} {bottoms:8d} {host_ms:8.2f} "
            f"{'' if same is None else f'{same}/{args.tokens + 1}':>5}"
        )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; host threads {torch.get_num_threads()}; torch {torch.__version__}; at {time.strftime('%Y-%m-%d %H:%M')}")


if __name__ == "__main__":
    main()
