"""`python -m moepic` and the `moepic` console script. Interrupt handling is installed before the
command's imports, which take seconds (torch): Ctrl-C during them still ends in one line."""

import sys

from moepic import interrupts


def run() -> None:
    interrupts.install_early()
    from moepic.cli import main

    sys.exit(main())


if __name__ == "__main__":
    run()
