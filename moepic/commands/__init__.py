"""One module per `moepic` command, each in one pattern:

    NAME, HELP                      the command's name and one-line help
    add_parser(subparsers)          its flags (shared ones from commands/arguments.py)
    run(args) -> dict               the work: arguments in, a JSON-able report out
    text(report) -> str             the report for a reader (printed unless --json; on stderr
                                    where the module sets TEXT_ON_STDERR, as generate does)

A command module imports only what building its parser needs; its heavy dependencies (torch, the
registries) are imported inside `run`, so `moepic --help` is fast and one command never loads
another's. cli.py lists the modules, builds the top parser from them and prints.
"""
