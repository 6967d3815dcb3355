"""Benchmark: decode speed of the bundled model with quantized experts against its bf16 self, on
this machine's device (the CPU here), all-resident and offloaded.

A script, not a test. Each format loads once (experts encoded as they load, as `moepic quantize`
writes them); every repeat runs every (format, mode) once, in an order rotated each repeat, so
load from other processes hits all alike; one untimed warm-up first. Modes: `dense` (every expert
resident, decoded right before its matmuls) and `offloaded` (the engine at --budget of the
format's own expert bytes, θ auto, lcp, on demand; on the CPU the "device" is host memory, so this
times the engine's work, not a link). Prints medians of --repeats: decode ms/token, its ratio to
bf16 in the same mode, and MiB loaded per token.

Run:  python experiments/bench_quant_speed.py
      python experiments/bench_quant_speed.py --repeats 3 --tokens 32     (quicker)
      python experiments/bench_quant_speed.py --device cuda               (on a GPU)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import torch

from moepic.checkpoint.load import load_model
from moepic.default_model import default_model_dir
from moepic.policies import POLICIES
from moepic.quant import build_format
from moepic.runtime.generation import generate
from moepic.runtime.offload import offloaded_experts

FORMATS = {"bf16": {"name": "dense"}, "int8-g64": {"name": "int8", "group_size": 64}, "int4-g64": {"name": "int4", "group_size": 64},
           "int4-fused": {"name": "int4-fused", "group_size": 64},
           "mxfp4": {"name": "mxfp4"}, "fp8": {"name": "fp8"}, "gguf-q8_0": {"name": "gguf", "gate_up": "Q8_0", "down": "Q8_0"}}
PROMPT = list(range(300, 340))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--budget", default="0.25")
    parser.add_argument("--formats", default=",".join(FORMATS), help="a subset of: %(default)s")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    formats = {name: FORMATS[name] for name in ["bf16", *args.formats.split(",")]}  # bf16: every ratio's reference
    budget = float(args.budget) if args.budget.replace(".", "", 1).isdigit() else args.budget
    folder = default_model_dir()
    models = {}
    for label, node in formats.items():
        fmt = build_format(node)
        models[label, "dense"] = load_model(folder, device=args.device, expert_format=fmt)
        models[label, "offloaded"] = load_model(folder, device=args.device, expert_format=fmt, offload_experts=True)
    cells = list(models)
    runs: dict[tuple[str, str], list[float]] = {cell: [] for cell in cells}
    loaded: dict[tuple[str, str], float] = {}
    reference = {}

    def once(cell):
        model = models[cell]
        engine = offloaded_experts(model, budget, None, POLICIES.default_config()) if cell[1] == "offloaded" else None
        result = generate(model, PROMPT, max_new_tokens=args.tokens, eos_ids=(), experts=engine)
        if engine is not None:
            loaded[cell] = engine.report()["bytes_loaded"] / (len(PROMPT) + args.tokens) / 2**20
            engine.close()
        return result

    for cell in cells:  # warm-up, and each cell's tokens (offloaded must equal its dense self)
        reference[cell] = once(cell).token_ids
    for label in formats:
        assert reference[label, "offloaded"] == reference[label, "dense"], f"{label}: offloaded tokens differ"
    for r in range(args.repeats):
        order = cells[r % len(cells):] + cells[: r % len(cells)]
        for cell in order:
            runs[cell].append(once(cell).stats.decode_s_per_token * 1e3)
    median = {cell: statistics.median(v) for cell, v in runs.items()}
    print(f"{platform.processor() or platform.machine()} · torch {torch.__version__} · {torch.get_num_threads()} threads · "
          f"device {args.device} · {args.tokens} tokens · medians of {args.repeats} · offloaded at budget {args.budget}")
    print(f"{'experts':<10} {'mode':<10} {'decode ms/tok':>14} {'vs bf16':>8} {'MiB/token':>10}  all runs")
    for (label, mode), ms in median.items():
        ratio = ms / median["bf16", mode]
        mib = f"{loaded[label, mode]:.3f}" if (label, mode) in loaded else "-"
        print(f"{label:<10} {mode:<10} {ms:>14.3f} {ratio:>7.2f}× {mib:>10}  " + " ".join(f"{v:.2f}" for v in runs[label, mode]))
    if args.json:
        args.json.write_text(json.dumps({f"{l}/{m}": {"ms": median[l, m], "runs": runs[l, m], "mib_per_token": loaded.get((l, m))}
                                         for l, m in median}, indent=2) + "\n")


if __name__ == "__main__":
    main()
