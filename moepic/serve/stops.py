"""Stop strings on a growing text: what may be shown, and where it ends. Pure.

OpenAI's `stop` ends a completion before the first occurrence of any of its strings, which are
not part of the text. Tokens arrive one at a time and a stop string can span several, so text that
could still become the start of one is held back until the next piece settles it.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopText:
    """Text as it grows, cut at the first stop string. `push` returns what may be shown now."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.stopped = False
        self._text = ""
        self._shown = 0  # characters of _text handed out

    def push(self, piece: str) -> str:
        if self.stopped:
            return ""
        self._text += piece
        # A stop cannot start before what was shown: its start would have been held back.
        found = [i for i in (self._text.find(s, self._shown) for s in self.stops) if i >= 0]
        if found:
            self.stopped = True
            return self._take(min(found))
        return self._take(len(self._text) - self._held())

    def flush(self) -> str:
        """At the end (EOS, token limit): held text that never became a stop string."""
        return "" if self.stopped else self._take(len(self._text))

    def _held(self) -> int:
        """Length of the longest end of the text that begins some stop string."""
        tail = self._text[self._shown :]
        return max((k for s in self.stops for k in range(min(len(s) - 1, len(tail)), 0, -1) if tail.endswith(s[:k])),
                   default=0)

    def _take(self, end: int) -> str:
        piece, self._shown = self._text[self._shown : end], max(self._shown, end)
        return piece
