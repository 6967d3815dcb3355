"""Routing traces: record them while generating, store them as .npz with a JSON header, and read
the shared Mixtral JSONL traces into the same in-memory form. Feeds predictors and the simulator.
"""

from moepic.tracing.trace import RoutingTrace, load_trace, save_trace

__all__ = ["RoutingTrace", "load_trace", "save_trace"]
