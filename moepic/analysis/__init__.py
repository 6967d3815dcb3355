"""Routing analysis: expert load, temporal reuse and next-layer predictability of a model's routing."""
