"""Benchmark: what the NaN/Inf check of every weight costs while a checkpoint loads.

A script, not a test. It loads bench_vs_hf.py's random Mixtral-shaped checkpoint (saved once, in
float32, under --workdir) with `load_model(check_weights=True)` and `check_weights=False`,
alternating which goes first each repeat, and prints one table: the median load time of each, the
difference per GB of weights loaded, and the ratio. The check is one sum per tensor (a finite sum
settles it), element by element only when the sum is not finite (moepic/checkpoint/files.py).

Run:  python experiments/bench_weight_check.py            (8 layers: 2.1 GB of weights in float32)
      python experiments/bench_weight_check.py --quick    (2 layers, 2 repeats)
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import time

import torch
from bench_vs_hf import checkpoint_folder  # noqa: E402 (a sibling script: experiments/ is sys.path[0])

from moepic.checkpoint.load import load_model
from moepic.core.footprint import footprint
from moepic.default_model import cache_root

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_seconds(folder, dtype: torch.dtype, check: bool) -> tuple[float, int]:
    """(seconds to load, bytes of weights loaded)."""
    gc.collect()
    start = time.perf_counter()
    model = load_model(folder, dtype=dtype, check_weights=check)
    took = time.perf_counter() - start
    return took, footprint(model.spec).total_params * dtype.itemsize


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default=cache_root() / "bench_vs_hf", help="where the checkpoint is saved (default: %(default)s)")
    p.add_argument("--layers", type=int, default=8, help="num_hidden_layers (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="timed loads per setting, medians shown (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="2 layers, 2 repeats")
    args = p.parse_args()
    layers, repeats = (2, 2) if args.quick else (args.layers, args.repeats)
    torch.set_num_threads(args.threads)
    folder = checkpoint_folder(args.workdir, layers, seed=0)
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{folder.name}, medians of {repeats} alternated loads after one warm-up each")
    print("| dtype | GB loaded | load, checked (s) | load, unchecked (s) | check cost (s per GB) | checked / unchecked |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, dtype in DTYPES.items():
        times = {True: [], False: []}
        size = 0
        for check in (True, False):
            load_seconds(folder, dtype, check)  # warm-up: the file into the page cache
        for r in range(repeats):
            for check in (True, False) if r % 2 == 0 else (False, True):
                took, size = load_seconds(folder, dtype, check)
                times[check].append(took)
        checked, unchecked = statistics.median(times[True]), statistics.median(times[False])
        gb = size / 1e9
        print(f"| {name} | {gb:.2f} | {checked:.2f} | {unchecked:.2f} | {(checked - unchecked) / gb:.3f} | {checked / unchecked:.2f} |")


if __name__ == "__main__":
    main()
