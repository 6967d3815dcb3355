"""Benchmark (simulated): 4-bit experts against bf16 ones for Mixtral-8x7B on the shared routing
traces, on an A6000 profile, through `moepic compare`: moepic and the copy-only systems on the same
format, at the same share of the experts' bytes and at the same VRAM in bytes.

A script, not a test; simulated, so deterministic: one run is the number. Rows per trace:
  moepic bf16 @ 25 %            the cache holds a quarter of the bf16 expert bytes
  <system> int4 @ 25 %          a quarter of the int4 bytes: the same number of experts
  moepic int4 @ bf16's VRAM     the same bytes as the bf16 row: ~3.6× the experts
Columns: ms/token, hit rate, MiB copied per token, the mean θ the configurator chose, and the
speed-up over moepic bf16. The figure saved beside (--plot) shows ms/token per row.

Run:  python experiments/bench_quant_sim.py [--recall 0.85] [--plot experiments/results/quant/sim.png]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from pathlib import Path

import attrs

from moepic.cli import main as moepic
from moepic.sim.shapes import model_shape
from moepic.quant import build_format

TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces" / "mixtral-8x7b-instruct-fp8"


def compare(trace: Path, budget: str, fmt: str | None, recall: float) -> dict:
    argv = ["compare", "--trace", str(trace), "--model", "mixtral-8x7b", "--hardware", "a6000", "--budget", budget,
            "--recall", str(recall), "--json"] + (["--format", fmt, "--group-size", "64"] if fmt else [])
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert moepic(argv) == 0, argv
    return {row["name"]: row for row in json.loads(out.getvalue())["rows"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recall", type=float, default=0.85, help="gate lookahead's stand-in recall")
    parser.add_argument("--plot", type=Path, help="save a bar chart of ms/token here")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    traces = sorted(TRACES.glob("*.jsonl"))
    if not traces:
        raise SystemExit(f"no traces under {TRACES}: this benchmark needs the shared Mixtral traces")
    shape = model_shape("mixtral-8x7b")
    bf16_bytes = shape.expert_bytes
    same_vram = f"{bf16_bytes // 4}B"
    results = {}
    for trace in traces:
        bf16 = compare(trace, "0.25", None, args.recall)
        int4 = compare(trace, "0.25", "int4", args.recall)
        int4_vram = compare(trace, same_vram, "int4", args.recall)
        results[trace.stem] = {
            "moepic bf16 @ 25%": bf16["moepic"],
            "on-demand-lru int4 @ 25%": int4["on-demand-lru"],
            "lru-prefetch int4 @ 25%": int4["lru-prefetch"],
            "moepic int4 @ 25%": int4["moepic"],
            "oracle int4 @ 25%": int4["oracle"],
            "moepic int4 @ bf16's VRAM": int4_vram["moepic"],
        }
    int4_bytes = attrs.evolve(shape, expert_format=build_format({"name": "int4", "group_size": 64})).expert_bytes
    print(f"Mixtral-8x7B on a6000 (simulated), gate lookahead recall {args.recall}; experts: bf16 {bf16_bytes / 2**30:.1f} GiB, "
          f"int4-g64 {int4_bytes / 2**30:.1f} GiB; bf16's 25 % = {bf16_bytes / 4 / 2**30:.1f} GiB")
    for trace, rows in results.items():
        base = rows["moepic bf16 @ 25%"]["ms_per_token"]
        print(f"\n{trace} ({rows['moepic bf16 @ 25%']['tokens']} decode tokens)")
        print(f"{'setup':<28} {'ms/token':>9} {'hit rate':>9} {'MiB/token':>10} {'mean θ':>7} {'speed-up':>9}")
        for name, row in rows.items():
            thetas = [layer["theta"] for layer in row["layers"]]
            print(f"{name:<28} {row['ms_per_token']:>9.1f} {row['expert_hit_rate']:>9.1%} "
                  f"{row['bytes_loaded_per_token'] / 2**20:>10,.0f} {sum(thetas) / len(thetas):>7.2f} {base / row['ms_per_token']:>8.2f}×")
    if args.json:
        args.json.write_text(json.dumps({t: {n: {k: r[k] for k in ("ms_per_token", "expert_hit_rate", "bytes_loaded_per_token")}
                                             | {"thetas": [layer["theta"] for layer in r["layers"]]} for n, r in rows.items()}
                                         for t, rows in results.items()}, indent=2) + "\n")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
        for ax, (trace, rows) in zip(axes[0], results.items()):
            ax.barh(list(rows), [r["ms_per_token"] for r in rows.values()], color="tab:blue")
            ax.invert_yaxis()
            ax.set_xlabel("ms / token (simulated, A6000)")
            ax.set_title(trace)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
