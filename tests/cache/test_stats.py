"""cache/stats.py: the counters the engine and the simulator share (unit)."""

from __future__ import annotations

from moepic.cache.stats import PredictionCounts


def test_prediction_counts_add_what_was_named_routed_and_both():
    counts = PredictionCounts()
    counts.add({1, 2, 3}, [2, 5])
    counts.add(set(), [4])
    assert (counts.steps, counts.predicted, counts.routed, counts.correct) == (2, 3, 3, 1)
    assert (counts.recall, counts.precision) == (1 / 3, 1 / 3)
