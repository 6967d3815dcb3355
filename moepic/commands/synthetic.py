"""`moepic fit-trace` and `moepic synth-trace`: fit synthetic-routing parameters to a trace, and write synthetic traces.

    trace ─fit_synthetic─▶ params (JSON) ─for_shape (optional)─▶ generate_trace ─▶ .npz
      └─ replay (LRU, LFU) ─▶ hit rates, real vs synthetic ─▶ fit-quality table

cli.py wires them in with `add_parsers(commands)`; each has `run_…(args) -> dict` and `…_text(report)`.
Side effects: reads the trace or parameter file, writes the JSON or .npz asked for.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from moepic.errors import ConfigError
from moepic.outputs import check_writable
from moepic.ranges import SEED, Range
from moepic.tracing.checks import MAX_EXPERTS, MAX_LAYER, MAX_POSITION

POLICIES = ("lru", "lfu")  # the fit-quality check's policies
EXPERTS = Range(1, MAX_EXPERTS, whole=True)  # experts per layer, and top-k
LAYERS = Range(1, MAX_LAYER, whole=True)
TOKENS = Range(1, MAX_POSITION, whole=True)  # what a trace stores; memory bounds it further (below)
MAX_GENERATION_BYTES = 4 * 2**30  # a synthetic trace larger than this is a typo, not a workload


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated cache sizes (experts), got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"cache sizes must be at least 1, got {text!r}")
    return sizes


def add_parsers(commands) -> None:
    """Add both subcommands to the `moepic` subparsers object. Every number has its range checked as
    it is parsed (moepic.ranges); combinations (top-k ≤ experts, memory) first thing in `run_…`."""
    fit = commands.add_parser("fit-trace", help="fit synthetic-routing parameters to a routing trace, per MoE layer")
    fit.add_argument("--trace", required=True, help="routing trace (.npz or JSONL); only decode steps are used")
    fit.add_argument("--out", metavar="PARAMS.json", help="write the fitted parameters here")
    fit.add_argument("--tokens", type=TOKENS.parse, default=2000,
                     help=f"length of the synthetic trace the fit is checked on ({TOKENS.describe()})")
    fit.add_argument("--seed", type=SEED.parse, default=0, help="seed of that synthetic trace")
    fit.add_argument("--cache-sizes", type=_sizes, help="whole-expert cache sizes of the check (default: E/4, E/2, 3E/4)")
    fit.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    synth = commands.add_parser("synth-trace", help="write a synthetic routing trace (.npz)")
    source = synth.add_mutually_exclusive_group(required=True)
    source.add_argument("--params", metavar="PARAMS.json", help="parameters from `moepic fit-trace --out`")
    source.add_argument("--like", metavar="FILE", help="fit the parameters to this routing trace first")
    synth.add_argument("--experts", type=EXPERTS.parse, help=f"carry the parameters to this many experts per layer ({EXPERTS.describe()})")
    synth.add_argument("--top-k", type=EXPERTS.parse, help="… and this top-k (at most the experts)")
    synth.add_argument("--layers", type=LAYERS.parse, help=f"… and this many MoE layers, interpolated over depth ({LAYERS.describe()})")
    synth.add_argument("--tokens", type=TOKENS.parse, required=True, help=f"decode steps to generate ({TOKENS.describe()})")
    synth.add_argument("--sequences", type=TOKENS.parse, help="requests they are split into, at most the tokens "
                       "(default: tokens / the parameters' tokens_per_sequence)")
    synth.add_argument("--seed", type=SEED.parse, default=0)
    synth.add_argument("--out", metavar="FILE.npz", required=True, help="write the trace here")
    synth.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def _load_trace(path: str):
    from moepic.tracing import TraceError, load_any_trace

    try:
        return load_any_trace(path)
    except TraceError as e:
        raise ConfigError(str(e)) from None


def _fit(trace, path: str):
    from moepic.tracing.synthetic import fit_synthetic

    try:
        return fit_synthetic(trace)
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None


def _check_memory(tokens: int, sequences: int, *, layers: int, top_k: int, experts: int) -> None:
    """Refuse, before any work, a synthetic trace too large to generate in memory (naming the shape)."""
    from moepic.tracing.synthetic import generation_bytes

    need = generation_bytes(tokens, sequences, layers=layers, top_k=top_k, experts=experts)
    if need > MAX_GENERATION_BYTES:
        raise ConfigError(
            f"--tokens: {tokens} tokens of {layers} MoE layers x {experts} experts, top-{top_k} would need about "
            f"{need / 2**30:.1f} GiB to generate; the limit is {MAX_GENERATION_BYTES / 2**30:.0f} GiB "
            f"(about {tokens * MAX_GENERATION_BYTES // need} tokens at this shape)"
        )


def hit_rates(trace, policy: str, sizes) -> np.ndarray:
    """[L, sizes]: the planner's hit rate of `policy` with caches of whole experts (one-neuron experts, θ = 1)."""
    from moepic.cache.layout import CacheLayout, slot_count_layout
    from moepic.cache.replay import replay_trace
    from moepic.policies import POLICIES as REGISTRY
    from moepic.policies.base import build_policy

    build = REGISTRY.structure_node({"name": policy}, "policy")
    out = np.zeros((len(trace.moe_layers), len(sizes)))
    for column, slots in enumerate(sizes):
        layers = tuple(slot_count_layout(l, trace.num_experts, slots) for l in trace.moe_layers)
        layout = CacheLayout(layers=layers, staging_experts=trace.top_k, dtype_bytes=1)
        out[:, column] = [stats.hit_rate for stats in replay_trace(trace, layout, build_policy(build))]
    return out


