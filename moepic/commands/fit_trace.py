"""`moepic fit-trace`: fit synthetic-routing parameters to a trace per MoE layer, and check the fit by
the hit rates of LRU and LFU on real and synthetic routing. Side effects: reads the trace, writes the JSON."""

from __future__ import annotations

import time

import numpy as np

from moepic.commands import arguments, synthetic
from moepic.errors import ConfigError
from moepic.outputs import check_writable
from moepic.ranges import SEED

NAME = "fit-trace"
HELP = "fit synthetic-routing parameters to a routing trace, per MoE layer"


def add_parser(subparsers):
    fit = subparsers.add_parser(NAME, help=HELP)
    fit.add_argument("--trace", required=True, help="routing trace (.npz or JSONL); only decode steps are used")
    fit.add_argument("--out", metavar="PARAMS.json", help="write the fitted parameters here")
    fit.add_argument("--tokens", type=synthetic.TOKENS.parse, default=2000,
                     help=f"length of the synthetic trace the fit is checked on ({synthetic.TOKENS.describe()})")
    fit.add_argument("--seed", type=SEED.parse, default=0, help="seed of that synthetic trace")
    fit.add_argument("--cache-sizes", type=synthetic.cache_sizes, help="whole-expert cache sizes of the check (default: E/4, E/2, 3E/4)")
    arguments.add_json(fit)
    return fit


def run(args) -> dict:
    from moepic.tracing.synthetic import LAWS, generate_trace, save_synthetic, select_tokens

    if args.out:
        check_writable(args.out, "synthetic routing parameters")  # before the fit, not after it
    trace = synthetic.load_trace(args.trace)
    E = trace.num_experts
    sizes = args.cache_sizes or tuple(sorted({max(1, E * q // 4) for q in (1, 2, 3)}))
    if max(sizes) > E:
        raise ConfigError(f"--cache-sizes: at most {E} (the trace's experts per layer), got {max(sizes)}")
    shape = {"layers": len(trace.moe_layers), "top_k": trace.top_k, "experts": E}
    synthetic.check_memory(args.tokens, 1, **shape)  # before the fit; its sequences are known after it
    t0 = time.perf_counter()
    config = synthetic.fit(trace, args.trace)
    fit_s = time.perf_counter() - t0
    sequences = min(args.tokens, max(1, round(args.tokens / config.tokens_per_sequence)))
    synthetic.check_memory(args.tokens, sequences, **shape)
    if args.out:
        save_synthetic(config, args.out)
    t0 = time.perf_counter()
    generated = generate_trace(config, args.tokens, args.seed, sequences)
    real = select_tokens(trace, ~trace.prefill_N)
    curves = {p: (synthetic.hit_rates(real, p, sizes), synthetic.hit_rates(generated, p, sizes)) for p in synthetic.FIT_CHECK_POLICIES}
    return {
        "trace": args.trace,
        "decode_tokens": real.num_tokens,
        "synthetic_tokens": args.tokens,
        "seed": args.seed,
        "cache_sizes": list(sizes),
        "layers": [
            {"layer": layer, **{name: getattr(config, name)[column] for name in LAWS},
             **{p: {"real": curves[p][0][column].tolist(), "synthetic": curves[p][1][column].tolist()} for p in synthetic.FIT_CHECK_POLICIES}}
            for column, layer in enumerate(trace.moe_layers)
        ],
        "mean_abs_error": {p: float(np.abs(r - s).mean()) for p, (r, s) in curves.items()},
        "worst_layer_error": {p: float(np.abs(r - s).mean(1).max()) for p, (r, s) in curves.items()},
        "params": config.as_dict(),
        "out": args.out,
        "fit_s": fit_s,
        "check_s": time.perf_counter() - t0,
    }


def text(report: dict) -> str:
    sizes = report["cache_sizes"]
    head = f"{'layer':>5} {'skew':>6} {'reuse':>6} {'decay':>6} {'corr':>6}"
    for p in synthetic.FIT_CHECK_POLICIES:
        head += "  " + " ".join(f"{f'{p.upper()} C={c}':>11}" for c in sizes)
    lines = [f"{report['trace']}: {report['decode_tokens']} decode steps; hit rates real/synthetic "
             f"({report['synthetic_tokens']} synthetic tokens, seed {report['seed']})", head]
    for l in report["layers"]:
        row = f"{l['layer']:>5} {l['skew']:>6.3f} {l['reuse']:>6.3f} {l['decay']:>6.3f} {l['correlation']:>6.3f}"
        for p in synthetic.FIT_CHECK_POLICIES:
            row += "  " + " ".join(f"{f'{100 * r:.1f}/{100 * s:.1f}':>11}" for r, s in zip(l[p]["real"], l[p]["synthetic"]))
        lines.append(row)
    lines.append(
        "fit quality, mean abs error of per-layer hit rates (worst layer): "
        + ", ".join(f"{p.upper()} {100 * report['mean_abs_error'][p]:.1f} points ({100 * report['worst_layer_error'][p]:.1f})"
                    for p in synthetic.FIT_CHECK_POLICIES)
        + f"; fitted in {report['fit_s']:.1f} s"
    )
    if report["out"]:
        lines.append(f"wrote {report['out']}: `moepic synth-trace --params {report['out']} --tokens N --out FILE.npz`")
    return "\n".join(lines)
