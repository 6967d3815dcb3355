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
    an engine that serves a 16-token run and is closed, the engine's layout). Garbage is collected
    first: an earlier run's engine held by a reference cycle would otherwise be freed whenever the
    collector runs, maybe during this run, hiding part of its peak."""
    from moepic.runtime.generation import generate

    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    engine = make_engine()
    try:
        generate(model, prompt, max_new_tokens=16, eos_ids=(), experts=engine)
        torch.cuda.synchronize()
    finally:
        engine.close()
    return torch.cuda.max_memory_allocated() - before, engine.layout
