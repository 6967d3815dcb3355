"""moepic/ranges.py: one stated range serves as an attrs validator and an argparse type (unit + property)."""

from __future__ import annotations

import argparse
import math

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moepic.ranges import OutOfRange, Range

OPEN = Range(0, 10, low_open=True)
WHOLE = Range(1, 3, whole=True)


@given(x=st.floats(allow_nan=True, allow_infinity=True))
def test_a_float_is_inside_exactly_when_it_lies_between_the_ends(x):
    assert (x in OPEN) == (0 < x <= 10)  # NaN: every comparison false, so never inside
    if math.isnan(x) or math.isinf(x):
        assert x not in OPEN


@given(n=st.integers(-10, 10) | st.floats(allow_nan=False, allow_infinity=False) | st.booleans())
def test_a_whole_range_takes_integers_only_and_never_a_bool(n):
    expected = isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 3
    assert (n in WHOLE) == expected


def test_the_message_states_the_range_with_its_open_end():
    assert OPEN.describe() == "a number in (0, 10]"
    assert WHOLE.describe() == "an integer in [1, 3]"
    assert Range(0, 1e-3).describe() == "a number in [0, 0.001]"


@attrs.frozen
class _Knobs:
    rate: float | None = attrs.field(default=None, validator=OPEN)
    per_layer: tuple[float, ...] = attrs.field(default=(), validator=OPEN)


def test_as_a_validator_it_names_the_field_and_skips_none():
    assert _Knobs().rate is None
    with pytest.raises(OutOfRange) as info:
        _Knobs(rate=float("nan"))
    assert (info.value.name, str(info.value)) == ("rate", "rate: expected a number in (0, 10], got nan")
    with pytest.raises(OutOfRange, match=r"^per_layer\[1\]: expected a number in \(0, 10\], got 0$"):
        _Knobs(per_layer=(1.0, 0))


@pytest.mark.parametrize("text", ["nan", "inf", "-1", "0", "11", "x", "1e400"])
def test_as_an_argparse_type_it_rejects_the_text_with_the_range(text):
    with pytest.raises(argparse.ArgumentTypeError, match=rf"^expected a number in \(0, 10\], got '{text}'$"):
        OPEN.parse(text)


def test_as_an_argparse_type_it_converts_what_lies_inside():
    assert OPEN.parse("2.5") == 2.5 and WHOLE.parse("3") == 3 and type(WHOLE.parse("2")) is int
    with pytest.raises(argparse.ArgumentTypeError):
        WHOLE.parse("2.0")  # a count is written as a whole number
