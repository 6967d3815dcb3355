"""Benchmark: offloaded decoding of a Mixtral-shaped model with random weights, on any device.

A script, not a test, prepared for a GPU machine (it also runs on the CPU with a small shape, which
is how it is checked). It builds a random Mixtral-shaped model straight into moepic's weight tree
(no checkpoint on disk; routed experts packed in pinned host memory on CUDA), then decodes greedily:
the dense all-resident model (when it fits: `--dense`), and the offloading engine at each
--budgets × --thetas with no prefetch and with gate lookahead. One table: ms/token, × dense,
exposed copy ms/token (device-side stall time on CUDA), hit rate and recall. Every offloaded run's
tokens are compared with the dense run's when there is one.

Run:  python experiments/bench_offload_device.py --device cuda --layers 8            (Mixtral-8x7B shape, 8 of 32 layers)
      python experiments/bench_offload_device.py --device cpu --quick                  (small shape, a smoke test)
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from moepic.core.model import Model
from moepic.core.packing import pack_expert
from moepic.core.spec import ModelSpec, MoESpec, RopeSpec, RouterSpec
from moepic.core.weights import AttentionWeights, LayerWeights, ModelWeights, MoEWeights, SwiGLUWeights
from moepic.policies import POLICIES
from moepic.predictors.gate_lookahead import GateLookaheadConfig
from moepic.runtime.generation import generate
from moepic.runtime.offload import offloaded_experts


def random_model(args, device: torch.device, *, offload: bool) -> Model:
    """Mixtral's layout with random weights (std 0.02); experts on the host (pinned on CUDA) if `offload`."""
    D, F, E, H, Hkv, d = args.hidden, args.ffn, 8, args.heads, args.kv_heads, args.hidden // args.heads
    spec = ModelSpec(
        model_type="mixtral", vocab_size=args.vocab, hidden_size=D, num_heads=H, num_kv_heads=Hkv, head_dim=d,
        norm_eps=1e-5, rope=RopeSpec(theta=1e6), layer_kinds=("moe",) * args.layers, max_position_embeddings=4096,
        moe=MoESpec(num_experts=E, top_k=2, expert_ffn=F, router=RouterSpec(kind="softmax_topk", renormalize=True)),
    )
    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16

    def rand(*shape, where=device):
        return (torch.randn(*shape, generator=g) * 0.02).to(dtype).to(where)

    pin = offload and device.type == "cuda"
    layers = []
    for _ in tqdm(range(args.layers), desc="building layers", leave=False):
        experts = []
        for _ in range(E):
            w = SwiGLUWeights.from_projections(rand(F, D, where="cpu"), rand(F, D, where="cpu"), rand(D, F, where="cpu"))
            experts.append(pack_expert(w, pin_memory=pin) if offload else SwiGLUWeights(w.gate_up_N2BD.to(device), w.down_FD.to(device)))
        attention = AttentionWeights(rand(H * d, D), rand(Hkv * d, D), rand(Hkv * d, D), rand(D, H * d))
        ones = torch.ones(D, dtype=dtype, device=device)
        layers.append(LayerWeights(ones, attention, ones.clone(), MoEWeights(rand(E, D), tuple(experts))))
    weights = ModelWeights(rand(args.vocab, D), tuple(layers), torch.ones(D, dtype=dtype, device=device), rand(args.vocab, D))
    return Model.build(spec, weights)


def decode(model, prompt, tokens: int, experts=None) -> tuple[float, list[int]]:
    result = generate(model, prompt, max_new_tokens=tokens, eos_ids=(), experts=experts)
    return result.stats.decode_s_per_token, result.token_ids


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
    parser.add_argument("--dense", action=argparse.BooleanOptionalAction, default=True, help="also time the all-resident model")
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.ffn, args.heads, args.kv_heads, args.vocab = 4, 256, 512, 4, 2, 1000
        args.tokens, args.repeats = 8, 1
    device = torch.device(args.device)
    prompt = list(range(1, 65))
    budgets = [float(b) for b in args.budgets.split(",")]
    thetas = [float(t) for t in args.thetas.split(",")]

    dense_s, dense_tokens = None, None
    if args.dense:
        model = random_model(args, device, offload=False)
        decode(model, prompt, 2)
        runs = [decode(model, prompt, args.tokens) for _ in range(args.repeats)]
        dense_s, dense_tokens = statistics.median(r[0] for r in runs), runs[0][1]
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    model = random_model(args, device, offload=True)
    rows = []
    cells = [(b, t, p) for b in budgets for t in thetas for p in ("none", "gate_lookahead")]
    for budget, theta, predictor in tqdm(cells, desc="offloaded runs", leave=False):
        times, report = [], None
        for _ in range(args.repeats + 1):  # the first run warms up
            config = GateLookaheadConfig() if predictor == "gate_lookahead" else None
            engine = offloaded_experts(model, budget, theta, POLICIES["lcp"].config(), config)
            seconds, tokens = decode(model, prompt, args.tokens, engine)
            report = engine.report()
            engine.close()
            times.append(seconds)
            if dense_tokens is not None and tokens != dense_tokens:
                raise AssertionError(f"budget {budget}, θ {theta}, {predictor}: tokens differ from the dense model's")
        rows.append((budget, theta, predictor, statistics.median(times[1:]), report))

    shape = f"{args.layers} layers, D={args.hidden}, F={args.ffn}, 8 experts top-2, bf16"
    print(f"Random Mixtral-shaped model ({shape}) on {device}; {args.tokens} new tokens after 64; medians of {args.repeats}")
    if dense_s is not None:
        print(f"dense all-resident: {dense_s * 1e3:.2f} ms/token")
    print(f"{'budget':>6} {'θ':>4} {'predictor':>15} | {'ms/token':>8} {'× dense':>8} {'exposed':>8} {'hit':>6} {'recall':>7}")
    for budget, theta, predictor, seconds, report in rows:
        ratio = f"{seconds / dense_s:8.2f}" if dense_s else f"{'-':>8}"
        recall = report["prediction_recall"]
        print(
            f"{budget:6.0%} {theta:4.1f} {predictor:>15} | {seconds * 1e3:8.2f} {ratio} "
            f"{report['decode_exposed_copy_s_per_token'] * 1e3:8.2f} {report['decode_expert_hit_rate']:6.1%} "
            f"{'' if recall is None else f'{recall:6.1%}':>7}"
        )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}; at {time.strftime('%Y-%m-%d %H:%M')}")


if __name__ == "__main__":
    main()
