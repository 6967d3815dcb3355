"""Where cells run: local worker processes (default) or an existing Ray cluster. Side effects.

Both return the records in cell order, so the table does not depend on where (or in which order)
the cells ran. Ray is an optional extra (`pip install -e ".[ray]"`), imported only here.

On Ctrl-C (or any error) nothing is waited for: cells not started are cancelled and running ones
killed (local workers) or cancelled by force (Ray). Local workers ignore SIGINT/SIGTERM themselves —
a terminal's Ctrl-C reaches the whole process group — so that only this process decides, and no
worker prints a KeyboardInterrupt traceback of its own.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
from collections.abc import Sequence

from moepic import interrupts, progress as progress_bars
from moepic.errors import ConfigError
from moepic.experiments.backends import run_cell
from moepic.experiments.config import ExecutorConfig
from moepic.experiments.grid import Cell

WAKE_S = 0.1  # longest the main thread waits for cells without checking for a Ctrl-C


def run_cells(cells: Sequence[Cell], executor: ExecutorConfig, *, desc: str, progress: bool = True) -> list[dict]:
    bar = progress_bars.bar(total=len(cells), desc=desc, unit="cell", wanted=progress)
    try:
        if executor.kind == "ray":
            return _run_ray(cells, executor.address, bar)
        return _run_local(cells, executor.workers or os.cpu_count() or 1, bar)
    finally:
        bar.close()


def _run_local(cells: Sequence[Cell], workers: int, bar) -> list[dict]:
    if workers == 1 or len(cells) == 1:  # in this process: no start-up cost, and tracebacks stay simple
        out = []
        for cell in cells:
            out.append(run_cell(cell.config))
            bar.update(1)
        return out
    # spawn, not fork: the parent may hold torch's thread pools, which do not survive a fork.
    context = multiprocessing.get_context("spawn")
    pool = concurrent.futures.ProcessPoolExecutor(
        min(workers, len(cells)), mp_context=context, initializer=interrupts.ignore_signals_in_worker
    )
    try:
        with interrupts.signals_blocked():  # the workers start here (see ignore_signals_in_worker)
            futures = {pool.submit(run_cell, cell.config): cell.index for cell in cells}
        records: dict[int, dict] = {}
        pending = set(futures)
        while pending:
            # In short slices: a Ctrl-C the kernel hands to another thread is raised in this one only
            # once it runs Python code again.
            done, pending = concurrent.futures.wait(pending, timeout=WAKE_S, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                records[futures[future]] = future.result()
                bar.update(1)
    except BaseException:
        _stop_local(pool)
        raise
    pool.shutdown()
    return [records[cell.index] for cell in cells]


def _stop_local(pool: concurrent.futures.ProcessPoolExecutor) -> None:
    """Cancel the cells not started and kill the running ones, without waiting for any."""
    workers = list((getattr(pool, "_processes", None) or {}).values())  # before shutdown forgets them
    pool.shutdown(wait=False, cancel_futures=True)
    for worker in workers:
        worker.kill()  # SIGKILL: the workers ignore SIGINT and SIGTERM
    for worker in workers:
        worker.join(timeout=1.0)


def _run_ray(cells: Sequence[Cell], address: str | None, bar) -> list[dict]:
    try:
        import ray
    except ImportError:
        raise ConfigError('executor.kind ray needs the ray extra: pip install -e ".[ray]"') from None
    if not ray.is_initialized():
        # Ray's own order: RAY_ADDRESS, else `address`, else the latest `ray start` on this machine,
        # else a new local instance.
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    remote = ray.remote(run_cell)
    refs = [remote.remote(cell.config) for cell in cells]
    index = {ref: i for i, ref in enumerate(refs)}
    records: dict[int, dict] = {}
    waiting = list(refs)
    try:
        while waiting:
            done, waiting = ray.wait(waiting, num_returns=1, timeout=WAKE_S)  # short: see _run_local
            if not done:
                continue
            try:
                records[index[done[0]]] = ray.get(done[0])
            except ray.exceptions.RayTaskError as e:  # a cell's own error (a ConfigError, say), as raised there
                cause = getattr(e, "cause", None)
                raise (cause if isinstance(cause, Exception) else e.as_instanceof_cause()) from None
            bar.update(1)
    except BaseException:
        for ref in waiting:  # the cluster is not ours to wait on: its cells stop with us
            try:
                ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 (already finished or gone: nothing to cancel)
                pass
        raise
    return [records[i] for i in range(len(cells))]
