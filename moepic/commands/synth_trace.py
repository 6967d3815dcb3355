"""`moepic synth-trace`: write a synthetic routing trace (.npz) from fitted parameters, or fitted to a
trace first, optionally carried to another shape. Side effects: reads the inputs, writes the trace."""

from __future__ import annotations

from moepic.commands import arguments, synthetic
from moepic.errors import ConfigError
from moepic.outputs import check_writable
from moepic.ranges import SEED

NAME = "synth-trace"
HELP = "write a synthetic routing trace (.npz)"


def add_parser(subparsers):
    synth = subparsers.add_parser(NAME, help=HELP)
    source = synth.add_mutually_exclusive_group(required=True)
    source.add_argument("--params", metavar="PARAMS.json", help="parameters from `moepic fit-trace --out`")
    source.add_argument("--like", metavar="FILE", help="fit the parameters to this routing trace first")
    synth.add_argument("--experts", type=synthetic.EXPERTS.parse, help=f"carry the parameters to this many experts per layer ({synthetic.EXPERTS.describe()})")
    synth.add_argument("--top-k", type=synthetic.EXPERTS.parse, help="… and this top-k (at most the experts)")
    synth.add_argument("--layers", type=synthetic.LAYERS.parse, help=f"… and this many MoE layers, interpolated over depth ({synthetic.LAYERS.describe()})")
    synth.add_argument("--tokens", type=synthetic.TOKENS.parse, required=True, help=f"decode steps to generate ({synthetic.TOKENS.describe()})")
    synth.add_argument("--sequences", type=synthetic.TOKENS.parse, help="requests they are split into, at most the tokens "
                       "(default: tokens / the parameters' tokens_per_sequence)")
    synth.add_argument("--seed", type=SEED.parse, default=0)
    synth.add_argument("--out", metavar="FILE.npz", required=True, help="write the trace here")
    arguments.add_json(synth)
    return synth


def run(args) -> dict:
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
        like = synthetic.load_trace(args.like)
        E, K, L = like.num_experts, like.top_k, len(like.moe_layers)
    flags = (args.experts, args.top_k, args.layers)
    E, K, L = (given if given is not None else default for given, default in zip(flags, (E, K, L)))
    if K > E:
        raise ConfigError(f"--top-k: expected at most the experts per layer ({E}), got {K}")
    synthetic.check_memory(args.tokens, args.sequences or 1, layers=L, top_k=K, experts=E)  # before a fit
    if not args.params:
        config = synthetic.fit(like, args.like)
    if (E, K, L) != (config.num_experts, config.top_k, config.num_layers):
        config = config.for_shape(E, K, L)
    sequences = args.sequences
    if sequences is None:
        sequences = min(args.tokens, max(1, round(args.tokens / config.tokens_per_sequence)))
    synthetic.check_memory(args.tokens, sequences, layers=L, top_k=K, experts=E)
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


def text(report: dict) -> str:
    return (f"wrote {report['out']}: {report['tokens']} decode tokens in {report['sequences']} sequences, "
            f"{report['moe_layers']} MoE layers x {report['num_experts']} experts, top-{report['top_k']} "
            f"(seed {report['seed']})")
