"""`python -m moepic` and the `moepic` console script. Interrupt handling is installed before the
command's imports, which take seconds (torch): Ctrl-C during them still ends in one line; and the
process ends by `interrupts.finish`, so a Ctrl-C during its exit cannot kill it without a word."""

from moepic import interrupts


def run() -> None:
    interrupts.install_early()
    from moepic.cli import main

    interrupts.finish(main())


if __name__ == "__main__":
    run()
