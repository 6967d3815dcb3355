"""The stated range of a numeric config key or flag, written once. Pure.

A `Range` is both an attrs validator (`attrs.field(validator=THETA)`: the message names the field
and the range) and an argparse type (`type=CONTEXT_TOKENS.parse`: the flag is checked as it is
parsed). Every range has a finite upper end, so inf and absurd sizes fail along with NaN (every
comparison with NaN is false, so it is never inside a range), zero and negatives where they make
no sense. Ranges used by more than one key or flag live here; a key's own range sits on its field.
"""

from __future__ import annotations

import argparse
import numbers

import attrs


class OutOfRange(ValueError):
    """A value outside its key's range. `moepic.structure.structure` adds the section to `name`."""

    def __init__(self, name: str, value: object, expected: str) -> None:
        self.name, self.value, self.expected = name, value, expected
        super().__init__(f"{name}: expected {expected}, got {value!r}")


@attrs.frozen
class Range:
    low: float
    high: float
    low_open: bool = False  # (low, high]: e.g. a bandwidth must be > 0
    whole: bool = False  # integers only

    def describe(self) -> str:
        kind = "an integer" if self.whole else "a number"
        return f"{kind} in {'(' if self.low_open else '['}{_number(self.low)}, {_number(self.high)}]"

    def __contains__(self, value: object) -> bool:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral if self.whole else numbers.Real):
            return False
        above_low = self.low < value if self.low_open else self.low <= value
        return above_low and value <= self.high

    def check(self, name: str, value: object) -> None:
        """`value`, or each value of a per-layer tuple (named `name[i]`), must lie in the range."""
        if isinstance(value, tuple):
            for i, item in enumerate(value):
                self.check(f"{name}[{i}]", item)
        elif value not in self:
            raise OutOfRange(name, value, self.describe())

    def __call__(self, instance: object, attribute: attrs.Attribute, value: object) -> None:
        """As an attrs validator. None is left alone: on an `X | None` field it means "not given"."""
        if value is not None:
            self.check(attribute.name, value)

    def parse(self, text: str) -> int | float:
        """As an argparse `type=`: the flag's text, converted and checked."""
        try:
            value = int(text) if self.whole else float(text)
        except ValueError:
            value = None
        if value is None or value not in self:
            raise argparse.ArgumentTypeError(f"expected {self.describe()}, got {text!r}")
        return value


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e20 else f"{x:g}"


# Shared by config keys and flags of several commands.
THETA = Range(0, 1)  # the share of an expert's neurons cached
RECALL = Range(0, 1)
LINK_GBPS = Range(0, 10_000, low_open=True)  # 10 TB/s: far above any host link
LINK_LATENCY_US = Range(0, 1e6)  # one second per copy
CONTEXT_TOKENS = Range(0, 2**24, whole=True)  # 16 Mi tokens: beyond any model's context
HOST_THREADS = Range(1, 4096, whole=True)  # host worker threads (hybrid runs, moepic profile)
SEED = Range(0, 2**64 - 1, whole=True)  # what torch.Generator.manual_seed accepts
BATCH = Range(1, 1024, whole=True)  # streams decoded together: beyond what a device's KV caches hold
STREAM_TOKENS = Range(1, 10**7, whole=True)  # decode tokens per request a trace's sequences are cut into
