"""Benchmark: hybrid execution against copy-only offloading, on a CPU with an emulated link.

A script, not a test. The bundled model decodes greedily from a held-out KJV prompt through the
real offloading engine, over an emulated host→device link calibrated as in bench_prefetch.py (one
whole-expert copy takes `--ratio` times one layer's compute, the regime of a PCIe copy), at two
budgets. Three ways to run the loads, side by side: copy-only (`--hybrid off`), hybrid `auto`
(priced at start-up as `moepic generate` prices it: the host measured here, the emulated link)
and `host-only`. Decode ms/token, exposed copy ms/token, host busy ms/token and how many loads
ran on the host per token. Medians of --repeats runs, alternating the cells' order each round so
that drift lands on every cell alike; every run's tokens are compared with the dense model's.
Beside each, the simulator's ms/token for the same layout, policy and placement on the run's
routing, with this machine's profile measured through the same link, the host priced as the
engine priced it, and the engine's own host work fitted (as `moepic profile` fits it) to the
copy-only cells, then its work per host load to the host-only cells: the `auto` cells are held
out, so their ratio is the simulator's fidelity for hybrid runs.

On a CPU the "device" and the host are the same cores: a host job runs beside the main thread's
expert compute and competes with it for them. What hybrid execution saves here is the emulated
link's time; on a GPU machine the host's cores are otherwise idle.

Run:  python experiments/bench_hybrid.py             (full, ~2 min idle)
      python experiments/bench_hybrid.py --quick     (smoke: fewer tokens, one repeat)
      python experiments/bench_hybrid.py --json      (one JSON object instead of the table)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from moepic.checkpoint.load import load_model
from moepic.datasets import DATASETS
from moepic.default_model import default_model_dir
from moepic.policies import POLICIES
from moepic.runtime.generation import generate
from moepic.runtime.host_pricing import run_pricing
from moepic.runtime.offload import offloaded_experts
from moepic.tokenizer import TextCodec
from moepic.tracing.recorder import RoutingRecorder

sys.path.insert(0, str(Path(__file__).parent))
from bench_prefetch import calibrated_link  # noqa: E402 (the link calibration is bench_prefetch's)

MODES = ("off", "auto", "host-only")
LABELS = {"off": "copy-only", "auto": "hybrid auto", "host-only": "host-only"}
BUDGETS = (0.25, 0.5)
CALIBRATION = ("off", "host-only")  # the engine's host work is fitted on these cells; auto's are held out


def one_run(model, prompt, tokens: int, budget: float, theta: float, mode: str, link, pricing) -> dict:
    engine = offloaded_experts(
        model, budget, theta, POLICIES["lcp"].config(), link=link, hybrid=mode, pricing=pricing if mode == "auto" else None
    )
    try:
        result = generate(model, prompt, max_new_tokens=tokens, eos_ids=(), experts=engine)
    finally:
        engine.close()
    report = engine.report()
    decode_tokens = max(1, len(result.token_ids) - 1)
    return {
        "layout": engine.layout,
        "tokens": result.token_ids,
        "ms_per_token": result.stats.decode_s_per_token * 1e3,
        "exposed_ms_per_token": report["decode_exposed_copy_s_per_token"] * 1e3,
        "host_ms_per_token": report["decode_host_s_per_token"] * 1e3,
        # Over the whole run (the prompt's step included): loads the host computed per decode token.
        "host_loads_per_token": (report["host_experts"] + report["host_bottoms"]) / decode_tokens,
        "demand_mib": report["demand_bytes"] / 2**20,
    }


def simulate_cells(model, prompt, tokens: int, trace, link, pricing, runs) -> dict[tuple[float, str], float]:
    """Simulated decode ms/token of every cell (see the module docstring)."""
    import attrs

    from moepic.perfmodel.latency import model_times
    from moepic.policies.base import build_policy
    from moepic.runtime.measure import measure_profile
    from moepic.sim.calibrate import MeasuredRun, fit_engine_overheads
    from moepic.sim.simulate import simulate

    hw = measure_profile(device="cpu", model_folder=str(default_model_dir()), dtype=model.dtype, link=link, engine=False)
    hw = attrs.evolve(hw, host=pricing.host)
    times = model_times(hw, model.spec, dtype_bytes=model.dtype.itemsize, context_tokens=len(prompt) + tokens // 2)
    lcp = lambda: build_policy(POLICIES["lcp"].config())  # noqa: E731 (a fresh one per replay)
    layout = {cell: cell_runs[0]["layout"] for cell, cell_runs in runs.items()}
    measured = {cell: statistics.median(run["ms_per_token"] for run in cell_runs) / 1e3 for cell, cell_runs in runs.items()}
    hw = fit_engine_overheads(hw, times, trace, [
        MeasuredRun(layout[cell], lcp(), None, measured[cell], hybrid=cell[1]) for cell in runs if cell[1] in CALIBRATION
    ])
    return {cell: 1e3 * float(simulate(trace, layout[cell], lcp(), times, hw, hybrid=cell[1]).token_s.mean()) for cell in runs}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--ratio", type=float, default=3.0, help="whole-expert copy time / one layer's compute")
    parser.add_argument("--theta", type=float, default=0.5, help="split ratio of every layer")
    parser.add_argument("--tokens", type=int, help="new tokens per run (default 48; quick 16)")
    parser.add_argument("--repeats", type=int, help="runs per cell (default 5; quick 1)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    tokens = args.tokens or (16 if args.quick else 48)
    repeats = args.repeats or (1 if args.quick else 5)

    model = load_model(default_model_dir(), offload_experts=True)
    text = DATASETS["kjv-heldout"].read_text()
    prompt = TextCodec.from_folder(default_model_dir()).encode(text[len(text) // 2 : len(text) // 2 + 2000])[:64]
    recorder = RoutingRecorder(model.spec, model_name="kjv-moe-tiny")
    dense = generate(model, prompt, max_new_tokens=tokens, eos_ids=(), tap=recorder)
    link, layer_s = calibrated_link(model, prompt, tokens, args.ratio)
    notes = []
    pricing = run_pricing(model.device, model.dtype.itemsize, host=None, link=link, threads=None, note=notes.append)
    cells = [(budget, mode) for budget in BUDGETS for mode in MODES]
    runs: dict[tuple[float, str], list[dict]] = {cell: [] for cell in cells}
    with tqdm(total=(repeats + 1) * len(cells), desc="runs", unit="run", leave=False, disable=args.json) as bar:
        for r in range(repeats + 1):  # the first round warms up
            for cell in cells if r % 2 == 0 else cells[::-1]:
                budget, mode = cell
                run = one_run(model, prompt, tokens, budget, args.theta, mode, link, pricing)
                if mode == "off" and run["tokens"] != dense.token_ids:
                    raise AssertionError(f"{cell}: copy-only tokens differ from the dense model's")
                if r:
                    runs[cell].append(run)
                bar.update(1)

    simulated = simulate_cells(model, prompt, tokens, recorder.trace(), link, pricing, runs)
    rows = []
    for budget, mode in cells:
        cell_runs = runs[budget, mode]
        row = {"budget": budget, "mode": mode, "runs": len(cell_runs),
               "tokens_equal_dense": all(run["tokens"] == dense.token_ids for run in cell_runs)}
        for key in ("ms_per_token", "exposed_ms_per_token", "host_ms_per_token", "host_loads_per_token", "demand_mib"):
            row[key] = statistics.median(run[key] for run in cell_runs)
        copy_only = statistics.median(run["ms_per_token"] for run in runs[budget, "off"])
        row["vs_copy_only"] = row["ms_per_token"] / copy_only
        row["simulated_ms_per_token"] = simulated[budget, mode]
        row["simulated_vs_measured"] = simulated[budget, mode] / row["ms_per_token"]
        rows.append(row)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"{torch.get_num_threads()} threads, load {load:.2f}")
    setting = (
        f"Bundled model ({model.dtype}, CPU), {tokens} new tokens after a {len(prompt)}-token held-out prompt; LCP, "
        f"θ {args.theta:g}, no prediction; emulated link {link.gbps:.3f} GB/s + {link.latency_us:.0f} µs: a whole "
        f"expert takes {args.ratio:g}× a layer's compute ({args.ratio * layer_s * 1e3:.2f} ms vs {layer_s * 1e3:.2f} ms); "
        f"medians of {repeats} runs"
    )
    if args.json:
        print(json.dumps({"setting": setting, "pricing": notes, "machine": machine, "rows": rows}, indent=1))
        return
    print(setting)
    print(*notes, sep="\n")
    header = (f"{'budget':>6} | {'mode':<11} | {'ms/tok':>7} | {'× copy':>6} | {'exposed':>7} | {'host ms':>7} | "
              f"{'host loads/tok':>14} | {'demand MiB':>10} | {'sim ms':>6} | {'sim/meas':>8} | tokens = dense")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['budget']:6.0%} | {LABELS[row['mode']]:<11} | {row['ms_per_token']:7.2f} | {row['vs_copy_only']:6.2f} | "
            f"{row['exposed_ms_per_token']:7.2f} | {row['host_ms_per_token']:7.2f} | {row['host_loads_per_token']:14.1f} | "
            f"{row['demand_mib']:10.1f} | {row['simulated_ms_per_token']:6.2f} | {row['simulated_vs_measured']:8.2f} | "
            f"{'yes' if row['tokens_equal_dense'] else 'no'}"
        )
    print(f"machine: {machine}")


if __name__ == "__main__":
    main()
