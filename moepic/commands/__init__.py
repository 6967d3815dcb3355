"""One module per `moepic` command, each in one pattern:

    NAME, HELP                      the command's name and one-line help
    add_parser(subparsers)          its flags (shared ones from commands/arguments.py)
    run(args) -> dict               the work: arguments in, a JSON-able report out
    text(report) -> str             the report for a reader (printed unless --json; on stderr
                                    where the module sets TEXT_ON_STDERR, as generate does)

A command module imports only what building its parser needs; its heavy dependencies (torch, the
registries) are imported inside `run`, so `moepic --help` is fast and one command never loads
another's. cli.py builds the top parser from `COMMANDS` and prints.
"""

from __future__ import annotations

from types import ModuleType

from moepic.commands import (
    compare,
    configure,
    fit_trace,
    generate,
    inspect,
    profile,
    routing_report,
    simulate,
    synth_trace,
    train_predictor,
)


class _Commands(tuple):
    """The command modules in `moepic --help` order, and by name."""

    @property
    def by_name(self) -> dict[str, ModuleType]:
        return {command.NAME: command for command in self}


COMMANDS = _Commands((generate, inspect, routing_report, train_predictor, profile, configure, simulate, compare, fit_trace,
                      synth_trace))
