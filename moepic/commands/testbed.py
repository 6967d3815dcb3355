"""What `moepic simulate` and `moepic compare` share: their arguments, and the `Testbed` (trace,
model shape, hardware, budget, stand-in recall, weights) those arguments name.

    trace (.npz / .jsonl) ────┐
    --model DIR|PRESET ───────┼─▶ Testbed ─▶ sim.run.run_setup / sim.compare.compare_setups
    --hardware NAME|FILE ─────┘

Side effects: reads the files; the deprecated --model-shape prints a note.
"""

from __future__ import annotations

import attrs

from moepic.commands import arguments
from moepic.errors import ConfigError
from moepic.ranges import BATCH, CONTEXT_TOKENS, STREAM_TOKENS


def add_arguments(parser) -> None:
    parser.add_argument("--trace", required=True, help="routing trace: .npz (moepic generate --record-trace) or .jsonl")
    arguments.add_model(parser, shape=True, help="Hugging Face model folder (its shape; its weights run gate_lookahead/mlp "
                        "on the trace's recorded router inputs), or a preset shape ({presets}) (default: the built-in model)")
    parser.add_argument("--model-shape", metavar="DIR|PRESET", help="deprecated: use --model")
    arguments.add_hardware(parser, help="hardware profile: a bundled name ({profiles}) or a YAML file")
    arguments.add_budget(parser, "device memory for experts (cache and staging): 24GiB, or a share of all expert bytes: 0.25")
    arguments.add_recall(parser, "where the trace has no router inputs or --model gives no weights, a noisy_oracle "
                         "of this recall stands in for gate_lookahead/mlp")
    parser.add_argument("--context", type=CONTEXT_TOKENS.parse, default=512, help="KV-cache tokens the attention time assumes")
    parser.add_argument("--batch", type=BATCH.parse, default=1, help="decode the trace's requests this many at a time "
                        "(continuous batching: a step routes one token of each running request; default 1: one after another)")
    parser.add_argument("--stream-tokens", type=STREAM_TOKENS.parse, metavar="N", help="cut each sequence of the trace into "
                        "requests of N decode tokens (more streams for --batch; routing within a request stays the trace's)")
    arguments.add_hybrid(parser)
    arguments.add_expert_format(parser, "routed experts stored as: {formats} (default: the model's own, dense unless "
                                "`moepic quantize` wrote it): every setup moves that format's bytes")
    arguments.add_miss_format(parser, "serve every setup's misses from a low-bit copy in this format ({formats}, its "
                              "default knobs; changes numbers: cache.miss_format)")
    arguments.add_json(parser)


def _shape_and_weights(args):
    """(ModelShape, the weights' folder or None). The deprecated --model-shape names the shape alone,
    and --model beside it the weights, as before."""
    from moepic.sim.shapes import model_shape

    if args.model_shape is not None:
        arguments.model_shape_note()
        weights = None if args.model is None else arguments.weights_folder(args.model, "gate_lookahead/mlp")
        return model_shape(args.model_shape), weights
    source = arguments.model_source(args.model)
    if isinstance(source, str):
        return model_shape(source), source
    return source, None


def _has_weights(folder: str) -> bool:
    """A folder may hold a shape alone (config.json): then it names no weights."""
    from pathlib import Path

    from moepic.checkpoint.files import INDEX_FILE, SINGLE_FILE

    return (Path(folder) / SINGLE_FILE).is_file() or (Path(folder) / INDEX_FILE).is_file()


def from_args(args):
    """The Testbed the arguments name. A folder's weights are loaded only where they can be used:
    gate_lookahead / mlp run on the trace's recorded router inputs."""
    from moepic.sim.run import Testbed, check_trace_fits
    from moepic.tracing import load_any_trace

    arguments.check_budget_form(args.budget)  # before any file is read
    miss_format = arguments.miss_format(args)
    fmt = arguments.expert_format(args)
    shape, weights = _shape_and_weights(args)
    if fmt is not None:
        shape = attrs.evolve(shape, expert_format=fmt, layer_formats=None)
    hw = arguments.hardware_profile(args)
    if args.hybrid not in (None, "off") and hw.host is None:
        raise ConfigError(f"--hybrid {args.hybrid} computes experts on the host CPU: give --host NAME|FILE to price it "
                          f"(bundled: {arguments.known_host_names()})")
    trace = check_trace_fits(load_any_trace(args.trace, num_experts=shape.spec.moe.num_experts), shape, args.trace)
    recall = arguments.parse_recall(args.recall, len(shape.spec.moe_layers))
    model = None
    if weights is not None and trace.hidden_NLD is not None and _has_weights(weights):
        from moepic.checkpoint.load import load_model

        from moepic.tracing.checks import router_inputs

        model = load_model(weights)
        router_inputs(trace, model.spec.hidden_size, args.trace)  # the model's width, or one line naming the trace
    return Testbed(trace=trace, shape=shape, hw=hw, budget=args.budget, recall=recall, model=model, context_tokens=args.context,
                   hybrid=args.hybrid, miss_format=None if miss_format is None else miss_format.config, batch=args.batch,
                   stream_tokens=args.stream_tokens)


def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.1f}"
