"""Where cells run: local worker processes (default) or an existing Ray cluster. Side effects.

Both return the records in cell order, so the table does not depend on where (or in which order)
the cells ran. Ray is an optional extra (`pip install -e ".[ray]"`), imported only here.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
from collections.abc import Sequence

from tqdm.auto import tqdm

from moepic.errors import ConfigError
from moepic.experiments.backends import run_cell
from moepic.experiments.config import ExecutorConfig
from moepic.experiments.grid import Cell


def run_cells(cells: Sequence[Cell], executor: ExecutorConfig, *, desc: str, progress: bool = True) -> list[dict]:
    bar = tqdm(total=len(cells), desc=desc, unit="cell", disable=not progress)
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
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(cells)), mp_context=context) as pool:
        futures = {pool.submit(run_cell, cell.config): cell.index for cell in cells}
        records: dict[int, dict] = {}
        for future in concurrent.futures.as_completed(futures):
            records[futures[future]] = future.result()
            bar.update(1)
    return [records[cell.index] for cell in cells]


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
    while waiting:
        done, waiting = ray.wait(waiting, num_returns=1)
        try:
            records[index[done[0]]] = ray.get(done[0])
        except ray.exceptions.RayTaskError as e:  # a cell's own error (a ConfigError, say), as raised there
            cause = getattr(e, "cause", None)
            raise (cause if isinstance(cause, Exception) else e.as_instanceof_cause()) from None
        bar.update(1)
    return [records[i] for i in range(len(cells))]
