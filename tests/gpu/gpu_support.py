"""Shared by the GPU tests: counting the host syncs a piece of work makes."""

from __future__ import annotations

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
