"""Shared by the GPU tests: the host syncs a piece of work makes, and the device memory a run peaks at."""

from __future__ import annotations

import gc
import warnings
from collections.abc import Callable

import torch


def syncs_during(run: Callable[[], object]) -> list[str]:
    """The synchronizing CUDA operations `run()` makes, each as 'file:line: message' (torch's sync
    debug mode reports them as warnings). Make its inputs before: a tensor built from a Python
    list is itself a synchronizing copy."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if "synchronizing" in str(w.message)]


def peak_above_resident(model, make_engine, prompt):
    """(peak device bytes allocated above what was already allocated while `make_engine()` makes
    an engine that serves a 16-token run and is closed, the engine's layout, what was live at the
    peak: the largest allocations made in the run with the Python line that made each, for a
    failing assertion to print). Garbage is collected first: an earlier run's engine held by a
    reference cycle would otherwise be freed whenever the collector runs, maybe during this run."""
    from moepic.runtime.generation import generate

    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(stacks="python", clear_history=True)
    try:
        engine = make_engine()
        try:
            generate(model, prompt, max_new_tokens=16, eos_ids=(), experts=engine)
            torch.cuda.synchronize()
        finally:
            engine.close()
        trace = torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()]
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    return torch.cuda.max_memory_allocated() - before, engine.layout, live_at_peak(trace)


def live_at_peak(trace, largest: int = 8) -> str:
    """The allocator's trace replayed: the allocations live when the bytes this trace allocated
    peaked, the largest first, each with its size and the innermost moepic (else any) frame."""
    live, total, peak, at_peak = {}, 0, 0, {}
    for event in trace:
        if event["action"] == "alloc":
            live[event["addr"]] = event
            total += event["size"]
            if total > peak:
                peak, at_peak = total, dict(live)
        elif event["action"] == "free_requested" and event["addr"] in live:
            total -= live.pop(event["addr"])["size"]

    def where(event):
        frames = event.get("frames") or []
        ours = [f for f in frames if "moepic" in f["filename"]] or frames
        return f"{ours[0]['filename']}:{ours[0]['line']} ({ours[0]['name']})" if ours else "?"

    rows = sorted(at_peak.values(), key=lambda e: -e["size"])[:largest]
    return f"{peak} bytes allocated in the run at its peak; largest live then:\n" + "\n".join(
        f"  {e['size']:>10} {where(e)}" for e in rows
    )