def run_fit_trace(args) -> dict:
    from moepic.tracing.synthetic import LAWS, generate_trace, save_synthetic, select_tokens

    if args.out:
        check_writable(args.out, "synthetic routing parameters")  # before the fit, not after it
    trace = _load_trace(args.trace)
    E = trace.num_experts
    sizes = args.cache_sizes or tuple(sorted({max(1, E * q // 4) for q in (1, 2, 3)}))
    if max(sizes) > E:
        raise ConfigError(f"--cache-sizes: at most {E} (the trace's experts per layer), got {max(sizes)}")
    shape = {"layers": len(trace.moe_layers), "top_k": trace.top_k, "experts": E}
    _check_memory(args.tokens, 1, **shape)  # before the fit; its sequences are known after it
    t0 = time.perf_counter()
    config = _fit(trace, args.trace)
    fit_s = time.perf_counter() - t0
    sequences = min(args.tokens, max(1, round(args.tokens / config.tokens_per_sequence)))
    _check_memory(args.tokens, sequences, **shape)
    if args.out:
        save_synthetic(config, args.out)
    t0 = time.perf_counter()
    synthetic = generate_trace(config, args.tokens, args.seed, sequences)
    real = select_tokens(trace, ~trace.prefill_N)
    curves = {p: (hit_rates(real, p, sizes), hit_rates(synthetic, p, sizes)) for p in POLICIES}
    return {
        "trace": args.trace,
        "decode_tokens": real.num_tokens,
        "synthetic_tokens": args.tokens,
        "seed": args.seed,
        "cache_sizes": list(sizes),
        "layers": [
            {"layer": layer, **{name: getattr(config, name)[column] for name in LAWS},
             **{p: {"real": curves[p][0][column].tolist(), "synthetic": curves[p][1][column].tolist()} for p in POLICIES}}
            for column, layer in enumerate(trace.moe_layers)
        ],
        "mean_abs_error": {p: float(np.abs(r - s).mean()) for p, (r, s) in curves.items()},
        "worst_layer_error": {p: float(np.abs(r - s).mean(1).max()) for p, (r, s) in curves.items()},
        "params": config.as_dict(),
        "out": args.out,
        "fit_s": fit_s,
        "check_s": time.perf_counter() - t0,
    }


def fit_trace_text(report: dict) -> str:
    sizes = report["cache_sizes"]
    head = f"{'layer':>5} {'skew':>6} {'reuse':>6} {'decay':>6} {'corr':>6}"
    for p in POLICIES:
        head += "  " + " ".join(f"{f'{p.upper()} C={c}':>11}" for c in sizes)
    lines = [f"{report['trace']}: {report['decode_tokens']} decode steps; hit rates real/synthetic "
             f"({report['synthetic_tokens']} synthetic tokens, seed {report['seed']})", head]
    for l in report["layers"]:
        row = f"{l['layer']:>5} {l['skew']:>6.3f} {l['reuse']:>6.3f} {l['decay']:>6.3f} {l['correlation']:>6.3f}"
        for p in POLICIES:
            row += "  " + " ".join(f"{f'{100 * r:.1f}/{100 * s:.1f}':>11}" for r, s in zip(l[p]["real"], l[p]["synthetic"]))
        lines.append(row)
    lines.append(
        "fit quality, mean abs error of per-layer hit rates (worst layer): "
        + ", ".join(f"{p.upper()} {100 * report['mean_abs_error'][p]:.1f} points ({100 * report['worst_layer_error'][p]:.1f})"
                    for p in POLICIES)
        + f"; fitted in {report['fit_s']:.1f} s"
    )
    if report["out"]:
        lines.append(f"wrote {report['out']}: `moepic synth-trace --params {report['out']} --tokens N --out FILE.npz`")
    return "\n".join(lines)


def run_synth_trace(args) -> dict:
    from moepic.tracing import TraceError, save_trace
    from moepic.tracing.synthetic import generate_trace, load_synthetic

    check_writable(args.out, "trace")  # before fitting and generating, not after
    if args.sequences is not None and args.sequences > args.tokens:
        raise ConfigError(f"--sequences: expected 1 to --tokens ({args.tokens}), got {args.sequences}")
    if args.params:
        try:
            config = load_synthetic(args.params)
        except TraceError as e:
            raise ConfigError(str(e)) from None
        E, K, L = config.num_experts, config.top_k, config.num_layers
    else:
        like = _load_trace(args.like)
        E, K, L = like.num_experts, like.top_k, len(like.moe_layers)
    flags = (args.experts, args.top_k, args.layers)
    E, K, L = (given if given is not None else default for given, default in zip(flags, (E, K, L)))
    if K > E:
        raise ConfigError(f"--top-k: expected at most the experts per layer ({E}), got {K}")
    _check_memory(args.tokens, args.sequences or 1, layers=L, top_k=K, experts=E)  # before a fit
    if not args.params:
        config = _fit(like, args.like)
    if (E, K, L) != (config.num_experts, config.top_k, config.num_layers):
        config = config.for_shape(E, K, L)
    sequences = args.sequences
    if sequences is None:
        sequences = min(args.tokens, max(1, round(args.tokens / config.tokens_per_sequence)))
    _check_memory(args.tokens, sequences, layers=L, top_k=K, experts=E)
    trace = generate_trace(config, args.tokens, args.seed, sequences)
    save_trace(trace, args.out)
    return {
        "out": args.out,
        "tokens": args.tokens,
        "sequences": sequences,
        "seed": args.seed,
        "num_experts": config.num_experts,
        "top_k": config.top_k,
        "moe_layers": config.num_layers,
        "params": config.as_dict(),
    }


def synth_trace_text(report: dict) -> str:
    return (f"wrote {report['out']}: {report['tokens']} decode tokens in {report['sequences']} sequences, "
            f"{report['moe_layers']} MoE layers x {report['num_experts']} experts, top-{report['top_k']} "
            f"(seed {report['seed']})")
