"""`moepic quantize`: a checkpoint whose routed experts are stored in an expert format (int8, int4,
…), every other tensor untouched, that every command loads. Side effects: reads the model, writes
the output folder (atomically: on failure nothing is left), a progress bar."""

from __future__ import annotations

from moepic.commands import arguments

NAME = "quantize"
HELP = "write a checkpoint with its routed experts quantized (int8, int4, …)"


def add_parser(subparsers):
    quantize = subparsers.add_parser(NAME, help=HELP)
    arguments.add_model(quantize, shape=False)
    arguments.add_expert_format(quantize, "expert format: {formats}", default="int4")
    quantize.add_argument("--out", required=True, metavar="DIR", help="the new checkpoint folder (must not exist)")
    arguments.add_json(quantize)
    return quantize


def run(args) -> dict:
    import attrs

    from moepic.checkpoint.quantize import quantize_checkpoint

    fmt = arguments.expert_format(args)
    folder = arguments.weights_folder(args.model, NAME)
    report = quantize_checkpoint(folder, args.out, fmt)
    return attrs.asdict(report)


def text(report: dict) -> str:
    mib = 2**20
    knobs = ", ".join(f"{k} {v}" for k, v in report["expert_format"].items() if k != "name")
    return (
        f"{report['out']}: {report['experts']} routed experts as {report['expert_format']['name']}"
        f"{f' ({knobs})' if knobs else ''}: "
        f"{report['expert_bytes_before'] / mib:.2f} MiB → {report['expert_bytes_after'] / mib:.2f} MiB "
        f"({_ratio(report['expert_bytes_before'], report['expert_bytes_after'])}), {report['files']} file(s)"
    )


def _ratio(before: int, after: int) -> str:
    return f"{before / after:.2f}× fewer bytes" if after <= before else f"{after / before:.2f}× more bytes"
