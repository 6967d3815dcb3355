"""The `moepic` command: the top parser built from the command modules, dispatch, printing, and user
mistakes and interrupts as one line.

Each command is one module in moepic/commands with `NAME`, `HELP`, `add_parser(subparsers)`,
`run(args) -> report dict` and `text(report) -> str` (the pattern: moepic/commands/__init__.py); the flags
they share are spelled once in moepic/commands/arguments.py. `moepic COMMAND --help` lists each
command's flags. Commands that draw progress bars (generate, train-predictor, profile, configure,
compare) draw them only when stderr is a terminal, or with --progress. Ctrl-C ends any command with
exit code 130 (SIGTERM: 143) and no traceback; see moepic/interrupts.py.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import sys
from collections.abc import Sequence

from moepic import interrupts, progress
from moepic.commands import (
    arguments,
    compare,
    configure,
    eval_ppl,
    fit_trace,
    generate,
    inspect,
    profile,
    quantize,
    routing_report,
    serve,
    simulate,
    synth_trace,
    train_policy,
    train_predictor,
)
from moepic.errors import MoepicError

# The commands, in `moepic --help` order.
COMMANDS = (generate, serve, inspect, routing_report, train_predictor, train_policy, profile, configure, simulate, compare, fit_trace, synth_trace, quantize, eval_ppl)


def build_parser() -> arguments.Parser:
    parser = arguments.Parser(prog="moepic", description="Exact MoE inference with experts offloaded to host memory.")
    parser.add_argument("--version", action="version", version=f"moepic {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=arguments.Parser)
    subparsers.add_parser = functools.partial(subparsers.add_parser, formatter_class=arguments.HelpFormatter)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def _version() -> str:
    try:
        return importlib.metadata.version("moepic")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        from moepic import __version__

        return __version__


def main(argv: Sequence[str] | None = None) -> int:
    with interrupts.handled():
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:  # `moepic` alone: what the commands are
            sys.stderr.write(parser.format_help())
            return 2
        command = next(command for command in COMMANDS if command.NAME == args.command)
        progress.force(getattr(args, "progress", False))
        report = command.run(args)
    except (Exception, KeyboardInterrupt) as e:
        code = interrupts.interruption(e)  # Ctrl-C / SIGTERM, or what it caused
        if code is None and not isinstance(e, MoepicError):
            raise  # a bug in moepic: keep its traceback
        progress.end_line()
        if code is None:
            print(f"moepic: error: {e}", file=sys.stderr)
            return 2
        print(f"moepic: {interrupts.message(code)}", file=sys.stderr)
        interrupts.leave(code)
        return code
    if args.json:
        print(json.dumps(report))
    else:
        print(command.text(report), file=sys.stderr if getattr(command, "TEXT_ON_STDERR", False) else sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
