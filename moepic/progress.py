"""Progress bars and streamed text: the one rule for when bars show, and a clean line for what
follows them. Side effects: draws on stderr, streams on stdout; reads whether stderr is a terminal.

A bar shows only where a person watches it: when stderr is a terminal, or when the user asked with
`--progress` (`force`). Redirected to a file or a pipe, a bar is a stream of `\\r` frames that buries
the lines around it. Every bar in moepic is made by `bar`, so the rule lives here alone.
"""

from __future__ import annotations

import sys
import weakref

from tqdm.auto import tqdm

_forced = False
_live: weakref.WeakSet = weakref.WeakSet()  # bars made here and not yet closed
_stream_mid_line = False  # `stream` left stdout inside a line


def force(on: bool) -> None:
    """Show bars even when stderr is not a terminal (`--progress`)."""
    global _forced
    _forced = bool(on)


def shown(wanted: bool = True) -> bool:
    """Whether a bar the caller wants (`wanted`: e.g. not in --json mode) is drawn."""
    if not wanted:
        return False
    if _forced:
        return True
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def bar(*args, wanted: bool = True, **kwargs) -> tqdm:
    """A tqdm bar on stderr, drawn only where `shown(wanted)` says."""
    progress = tqdm(*args, disable=not shown(wanted), **kwargs)
    _live.add(progress)
    return progress


def stream(text: str) -> None:
    """Write generated text to stdout as it comes (the text is its own progress display)."""
    global _stream_mid_line
    sys.stdout.write(text)
    sys.stdout.flush()
    if text:
        _stream_mid_line = not text.endswith("\n")


def end_line() -> None:
    """Close every bar still open and end a streamed line cut short, so that the next line starts in
    column 0 (an error or "interrupted" would otherwise be glued to a bar's last frame or to the text)."""
    global _stream_mid_line
    for progress in list(_live):
        if not progress.disable:
            progress.close()
    _live.clear()
    if _stream_mid_line:
        sys.stdout.write("\n")
        sys.stdout.flush()
        _stream_mid_line = False
