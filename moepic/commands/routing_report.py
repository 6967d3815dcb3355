"""`moepic routing-report`: how a model routes real text, per MoE layer.

From a model and a text file it runs prefill over the text in chunks with two taps: a recorder
(load, reuse) and gate lookahead (next-layer recall). From a recorded trace (.npz, or the JSONL
form of the shared Mixtral traces) it reports what the routing alone shows. Side effects: file I/O.
"""

from __future__ import annotations

import math
from pathlib import Path

from moepic.commands import arguments
from moepic.datasets import dataset_path, known_datasets
from moepic.errors import ConfigError

NAME = "routing-report"
HELP = "per-layer expert load, reuse and next-layer predictability"
MAX_TOKENS = 2**24  # --max-tokens: 16 Mi tokens, far beyond any text worth one report
DEFAULT_CHUNK, DEFAULT_MAX_TOKENS = 256, 8192


def add_parser(subparsers):
    report = subparsers.add_parser(NAME, help=HELP)
    arguments.add_model(report, shape=False)
    source = report.add_mutually_exclusive_group()
    source.add_argument("--text", help="a UTF-8 text file to route through the model")
    dataset = source.add_argument("--dataset", metavar="NAME", help="a text shipped with moepic: {datasets}")
    dataset.fills = {"datasets": known_datasets}
    source.add_argument("--trace", help="a recorded trace (.npz) or a JSONL routing log instead of a model run")
    report.add_argument("--chunk", type=int, help=f"tokens per independent prefill chunk (default: {DEFAULT_CHUNK}; not with --trace)")
    report.add_argument("--max-tokens", type=int,
                        help=f"route at most this many tokens of the text (default: {DEFAULT_MAX_TOKENS}; not with --trace)")
    arguments.add_json(report)
    return report


def run(args) -> dict:
    return run_routing_report(args.model, args.text, args.trace, dataset=args.dataset, chunk=args.chunk, max_tokens=args.max_tokens)


def routing_report(trace, lookahead_recall: dict[int, float] | None) -> dict:
    import attrs

    from moepic.analysis.routing_stats import layer_loads, most_popular_recall

    popular = most_popular_recall(trace)
    layers = []
    for column, load in enumerate(layer_loads(trace)):
        row = attrs.asdict(load) | {"most_popular_recall": float(popular[column])}
        if lookahead_recall is not None:
            row["next_layer_recall"] = lookahead_recall.get(load.layer)
            row["random_recall"] = trace.top_k / trace.num_experts
        layers.append(row)
    return {
        "model": trace.model,
        "source": trace.source,
        "tokens": trace.num_tokens,
        "dropped_tokens": trace.dropped_tokens,
        "num_experts": trace.num_experts,
        "top_k": trace.top_k,
        "layers": layers,
    }


def run_routing_report(
    model_dir: str | None,
    text_file: str | None,
    trace_file: str | None,
    *,
    dataset: str | None = None,
    chunk: int | None = None,
    max_tokens: int | None = None,
) -> dict:
    """With `trace_file`, `model_dir` (if given) supplies the expert count a JSONL log cannot state.
    `chunk` and `max_tokens` (None: 256 and 8192) shape a model run, so a trace refuses them."""
    if trace_file is not None:
        given = [flag for flag, value in (("--chunk", chunk), ("--max-tokens", max_tokens)) if value is not None]
        if given:
            raise ConfigError(f"{given[0]} has no effect with --trace: a recorded trace is reported as it is, not routed again")
    chunk = DEFAULT_CHUNK if chunk is None else chunk
    max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    if not 1 <= chunk <= MAX_TOKENS:
        raise ConfigError(f"--chunk: expected tokens per prefill chunk in [1, {MAX_TOKENS}], got {chunk}")
    if not 2 <= max_tokens <= MAX_TOKENS:
        raise ConfigError(f"--max-tokens: expected an integer in [2, {MAX_TOKENS}] (a report needs 2 tokens), got {max_tokens}")
    if dataset is not None:
        text_file = str(dataset_path(dataset))
    if (text_file is None) == (trace_file is None):
        raise ConfigError("routing-report needs exactly one of --text FILE, --dataset NAME or --trace FILE")
    import attrs

    from moepic.checkpoint.load import load_model, read_spec
    from moepic.tracing import load_any_trace

    if trace_file is not None:
        num_experts = None
        if model_dir is not None:
            spec, _ = read_spec(arguments.weights_folder(model_dir, NAME))
            num_experts = spec.moe.num_experts if spec.moe is not None else None
        return routing_report(load_any_trace(trace_file, num_experts=num_experts), None)
    from moepic.tokenizer import TextCodec, no_tokenizer

    folder = arguments.weights_folder(model_dir, NAME)
    path = Path(text_file)
    if not path.is_file():
        raise ConfigError(f"{path}: text file not found")
    spec, _ = read_spec(folder)
    if chunk > spec.max_position_embeddings:
        raise ConfigError(f"--chunk: at most the model's max_position_embeddings ({spec.max_position_embeddings}), got {chunk}")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    codec = TextCodec.from_folder(folder)  # before the weights: a missing tokenizer should fail fast
    if codec is None:
        raise ConfigError(f"{no_tokenizer(folder)}, which --text needs")
    model = load_model(folder)
    from moepic.analysis.route_text import trace_text

    trace, recall = trace_text(model, codec, text, chunk=chunk, max_tokens=max_tokens)
    return routing_report(attrs.evolve(trace, model=folder), recall)


def text(report: dict) -> str:
    def pct(x):
        return "   -  " if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:5.1f}%"

    dropped = report.get("dropped_tokens", 0)
    lines = [
        f"{report['model'] or report['source']}: {report['tokens']} tokens, "
        f"{report['num_experts']} experts, top-{report['top_k']}"
        + (f" ({dropped} more left out: they miss some layer's record)" if dropped else ""),
        "layer | busiest | top 25% | least used | reuse (random) | next-layer recall | random | most-popular",
    ]
    for row in report["layers"]:
        lines.append(
            f"{row['layer']:5d} | {pct(row['busiest_share'])} | {pct(row['top_quarter_share'])} | "
            f"{pct(row['min_share'])}     | {pct(row['reuse'])} ({pct(row['reuse_random'])}) | "
            f"{pct(row.get('next_layer_recall'))}            | {pct(row.get('random_recall'))} | "
            f"{pct(row['most_popular_recall'])}"
        )
    return "\n".join(lines)
