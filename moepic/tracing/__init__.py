"""Routing traces: record them while generating, store them as .npz with a JSON header, and read
the shared Mixtral JSONL traces into the same in-memory form. Feeds predictors, cache policies
that need a profile or the future (static, Belady) and the simulator.
"""

from pathlib import Path

from moepic.errors import ConfigError
from moepic.tracing.trace import RoutingTrace, TraceError, load_trace, save_trace


def load_any_trace(path: str | Path, *, num_experts: int | None = None) -> RoutingTrace:
    """A moepic .npz trace, or a JSONL routing log when the name ends in .jsonl. A caller that knows
    the model passes its `num_experts`: a JSONL log names only the ids it saw (a .npz header declares
    its own count, which the caller compares)."""
    from moepic.tracing.jsonl import load_jsonl_trace

    if str(path).endswith(".jsonl"):
        return load_jsonl_trace(path, num_experts=num_experts)
    return load_trace(path)


def trace_for(given: RoutingTrace | None, path: str | None, *, missing: str) -> tuple[RoutingTrace, str]:
    """A strategy's routing trace (a policy's profile or future, an oracle's future), given directly or
    read from `path`; and how to name it in errors. Neither: ConfigError(`missing`)."""
    if given is None:
        if path is None:
            raise ConfigError(missing)
        given = load_any_trace(path)
    return given, path or given.source or "the trace"


__all__ = ["RoutingTrace", "TraceError", "load_any_trace", "load_trace", "save_trace", "trace_for"]
