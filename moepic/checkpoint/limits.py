"""Bounds and number rules for values read from config.json. Pure.

Tensor dims beyond int32 occur in no checkpoint; a bigger value is a typo (1e12), and an unchecked
one could make moepic build tables that large from config.json alone (`inspect`, `--model-shape`)
before any tensor is compared with it.
"""

import math

MAX_SIZE = 2**31 - 1
# The spec holds one entry per layer, built before the first tensor is read: bound it well below MAX_SIZE.
MAX_LAYERS = 100_000


def as_float(number: int | float) -> float:
    """A JSON number as a float; an integer past float range (JSON may spell out 10**400) is inf."""
    try:
        return float(number)
    except OverflowError:
        return math.inf
