"""`moepic eval-ppl`: a model's perplexity on a text, and how often its next-token predictions
agree with a reference's (the same checkpoint with dense experts, by default, when experts are
quantized). Side effects: reads the model and the text, a progress bar."""

from __future__ import annotations

from moepic.commands import arguments
from moepic.datasets import known_datasets

NAME = "eval-ppl"
HELP = "perplexity on a text (and top-1 agreement with dense experts)"
WINDOW = 512


def add_parser(subparsers):
    ppl = subparsers.add_parser(NAME, help=HELP)
    arguments.add_model(ppl, shape=False)
    data = ppl.add_mutually_exclusive_group()
    data.add_argument("--text", help="a UTF-8 text file to score")
    dataset = data.add_argument("--dataset", metavar="NAME", help="a text shipped with moepic: {datasets} (the default)")
    dataset.fills = {"datasets": known_datasets}
    ppl.add_argument("--max-tokens", type=int, help="score only the text's first N tokens")
    ppl.add_argument("--window", type=int, help=f"tokens scored from an empty cache at a time (default: {WINDOW}, "
                     "or the model's context if shorter)")
    arguments.add_expert_format(ppl, "encode routed experts as they load: {formats}", flag="--expert-format")
    ppl.add_argument("--reference", metavar="DIR", help="compare predictions with this checkpoint (default, with "
                     "--expert-format or a quantized --model: the same model with dense experts, where it can be loaded)")
    arguments.add_dtype(ppl, "dtype of the weights, auto: the checkpoint's", default="auto")
    arguments.add_json(ppl)
    return ppl


def run(args) -> dict:
    from moepic.analysis.perplexity import score
    from moepic.checkpoint.hf_config import DTYPES
    from moepic.checkpoint.load import load_model, read_spec
    from moepic.checkpoint.stored_experts import stored_format
    from moepic.datasets import dataset_path
    from moepic.errors import ConfigError
    from moepic.quant import build_format
    from moepic.tokenizer import TextCodec, no_tokenizer

    folder = arguments.weights_folder(args.model, NAME)
    if args.max_tokens is not None and args.max_tokens < 2:
        raise ConfigError(f"--max-tokens: at least 2 tokens are scored, got {args.max_tokens}")
    spec, cfg = read_spec(folder)
    window = min(WINDOW, spec.max_position_embeddings) if args.window is None else args.window
    if not 2 <= window <= spec.max_position_embeddings:
        raise ConfigError(f"--window: between 2 and the model's context ({spec.max_position_embeddings}), got {window}")
    fmt = arguments.expert_format(args, flag="--expert-format")
    codec = TextCodec.from_folder(folder)
    if codec is None:
        raise ConfigError(f"{no_tokenizer(folder)}: perplexity is scored on text")
    path = args.text if args.text is not None else dataset_path(args.dataset or "kjv-heldout")
    try:
        text = open(path, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--text {path}: cannot read it as UTF-8 text ({e})") from None
    ids = codec.encode(text)[: args.max_tokens]
    dtype = None if args.dtype == "auto" else DTYPES[args.dtype]
    model = load_model(folder, dtype=dtype, progress=not args.json, expert_format=fmt)
    scored = score(model, ids, window, progress=not args.json)
    stored = stored_format(cfg)
    reference_folder = args.reference or (folder if fmt is not None and fmt.quantized and stored is None else None)
    report = {"model": folder, "text": str(path), "tokens": scored.tokens, "perplexity": scored.perplexity,
              "expert_format": (fmt or stored or build_format("dense")).config.as_dict()}
    if reference_folder is not None:
        del model
        reference = score(load_model(reference_folder, dtype=dtype, progress=not args.json), ids, window,
                          desc="reference", progress=not args.json)
        report |= {"reference": reference_folder, "reference_perplexity": reference.perplexity,
                   "top1_agreement": scored.agreement(reference)}
    return report


def text(report: dict) -> str:
    fmt = report["expert_format"]
    line = f"perplexity {report['perplexity']:.3f} over {report['tokens']} tokens ({fmt['name']} experts)"
    if "reference" in report:
        change = report["perplexity"] / report["reference_perplexity"] - 1
        line += (f"; reference {report['reference_perplexity']:.3f} ({change:+.2%}), "
                 f"top-1 agreement {report['top1_agreement']:.2%}")
    return line
