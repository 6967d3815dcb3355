"""Benchmark (simulated): moepic with quantized experts on the 8 GB GPUs llama.cpp users report
figures for, next to those figures. A script, not a test; deterministic.

llama.cpp users report (../shared/docs/landscape.md): Qwen3-30B-A3B ≈ 37 tokens/s on an 8 GB
RTX 2080 with `--n-cpu-moe`, GPT-OSS-120B ≈ 26 tokens/s with 8 GB of VRAM and a 14900K, both with
quantized weights and every expert computed on the CPU. Here:
  Qwen3-30B-A3B, int4-g64 experts, rtx2080 profile (PCIe 3.0 x16)
  GPT-OSS-120B, its own MXFP4 experts, rtx4060 profile (an 8 GB card: PCIe 4.0 x8)
Routing: no real trace of those models is at hand, so a synthetic one carries the laws fitted to the
shared Mixtral gsm8k trace to each model's experts, top-k and depth (`moepic synth-trace --like`).
Budget: the 8 GB less the resident weights in bf16 (attention, router, embeddings: what moepic
keeps on the device) and 0.75 GiB for the KV cache, activations and the CUDA context.
moepic is copy-only here: with quantized experts its host path decodes to float32 before a GEMV,
which the simulator does not price (hybrid is refused for quantized formats), while llama.cpp's
CPU kernels stream the 4-bit bytes: that is the gap this table shows.

Run:  python experiments/bench_vs_llamacpp_sim.py [--tokens 256]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
from pathlib import Path

from moepic.cli import main as moepic
from moepic.core.footprint import footprint
from moepic.sim.shapes import model_shape

SHARED = Path(__file__).resolve().parents[2] / "shared" / "traces" / "mixtral-8x7b-instruct-fp8" / "gsm8k_2_routing.jsonl"
CASES = (  # model, hardware, format flags, what llama.cpp users report (tokens/s)
    ("qwen3-30b-a3b", "rtx2080", ["--format", "int4", "--group-size", "64"], 37.0),
    ("gpt-oss-120b", "rtx4060", ["--format", "mxfp4"], 26.0),
)
VRAM = 8 * 2**30
RESERVE = int(0.75 * 2**30)


def run(argv: list[str]) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = moepic([*argv, "--json"])
    if code:
        raise SystemExit(f"moepic {' '.join(argv)} failed ({code})")
    return json.loads(out.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--recall", type=float, default=0.85)
    args = parser.parse_args()
    if not SHARED.is_file():
        raise SystemExit(f"{SHARED} is absent: the synthetic traces are fitted to it")
    print(f"synthetic routing fitted to {SHARED.name}; {args.tokens} decode tokens; gate lookahead stand-in recall {args.recall}")
    print(f"{'model':<15} {'gpu':<8} {'experts':<8} {'budget':>9} {'system':<14} {'tok/s':>7} {'hit':>6} "
          f"{'MiB/tok':>8}  llama.cpp (reported)  moepic / llama.cpp")
    with tempfile.TemporaryDirectory() as tmp:
        for model, gpu, fmt, reported in CASES:
            shape = model_shape(model)
            spec = shape.spec
            trace = Path(tmp) / f"{model}.npz"
            run(["synth-trace", "--like", str(SHARED), "--experts", str(spec.moe.num_experts), "--top-k", str(spec.moe.top_k),
                 "--layers", str(len(spec.moe_layers)), "--tokens", str(args.tokens), "--seed", "0", "--out", str(trace)])
            budget = VRAM - footprint(spec).resident_params * 2 - RESERVE
            report = run(["compare", "--trace", str(trace), "--model", model, "--hardware", gpu, "--budget", f"{budget}B",
                          "--recall", str(args.recall), *fmt, "--baselines", "on-demand-lru,lru-prefetch,moepic,oracle"])
            for row in report["rows"]:
                tps = 1e3 / row["ms_per_token"]
                print(f"{model:<15} {gpu:<8} {fmt[1]:<8} {budget / 2**30:>7.2f}Gi {row['name']:<14} {tps:>7.2f} "
                      f"{row['expert_hit_rate']:>6.1%} {row['bytes_loaded_per_token'] / 2**20:>8,.0f}  {reported:>20.0f}  "
                      f"{tps / reported:>17.2f}×")


if __name__ == "__main__":
    main()
