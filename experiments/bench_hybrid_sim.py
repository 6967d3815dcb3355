"""Benchmark: hybrid execution in the simulator — copy-only moepic, the hybrid baselines and
moepic-hybrid side by side (issue 17's table).

A script, not a test. Testbeds: the shared Mixtral-8x7B traces (gsm8k, humaneval; a gate-lookahead
stand-in of recall 0.85) and a Qwen1.5-MoE-shaped synthetic trace fitted to each (as
bench_simulator.py builds them), at 25 % and 50 % of expert bytes, on the A6000 and RTX 4090
reference profiles with the desktop-ddr5 reference host (all published figures, not measured).
Per testbed: every row's ms/token, and moepic-hybrid's ratio to copy-only moepic and to the best
hybrid baseline; then the θ the configurator chose per layer.

Run:  python experiments/bench_hybrid_sim.py [--gpus a6000,rtx4090] [--host desktop-ddr5] [--json FILE]
"""

from __future__ import annotations

import argparse
import collections
import json
from collections.abc import Sequence

import attrs
from tqdm.auto import tqdm

from bench_simulator import machine_line, testbeds_for_compare
from moepic.perfmodel.hardware import load_host, load_profile
from moepic.sim.baseline import HYBRID_ORDER, load_baseline
from moepic.sim.compare import compare_setups

ROWS = ("adapmoe", "moepic", *HYBRID_ORDER)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", default="a6000,rtx4090")
    parser.add_argument("--host", default="desktop-ddr5")
    parser.add_argument("--json", metavar="FILE", help="also write the reports here")
    args = parser.parse_args(argv)
    host = load_host(args.host)
    setups = [load_baseline(n) for n in ROWS]
    print(f"# hybrid comparison ({machine_line()}); host {host.name}: {host.source}\n")
    print("| testbed | " + " | ".join(ROWS) + " | hybrid ÷ moepic | hybrid ÷ best hybrid baseline |")
    print("| --- |" + " --- |" * (len(ROWS) + 2))
    reports, thetas = [], []
    beds = testbeds_for_compare()
    for gpu in args.gpus.split(","):
        hw = attrs.evolve(load_profile(gpu), host=host)
        for label, bed, budget in tqdm(beds, desc=gpu, leave=False):
            report = compare_setups(setups, attrs.evolve(bed, hw=hw))
            ms = {r["name"]: r["ms_per_token"] for r in report["rows"]}
            h = report["hybrid"]
            print(f"| {label}, {gpu}, {budget:.0%} | " + " | ".join(f"{ms[n]:.1f}" for n in ROWS)
                  + f" | {h['vs_moepic']:.2f} | {h['vs_best_hybrid_baseline']:.2f} ({h['best_hybrid_baseline']}) |")
            ours = next(r for r in report["rows"] if r["name"] == "moepic-hybrid")
            chosen = collections.Counter(round(l["theta"], 2) for l in ours["layers"])
            thetas.append(f"- {label}, {gpu}, {budget:.0%}: θ per layer " + ", ".join(f"{t:g}×{n}" for t, n in sorted(chosen.items())))
            reports.append({"testbed": label, "gpu": gpu, "budget": budget, **report})
    print("\n" + "\n".join(thetas))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(reports, f, indent=1, default=str)


if __name__ == "__main__":
    main()
