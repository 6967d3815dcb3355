"""Routing traces: record them while generating, store them as .npz with a JSON header, and read
the shared Mixtral JSONL traces into the same in-memory form. Feeds predictors, cache policies
that need a profile or the future (static, Belady) and the simulator.
"""

from pathlib import Path

from moepic.tracing.trace import RoutingTrace, TraceError, load_trace, save_trace


def load_any_trace(path: str | Path, *, num_experts: int | None = None) -> RoutingTrace:
    """A moepic .npz trace, or a JSONL routing log when the name ends in .jsonl. A caller that knows
    the model passes its `num_experts`: a JSONL log names only the ids it saw (a .npz header declares
    its own count, which the caller compares)."""
    from moepic.tracing.jsonl import load_jsonl_trace

    if str(path).endswith(".jsonl"):
        return load_jsonl_trace(path, num_experts=num_experts)
    return load_trace(path)


__all__ = ["RoutingTrace", "TraceError", "load_any_trace", "load_trace", "save_trace"]
