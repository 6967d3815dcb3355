"""Benchmark (simulated): moepic with quantized experts on the 8 GB GPUs llama.cpp users report
figures for, next to those figures and to llama.cpp's own placement simulated on the same machine.
A script, not a test; deterministic.

llama.cpp users report (../shared/docs/landscape.md): Qwen3-30B-A3B ≈ 37 tokens/s on an 8 GB
RTX 2080 with `--n-cpu-moe`, GPT-OSS-120B ≈ 26 tokens/s with 8 GB of VRAM and a 14900K, both with
quantized weights, the experts of most layers computed on the CPU. Here:
  Qwen3-30B-A3B  rtx2080 (PCIe 3.0 x16) + desktop-ddr4 host (8 AVX2 cores, 2 × DDR4-3200)
  GPT-OSS-120B   rtx4060 (an 8 GB card, PCIe 4.0 x8) + desktop-14900k host (2 × DDR5-5600)
Copy-only systems run each model's experts as users have them (int4-g64 for Qwen3, GPT-OSS's own
MXFP4); hybrid ones (the CPU computes what the GPU does not hold) need experts the host computes as
stored: int4-fused (4.5 bits a weight, torch's fused CPU int4 kernel, priced at the host profile's
int4 rate). For GPT-OSS that is a re-encoding of its MXFP4 (4.25 bits; not lossless).
`llama-cpp-n-cpu-moe` is llama.cpp's static placement on those same kernels and rates, so the
columns compare placements, not kernels; the reported figure is llama.cpp's own kernels on
the users' own machines, which the profiles approximate from published specifications.
Routing: no real trace of those models is at hand, so a synthetic one carries the laws fitted to the
shared Mixtral gsm8k trace to each model's experts, top-k and depth (`moepic synth-trace --like`).
Budget: the 8 GB less the resident weights in bf16 (attention, router, embeddings: what moepic
keeps on the device) and 0.75 GiB for the KV cache, activations and the CUDA context.

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
CASES = (  # model, GPU, host, copy-only format flags, what llama.cpp users report (tokens/s)
    ("qwen3-30b-a3b", "rtx2080", "desktop-ddr4", ["--format", "int4", "--group-size", "64"], 37.0),
    ("gpt-oss-120b", "rtx4060", "desktop-14900k", ["--format", "mxfp4"], 26.0),
)
HYBRID_FORMAT = ["--format", "int4-fused", "--group-size", "64"]
COPY_ONLY = "on-demand-lru,lru-prefetch,moepic,oracle"
HYBRID = "fiddler,llama-cpp-n-cpu-moe,ktransformers,hybrimoe,moepic-hybrid"
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
    print(f"{'model':<15} {'gpu + host':<24} {'experts':<10} {'budget':>9} {'system':<20} {'tok/s':>7} {'hit':>6} "
          f"{'MiB/tok':>8}  {'vs reported':>11}  {'vs sim llama.cpp':>16}")
    with tempfile.TemporaryDirectory() as tmp:
        for model, gpu, host, fmt, reported in CASES:
            shape = model_shape(model)
            spec = shape.spec
            trace = Path(tmp) / f"{model}.npz"
            run(["synth-trace", "--like", str(SHARED), "--experts", str(spec.moe.num_experts), "--top-k", str(spec.moe.top_k),
                 "--layers", str(len(spec.moe_layers)), "--tokens", str(args.tokens), "--seed", "0", "--out", str(trace)])
            budget = VRAM - footprint(spec).resident_params * 2 - RESERVE
            common = ["compare", "--trace", str(trace), "--model", model, "--hardware", gpu, "--host", host,
                      "--budget", f"{budget}B", "--recall", str(args.recall)]
            rows = [(fmt[1], row) for row in run([*common, *fmt, "--baselines", COPY_ONLY])["rows"]]
            rows += [(HYBRID_FORMAT[1], row) for row in run([*common, *HYBRID_FORMAT, "--baselines", HYBRID])["rows"]]
            llama = next(1e3 / row["ms_per_token"] for _, row in rows if row["name"] == "llama-cpp-n-cpu-moe")
            for experts, row in rows:
                tps = 1e3 / row["ms_per_token"]
                print(f"{model:<15} {gpu + ' + ' + host:<24} {experts:<10} {budget / 2**30:>7.2f}Gi {row['name']:<20} "
                      f"{tps:>7.2f} {row['expert_hit_rate']:>6.1%} {row['bytes_loaded_per_token'] / 2**20:>8,.0f}  "
                      f"{tps / reported:>10.2f}×  {tps / llama:>15.2f}×")
            print(f"{'':<15} llama.cpp users report {reported:.0f} tokens/s on such a machine")

if __name__ == "__main__":
    main()
